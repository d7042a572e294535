"""The CUDA checks of issues 6 and 16 in one prepared run, for a session that is lent a GPU:

1. bf16 training of gpt2-small (batch 8 x 1024): tokens/s and MFU against the GPU's datasheet bf16 peak, eager
   and with --compile (goal: MFU >= 40% on an H200);
2. batch-1 bf16 decode of 256 tokens, eager and compiled, beside transformers on the same weights;
3. memory-estimate --measure against torch.cuda.max_memory_allocated, bf16 training with and without gradient
   checkpointing and bf16 inference (goal: within 10%);
4. bf16 and fp16 (GradScaler) training: a short `llmcli train` in each precision must finish with a finite
   loss (on CUDA both run attention through SDPA, whose flash kernel takes 16-bit inputs; which kernel ran is
   not checked here).

Every figure comes from llmcli's own commands (run_bench, estimate_memory_of + measure_memory, pretrain);
the script only runs them and writes one RESULTS.md section. `--device cpu --small` runs the same code on a
toy model to check the script itself. Usage:
    python benchmarks/cuda_paths.py [--device cuda] [--small] [--no-record]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from _common import header, record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="gpt-nano, short sequences: checks the script")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from llmcli.profiling.bench import run_bench
    from llmcli.profiling.memory import estimate_memory_of
    from llmcli.profiling.memory_measure import measure_memory
    from llmcli.training.pretrain import pretrain
    from llmcli.training.run import TrainFlags

    model = "gpt-nano" if args.small else "gpt2-small"
    train_shape = (2, 64) if args.small else (8, 1024)
    decode_tokens = 16 if args.small else 256
    dtype = "bf16" if args.device.startswith("cuda") else "fp32"  # bf16 matmuls crawl on an AVX2 CPU
    started = time.perf_counter()
    lines = [header(f"CUDA paths: {model} on {args.device} ({dtype})"),
             f"`python benchmarks/cuda_paths.py --device {args.device}{' --small' if args.small else ''}`\n",
             "| case | eager | --compile |", "|---|---:|---:|"]

    def bench(mode, batch, seq, compile_, compare=None):
        results, _ = run_bench(model, [mode], [batch], [seq], dtype=dtype, device=args.device, reps=5, warmup=2,
                               compare=compare, compile=compile_, log=lambda *a: None)
        return results[0]

    train = [bench("train", *train_shape, c) for c in (False, True)]
    lines.append(f"| training tokens/s, batch {train_shape[0]} x {train_shape[1]} | {train[0].tokens_per_s:,.0f} | "
                 f"{train[1].tokens_per_s:,.0f} |")
    mfu = [f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a (no datasheet peak)" for r in train]
    lines.append(f"| training MFU (bf16 datasheet peak) | {mfu[0]} | {mfu[1]} |")
    decode = [bench("decode", 1, decode_tokens, c, compare="transformers") for c in (False, True)]
    lines.append(f"| decode tokens/s, batch 1, {decode_tokens} tokens | {decode[0].tokens_per_s:,.1f} | "
                 f"{decode[1].tokens_per_s:,.1f} |")
    lines.append(f"| transformers decode tokens/s (its default) | {decode[0].peer['tokens_per_s']:,.1f} | "
                 f"{decode[1].peer['tokens_per_s']:,.1f} |")
    lines.append(f"| decode time to first token, ms | {1e3 * decode[0].ttft_s:,.1f} | {1e3 * decode[1].ttft_s:,.1f} |")

    lines += ["", "| memory-estimate --measure | estimate | measured | error |", "|---|---:|---:|---:|"]
    seq = max(64, train_shape[1] // 4)
    for mode, extra in (("train", {}), ("train", {"grad_checkpointing": True}), ("infer", {"new_tokens": 16})):
        options = dict(batch_size=train_shape[0], seq_len=seq, dtype=dtype, **extra)
        config, estimate, device = estimate_memory_of(model, mode, args.device, **options)
        measured = measure_memory(config, estimate, args.device)["measured_bytes"]
        label = f"{mode} {dtype} batch {train_shape[0]} x {seq}" + (" checkpointed" if "grad_checkpointing" in extra
                                                                    else "")
        lines.append(f"| {label} | {estimate.total_bytes / 1e9:.3f} GB | {measured / 1e9:.3f} GB | "
                     f"{(estimate.total_bytes - measured) / measured:+.1%} |")

    lines += ["", "| precision | steps | final loss | finite |", "|---|---:|---:|---|"]
    precisions = ("bf16", "fp16") if args.device.startswith("cuda") else ("fp32",)
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            summary = pretrain(model, None, f"{tmp}/{precision}", TrainFlags(steps=20, batch_size=4, seq_len=64,
                               precision=precision, device=args.device, force=True), log=lambda *a: None)
            loss = summary["val_loss"]
            lines.append(f"| {precision} | {summary['step']} | {loss:.4f} | {'yes' if math.isfinite(loss) else 'NO'} |")
    lines.append(f"\n{time.perf_counter() - started:.0f} s in all")
    record("\n".join(lines), args.no_record)


if __name__ == "__main__":
    main()
