"""Quantized perplexity through the decode kernels: a trained model scored one token at a time with the KV cache
(single-row products: llmcli's own kernels, models/gemv.cpp, where they are built), against the same model scored
a window at a time (torch's matrix products, as `llmcli eval` does), in fp32, int8 and int4 group 32 (the LM head
quantized too, as bench compares with llama.cpp). Issue-8 bounds: int8 +1%, int4 +10% over fp32. Usage:
    python benchmarks/decode_perplexity.py [--model-dir runs/bench-compression/gpt-micro] [--no-record]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record_table  # noqa: E402

VARIANTS = (("fp32", None), ("int8 + head", "int8"), ("int4 g32 + head", "int4"))


def decode_nll(model, windows) -> float:
    """Mean next-token NLL with every position fed alone through the KV cache (rows of 1: the decode path)."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in windows:
            cache = model.new_cache(1, ids.shape[1])
            for t in range(ids.shape[1] - 1):
                logits = model(ids[:, t:t + 1], cache=cache).logits[:, -1].float()
                total += torch.nn.functional.cross_entropy(logits, ids[:, t + 1]).item()
                count += 1
    return total / count


def window_nll(model, windows) -> float:
    """The same positions scored a window at a time (many-row matrix products)."""
    import torch

    with torch.inference_mode():
        losses = [torch.nn.functional.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:], reduction="sum")
                  for ids in windows]
    return sum(loss.item() for loss in losses) / sum(ids.shape[1] - 1 for ids in windows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", help="a finished `llmcli train` run (default: train gpt-micro)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch

    from llmcli.compression.quantize import quantize_model
    from llmcli.model_dir import load_model, load_tokenizer
    from llmcli.models import gemv
    from llmcli.progress import SILENT
    from llmcli.training.evaluation import corpus_batches
    from llmcli.training.pretrain import pretrain
    from llmcli.training.run import TrainFlags

    torch.set_num_threads(2)
    model_dir = args.model_dir or "runs/bench-compression/gpt-micro"
    if args.model_dir is None and not Path(model_dir, "model.safetensors").is_file():
        pretrain("gpt-micro", None, model_dir, TrainFlags(force=True), log=lambda *a, **k: None)
    config = load_model(Path(model_dir)).config
    corpus = corpus_batches(Path(model_dir), config, load_tokenizer(model_dir), None, None,
                            val_batches=args.windows, batch_size=1)
    windows = [batch["input_ids"][:1] for batch in corpus.val]
    rows, baseline = [], {}
    for label, scheme in VARIANTS:
        model = load_model(Path(model_dir)).eval()
        if scheme:
            quantize_model(model, scheme, 32, "rtn", True, None, False, SILENT)
        gemv.prepare_for_decode(model)
        decoded, windowed = decode_nll(model, windows), window_nll(model, windows)
        baseline = baseline or {"decode": decoded, "window": windowed}
        rows.append(f"| {label} | {math.exp(windowed):.3f} | {math.exp(windowed - baseline['window']) - 1:+.2%} | "
                    f"{math.exp(decoded):.3f} | {math.exp(decoded - baseline['decode']) - 1:+.2%} |")
        print(rows[-1], file=sys.stderr, flush=True)
    tokens = sum(w.shape[1] - 1 for w in windows)
    record_table(
        "Quantized perplexity through the decode kernels (CPU)",
        f"Model directory `{model_dir}` (trained gpt-micro), {len(windows)} held-out windows of {windows[0].shape[1]} "
        f"tokens ({tokens} scored positions). Windowed: each window in one forward pass (torch's matrix products and "
        f"ATen's packed int8/int4 kernels, as `llmcli eval`). Decoded: one position at a time through the KV cache, "
        f"single-row products by {gemv.kernel_name()}, int8 and int4 with their activations quantized to int8 per "
        f"block of 32. Round-to-nearest, the LM head quantized too. Change: against fp32 on the same path.",
        ["weights", "perplexity, windowed", "change", "perplexity, decoded", "change"], rows, dry_run=args.no_record)


if __name__ == "__main__":
    main()
