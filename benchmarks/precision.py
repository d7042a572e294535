"""What `--precision auto` buys on this CPU: a training step (forward, loss, backward, fused AdamW) in fp32 against
the same step under bf16 autocast, and batch-1 decode with fp32 against bf16 weights, interleaved repetition by
repetition on the same model. Usage:
    python benchmarks/precision.py [--model gpt2-small] [--batch-size 4] [--seq-len 128] [--reps 5] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch

    from llmcli.generation import generate_ids
    from llmcli.model_dir import resolve_config
    from llmcli.models import build_model
    from llmcli.models.layout import store_matrices_transposed
    from llmcli.runtime import autocast, family_loss, native_bf16, resolve_precision

    cpu = torch.device("cpu")
    config, _ = resolve_config(args.model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    models = {p: build_model(config, seed=0).train() for p in ("fp32", "bf16")}
    optimizers = {p: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True) for p, m in models.items()}

    def train_step(precision: str) -> None:
        optimizers[precision].zero_grad(set_to_none=True)
        with autocast(cpu, precision):
            loss = family_loss(models[precision], {"input_ids": ids, "labels": ids})
        loss.backward()
        optimizers[precision].step()

    decoders = {p: store_matrices_transposed(build_model(config, seed=0).eval()).to(dtype)
                for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    prompt = ids[:1, :8]

    def decode(precision: str) -> None:
        with torch.inference_mode():
            generate_ids(decoders[precision], prompt, args.new_tokens, temperature=0)

    rows = []
    for name, step, tokens in (("training step", train_step, args.batch_size * args.seq_len),
                               ("batch-1 decode", decode, args.new_tokens)):
        for precision in ("fp32", "bf16"):
            step(precision)  # warm-up
        times = {"fp32": [], "bf16": []}
        for _ in range(args.reps):
            for precision in ("fp32", "bf16"):
                start = time.perf_counter()
                step(precision)
                times[precision].append(time.perf_counter() - start)
        ratios = [f / b for f, b in zip(times["fp32"], times["bf16"])]
        rates = {p: tokens / statistics.median(t) for p, t in times.items()}
        rows.append(f"| {args.model} | {name} | {rates['fp32']:,.1f} | {rates['bf16']:,.1f} | "
                    f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
        print(rows[-1], file=sys.stderr, flush=True)
    auto = resolve_precision("auto", cpu)
    record_table(
        "--precision auto: bf16 against fp32 on this CPU",
        f"{args.model}, training step: batch {args.batch_size} x {args.seq_len}, forward + chunked loss + backward + "
        f"fused AdamW, bf16 as autocast (fp32 master weights); decode: {args.new_tokens} tokens from an 8-token "
        f"prompt, KV cache, matrices stored transposed, bf16 weights. {args.reps} repetitions interleaved, tokens/s "
        f"of the median, speedup = median of per-repetition ratios (min-max). Native bf16 here: {native_bf16(cpu)}, "
        f"so auto picks {auto}.",
        ["model", "case", "fp32 tok/s", "bf16 tok/s", "bf16 / fp32"], rows, dry_run=args.no_record)


if __name__ == "__main__":
    main()
