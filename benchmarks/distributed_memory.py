"""Per-rank peak memory of DDP and FSDP training on CPU (torchrun, gloo) vs memory-estimate's per-rank figures.

DDP is compared with `estimate_memory(..., gpus=N)` (every rank holds everything, plus gradient buffers),
FSDP (fully_shard per block, then the root) with `--zero-stage 3` (weights, gradients and optimizer states
sharded; the running block gathered). Each rank measures one step of llmcli's Trainer the way
llmcli/profiling/memory_measure.py measures one process: peak anonymous RSS above a baseline taken after a
warm-up step of a one-layer miniature, optimizer states created first, glibc's mmap threshold fixed so
freed tensors leave RSS at once. Run it on an idle machine: every rank needs its own cores. Usage:
    python benchmarks/distributed_memory.py [--model gpt2-small] [--batch-size 2] [--seq-len 128] [--nproc 2]
                                            [--no-record]
The script starts torchrun itself; with --worker it is one rank.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, record  # noqa: E402

STRATEGIES = {"ddp": 0, "fsdp": 3}  # the ZeRO stage memory-estimate models each with


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--batch-size", type=int, default=2, help="rows per rank")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--worker", choices=sorted(STRATEGIES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from llmcli.model_dir import resolve_config
    from llmcli.profiling.memory import estimate_memory
    from llmcli.profiling.memory_measure import MMAP_THRESHOLD

    config, _ = resolve_config(args.model)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.nproc)))
    rows = []
    for strategy, stage in STRATEGIES.items():
        estimate = estimate_memory(config, "train", args.batch_size, args.seq_len, "fp32", zero_stage=stage,
                                   gpus=args.nproc, device="cpu")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={args.nproc}", __file__, "--worker", strategy, "--model", args.model,
                               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{strategy} run failed:\n{proc.stderr[-3000:]}")
        ranks = sorted((json.loads(line.removeprefix("RESULT ")) for line in proc.stdout.splitlines()
                        if line.startswith("RESULT ")), key=lambda r: r["rank"])
        measured = [r["measured_bytes"] for r in ranks]
        worst = max(measured)
        rows.append(f"| {strategy} | {stage} | {estimate.total_bytes / 1e6:,.0f} MB | "
                    f"{' / '.join(f'{m / 1e6:,.0f}' for m in measured)} MB | "
                    f"{(estimate.total_bytes - worst) / worst:+.1%} | {time.perf_counter() - start:.0f} s |")
        print(rows[-1], file=sys.stderr)
    table = "\n".join(["| strategy | estimate's ZeRO stage | estimate per rank | measured per rank | error (vs the "
                       "larger) | run time |", "|---|---:|---:|---:|---:|---:|", *rows])
    text = (f"{header(f'distributed training memory per rank (CPU, gloo, {args.nproc} processes)')}\n"
            f"{config.name}, batch {args.batch_size} per rank, seq {args.seq_len}, fp32, AdamW. Measured: peak "
            f"anonymous RSS of each rank above its baseline after a warm-up (benchmarks/distributed_memory.py); "
            f"estimate: `llmcli memory-estimate {config.name} --gpus {args.nproc} --zero-stage S`.\n\n{table}\n")
    record(text, dry_run=args.no_record)


def worker(args) -> None:
    """One rank: warm up on a miniature, then measure one training step of the real model."""
    import torch

    from llmcli.model_dir import resolve_config
    from llmcli.models import build_model
    from llmcli.profiling.memory_measure import _miniature, _RandomBatches
    from llmcli.profiling.peak import memory_in_use, peak_memory, reset_peak
    from llmcli.training.distributed import start, stop
    from llmcli.training.loop import TrainArgs, Trainer

    config, _ = resolve_config(args.model)
    parallel = start(args.worker, None, None)

    def trainer(cfg, batch: int, seq_len: int, run_dir: str) -> Trainer:
        train_args = TrainArgs(steps=1, batch_size=batch, seq_len=seq_len, device="cpu", precision="fp32")
        target = seq_len if cfg.family == "t5" else None
        data = _RandomBatches(cfg, batch * parallel.dp, seq_len, target)  # the global batch; each rank its rows
        result = Trainer(build_model(cfg, seed=0), data, [], train_args, Path(run_dir), parallel=parallel)
        for p in result.model.parameters():  # the optimizer states exist, as in a running loop
            p.grad = torch.zeros_like(p)
        result.optimizer.step()
        result.optimizer.zero_grad(set_to_none=True)
        return result

    with tempfile.TemporaryDirectory() as run_dir:
        trainer(_miniature(config), 1, 8, run_dir).train_step()
        gc.collect()
        baseline = memory_in_use(parallel.device)
        step = trainer(config, args.batch_size, args.seq_len, run_dir).train_step
        parallel.barrier()
        reset_peak(parallel.device)
        start_time = time.perf_counter()
        step()
        seconds = time.perf_counter() - start_time
        peak = peak_memory(parallel.device)
    print("RESULT " + json.dumps({"rank": parallel.rank, "measured_bytes": peak - baseline,
                                  "baseline_bytes": baseline, "seconds": round(seconds, 2)}), flush=True)
    stop(parallel)


if __name__ == "__main__":
    main()
