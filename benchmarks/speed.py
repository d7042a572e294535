"""Issue 16's ratios in one run, each side by side and interleaved repetition by repetition:

1. training step, gpt2-small, batch 4 x 256, AdamW (the same fused make_optimizer for both): llmcli vs
   transformers (its default sdpa attention);
2. batch-1 greedy decode of --new-tokens tokens after an 8-token prompt, gpt2-small: llmcli's generate_ids
   (KV cache) vs transformers' generate with its default dynamic cache, with its static cache, and with its
   static cache and its own torch.compile of the forward (compiled during the warm-up; --no-hf-compile skips it);
3. weight-only int8 and int4 (round to nearest; groups of 128, or 64 where 128 does not divide) batch-1
   decode vs the fp32 model, on the gpt2-small shape and a Llama-style shape (smollm2-135m), random weights.

fp32 on the CPU, torch's default threads (printed), llmcli eager; llmcli's matrices in the order
`llmcli generate` loads them (models.layout.store_matrices_transposed); medians of --reps interleaved
repetitions after a warm-up, with min..max. Appends the tables to RESULTS.md.
Usage: python benchmarks/speed.py [--reps 5] [--new-tokens 256] [--quantized-tokens 64] [--no-hf-compile]
       [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, record, training_steps  # noqa: E402


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, repetition by repetition."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}..{max(values):,.1f})"


def ratio_row(label: str, ours: list[float], theirs: list[float], work: float) -> str:
    """work units per second of both sides, and the per-repetition ratio ours / theirs."""
    rate_ours, rate_theirs = [work / t for t in ours], [work / t for t in theirs]
    ratios = [b / a for a, b in zip(ours, theirs)]
    return f"| {label} | {spread(rate_ours)} | {spread(rate_theirs)} | **{statistics.median(ratios):.2f}x** " \
           f"({min(ratios):.2f}..{max(ratios):.2f}) |"


def decode_fns(model_name: str, new_tokens: int, hf_compile: bool = True):
    """gpt2-small on both sides with the same weights: llmcli's cached decode, transformers' two caches and
    (hf_compile) its static cache with its forward torch.compile'd (compiled during the warm-up)."""
    import transformers

    from llmcli import load_model
    from llmcli.generation import generate_ids
    from llmcli.interop.hf import convert_to_hf
    from llmcli.model_dir import build_model_dir, resolve_config
    from llmcli.models.layout import store_matrices_transposed

    config, _ = resolve_config(model_name)
    with tempfile.TemporaryDirectory() as tmp:
        build_model_dir(config, Path(tmp) / "ours", seed=0)
        convert_to_hf(Path(tmp) / "ours", Path(tmp) / "hf")
        ours = store_matrices_transposed(load_model(Path(tmp) / "ours"))  # as `llmcli generate` loads it
        theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", attn_implementation="sdpa").eval()
    prompt = torch.randint(5, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    kwargs = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0,
                  max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    # transformers compiles its forward for a static cache by itself on GPUs; on the CPU it is asked to (its
    # flag for that), in inductor's default mode (its own default, reduce-overhead, is CUDA graphs)
    compiled = transformers.CompileConfig(mode="default")
    compiled._compile_all_devices = True

    @torch.inference_mode()
    def hf(cache=None, compile=False):
        options = {"cache_implementation": cache} if cache else {}
        return theirs.generate(**kwargs, **options, **({"compile_config": compiled} if compile else
                                                       {"disable_compile": True}))

    @torch.inference_mode()
    def llmcli():
        return generate_ids(ours, prompt, new_tokens, temperature=0.0)

    first = llmcli()
    assert torch.equal(first, hf()[:, prompt.shape[1]:]), "the two sides do not generate the same tokens"
    fns = {"llmcli": llmcli, "transformers": hf, "transformers static": lambda: hf("static")}
    if hf_compile:
        fns["transformers static compiled"] = lambda: hf("static", compile=True)
        assert torch.equal(first, fns["transformers static compiled"]()[:, prompt.shape[1]:]), "compiled differs"
    return fns


QUANTIZED = ("int8", "int4", "int8+head", "int4+head")


def quantized_fns(model_name: str, new_tokens: int):
    from llmcli.compression.quantize import quantize_model
    from llmcli.generation import generate_ids
    from llmcli.model_dir import resolve_config
    from llmcli.models import build_model
    from llmcli.models.layout import store_matrices_transposed

    config, _ = resolve_config(model_name)
    prompt = torch.randint(5, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    group = next(g for g in (128, 64, 32) if config.d_model % g == 0 and config.d_ff % g == 0)
    models = {"fp32": store_matrices_transposed(build_model(config, seed=0).eval())}
    for scheme in QUANTIZED:  # "+head": `llmcli quantize --include-head`, the LM head too (the embedding stays fp32)
        model = build_model(config, seed=0).eval()
        quantize_model(model, scheme.removesuffix("+head"), group_size=group, include_head=scheme.endswith("+head"))
        models[scheme] = store_matrices_transposed(model)

    def decode(model):
        return torch.inference_mode()(lambda: generate_ids(model, prompt, new_tokens, temperature=0.0))

    return group, {name: decode(model) for name, model in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--quantized-tokens", type=int, default=64)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--parts", default="train,decode,quantized", help="which tables to measure")
    parser.add_argument("--no-hf-compile", action="store_true", help="skip transformers' compiled static cache")
    args = parser.parse_args()

    parts = args.parts.split(",")
    lines = [header("Issue 16: llmcli vs transformers, training and decode (gpt2-small, fp32, CPU)")]
    if "train" in parts or "decode" in parts:
        rows = []
        if "train" in parts:
            _, steps = training_steps("gpt2-small", 4, 256)
            train = interleaved(steps, args.reps)
            del steps
            rows.append(ratio_row("training step", train["llmcli"], train["transformers"], 4 * 256))
        if "decode" in parts:
            decode = interleaved(decode_fns("gpt2-small", args.new_tokens, not args.no_hf_compile), args.reps)
            rows += [ratio_row(f"decode, transformers' {name}", decode["llmcli"], decode[key], args.new_tokens)
                     for name, key in (("dynamic cache", "transformers"), ("static cache", "transformers static"),
                                       ("static cache, compiled", "transformers static compiled")) if key in decode]
        lines += [f"Training: one forward + loss + backward + fused AdamW step, batch 4 x 256 tokens. Decode: batch 1, "
                  f"an 8-token prompt then {args.new_tokens} greedy tokens (both sides generate the same tokens, "
                  f"checked). Tokens/s medians of {args.reps} interleaved repetitions after a warm-up "
                  f"(min..max); the ratio is per repetition. llmcli eager; transformers eager except where the row "
                  f"says compiled (its own torch.compile of the forward with its static cache, compiled in the "
                  f"warm-up).\n",
                  "| case | llmcli tokens/s | transformers tokens/s | llmcli / transformers |", "|---|---:|---:|---:|",
                  *rows]
    if "quantized" in parts:
        lines += ["", f"Weight-only quantized decode against the same model in fp32: batch 1, {args.quantized_tokens} "
                      f"greedy tokens, random weights, blocks' projections quantized (RTN; int4 in groups of the "
                      f"largest of 128, 64 that divides the widths); the LM head in fp32, or quantized too (+head, "
                      f"`llmcli quantize --include-head`).\n",
                  "| model | int4 group | fp32 tokens/s | "
                  + " | ".join(f"{q} tokens/s | {q} / fp32" for q in QUANTIZED) + " |",
                  "|---|---:|---:|" + "---:|---:|" * len(QUANTIZED)]
        for name in ("gpt2-small", "smollm2-135m"):
            group, fns = quantized_fns(name, args.quantized_tokens)
            times = interleaved(fns, args.reps)
            rates = {k: [args.quantized_tokens / t for t in v] for k, v in times.items()}
            ratio = {k: statistics.median([f / q for f, q in zip(times["fp32"], times[k])]) for k in QUANTIZED}
            lines.append(f"| {name} | {group} | {spread(rates['fp32'])} | "
                         + " | ".join(f"{spread(rates[q])} | **{ratio[q]:.2f}x**" for q in QUANTIZED) + " |")
    lines.append(f"\n`python benchmarks/speed.py --reps {args.reps} --new-tokens {args.new_tokens} "
                 f"--quantized-tokens {args.quantized_tokens} --parts {args.parts}`, {torch.get_num_threads()} threads")
    record("\n".join(lines), args.no_record)


if __name__ == "__main__":
    main()
