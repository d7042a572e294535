"""quantize and prune on a trained model: size, held-out perplexity and decode speed, before and after.

The model is a finished `llmcli train` run (default: gpt-micro trained by `llmcli train gpt-micro`,
trained here first if --model-dir is not given). It is also round-tripped through Hugging Face's
format (`convert to-hf`, then `convert from-hf`) and quantized again, the path a real GPT-2
checkpoint takes. Issue-8 goals: int8 perplexity +1% at most, int4 g128 round-to-nearest +10%,
GPTQ +5%; linear weights 3.9x (int8) and 6x (int4) smaller; Wanda's increase at 50% below
magnitude's. Usage:
    python benchmarks/compression.py [--model-dir runs/gpt-micro] [--no-speed] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, record  # noqa: E402

QUANTIZE = [("int8", {"scheme": "int8"}), ("int8-dynamic", {"scheme": "int8-dynamic"}),
            ("int4 g128 round-to-nearest", {"scheme": "int4", "group_size": 128}),
            ("int4 g128 GPTQ", {"scheme": "int4", "group_size": 128, "method": "gptq"}),
            ("int4 g32 round-to-nearest", {"scheme": "int4", "group_size": 32})]
PRUNE = [("magnitude 50% (per layer)", ("magnitude", 0.5, None)), ("Wanda 50% (per row)", ("wanda", 0.5, None)),
         ("magnitude 2:4", ("magnitude", None, "2:4")), ("Wanda 2:4", ("wanda", None, "2:4")),
         ("heads 25%", ("heads", 0.25, None)), ("heads 50%", ("heads", 0.5, None))]


def row(label: str, report: dict, speed: bool) -> str:
    before, after, change = report["before"], report["after"], report["change"]
    cells = [label, f"{change['linear_size_ratio']:.2f}×", f"{change['size_ratio']:.2f}×",
             f"{before['perplexity']:.2f}", f"{after['perplexity']:.2f}", f"{change['perplexity_change']:+.2%}"]
    if speed:
        cells += [f"{before['speed']['tokens_per_s']:.0f}", f"{after['speed']['tokens_per_s']:.0f}",
                  f"{change['speed_ratio']:.2f}×"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", help="a finished `llmcli train` run (default: train gpt-micro)")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from llmcli.compression.prune import resolve_spec
    from llmcli.compression.prune_dir import prune
    from llmcli.compression.quantize_dir import quantize_model_dir
    from llmcli.interop.hf import convert_from_hf, convert_to_hf
    from llmcli.training.pretrain import pretrain
    from llmcli.training.run import TrainFlags

    speed = not args.no_speed
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = "runs/bench-compression/gpt-micro"
        if not Path(model_dir, "model.safetensors").is_file():
            pretrain("gpt-micro", None, model_dir, TrainFlags(force=True), log=lambda *a, **k: None)
    head = ["variant", "linear weights", "whole directory", "ppl before", "ppl after", "ppl change"]
    head += ["decode tok/s before", "after", "speed"] if speed else []
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    wanda_vs_magnitude = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, options in QUANTIZE:
            report = quantize_model_dir(model_dir, f"{tmp}/q", speed=speed, force=True, **options)
            table.append(row(f"quantize {label}", report, speed))
        for label, (method, sparsity, pattern) in PRUNE:
            report = prune(model_dir, f"{tmp}/p", resolve_spec(method, sparsity, pattern), speed=speed, force=True,
                           log=lambda *a, **k: None)
            table.append(row(f"prune {label}", report, speed))
            if "50%" in label and method != "heads":
                wanda_vs_magnitude[method] = report["change"]["perplexity_change"]
        convert_to_hf(Path(model_dir), Path(tmp) / "hf")
        convert_from_hf(Path(tmp) / "hf", Path(tmp) / "from-hf")
        (Path(tmp) / "from-hf" / "tokenizer.json").write_bytes(Path(model_dir, "tokenizer.json").read_bytes())
        for label, options in QUANTIZE[:1] + QUANTIZE[2:4]:
            report = quantize_model_dir(str(Path(tmp) / "from-hf"), f"{tmp}/q", speed=speed, force=True, **options)
            table.append(row(f"via HF format: quantize {label}", report, speed))

    lines = [header(f"Compression of a trained model: {Path(model_dir).name} (CPU, fp32)"),
             f"Model directory `{model_dir}`. Perplexity on the held-out split of the corpus it was trained on "
             f"(the run's --seq-len). Linear weights: the transformer blocks' linear layers with their biases and "
             f"scales; the whole directory also holds the full-precision embedding. Decode: batch 1, "
             f"32 new tokens with the KV cache, mean of 3 after a warm-up. Pruned zeros are stored densely.\n",
             *table,
             f"\nWanda 50% vs magnitude 50%: {wanda_vs_magnitude.get('wanda', float('nan')):+.2%} vs "
             f"{wanda_vs_magnitude.get('magnitude', float('nan')):+.2%} perplexity.",
             f"\n`python benchmarks/compression.py{' --model-dir ' + args.model_dir if args.model_dir else ''}"
             f"{' --no-speed' if args.no_speed else ''}`"]
    record("\n".join(lines), args.no_record)


if __name__ == "__main__":
    main()
