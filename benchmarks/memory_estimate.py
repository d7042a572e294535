"""memory-estimate vs the measured peak on CPU: gpt2-small training (fp32 and bf16, with and without
gradient checkpointing) and inference (prefill plus 16 decoded tokens with the KV cache).

Each case runs `llmcli memory-estimate ... --measure` in-library: the estimate from the config, then the real
step in a child process (see llmcli/profiling/memory_measure.py for what the measurement counts). bf16 on a
CPU without bf16 matrix instructions is slow: a gpt2-small training step can take several minutes. Usage:
    python benchmarks/memory_estimate.py [--model gpt2-small] [--batch-size 4] [--seq-len 256] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record_table  # noqa: E402

CASES = [("train", "fp32", False), ("train", "fp32", True), ("train", "bf16", False), ("train", "bf16", True),
         ("infer", "fp32", False), ("infer", "bf16", False)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmcli.model_dir import resolve_config
    from llmcli.profiling.memory import estimate_memory
    from llmcli.profiling.memory_measure import measure_memory

    config, _ = resolve_config(args.model)
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as progress:
        task = progress.add_task("memory-estimate", total=len(CASES))
        for mode, dtype, checkpointing in CASES:
            name = f"{mode} {dtype}" + (" + checkpointing" if checkpointing else "")
            progress.update(task, description=f"{args.model} {name}")
            estimate = estimate_memory(config, mode, args.batch_size, args.seq_len, dtype,
                                       grad_checkpointing=checkpointing, device="cpu", new_tokens=args.new_tokens)
            start = time.perf_counter()
            measured = measure_memory(config, estimate, "cpu")["measured_bytes"]
            error = (estimate.total_bytes - measured) / measured
            rows.append(f"| {name} | {estimate.peak_phase.replace('_', ' ')} | {estimate.total_bytes / 1e6:,.0f} MB "
                        f"| {measured / 1e6:,.0f} MB | {error:+.1%} | {time.perf_counter() - start:.0f} s |")
            progress.advance(task)
    record_table("memory-estimate vs measured (CPU)",
                 f"{args.model}, batch {args.batch_size}, seq {args.seq_len} (inference: prompt "
                 f"{args.seq_len - args.new_tokens} + {args.new_tokens} new tokens), AdamW, `--device cpu`. Measured: "
                 f"peak anonymous RSS of a child process above its baseline after a warm-up "
                 f"(llmcli/profiling/memory_measure.py). Goal: within ±20%.",
                 ["case", "peak phase (estimate)", "estimate", "measured", "error", "run time"], rows,
                 dry_run=args.no_record)

if __name__ == "__main__":
    main()
