"""Attention for one query per sequence (a decode step) over a KV cache, as one layer of a model calls it: torch's
scaled_dot_product_attention (its CPU flash kernel) in fp32 and bf16, beside llmcli's kernel (models/gemv.cpp,
`gemv.attention`). Shapes: smollm2-135m's heads (9 query heads, 3 key/value heads, d_head 64) and gpt2-small's
(12, 12, 64), batch 1, at several cache lengths; the keys and values are the cache's first L slots of a longer
buffer, as the KV cache hands them over. Usage:
    python benchmarks/decode_attention.py [--lengths 16,128,512] [--threads 2] [--reps 300] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record_table  # noqa: E402

HEADS = {"smollm2-135m": (9, 3, 64), "gpt2-small": (12, 12, 64)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="16,128,512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from llmcli.models import gemv

    if gemv.extension() is None:
        sys.exit("llmcli's kernels are not built here (see the line above); nothing to compare")
    torch.set_num_threads(args.threads)
    rows = []
    for model, (heads, kv_heads, d_head) in HEADS.items():
        for length in (int(v) for v in args.lengths.split(",")):
            candidates = {}
            for dtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(0)
                q = torch.randn(1, heads, 1, d_head, generator=g).to(dtype)
                k, v = (torch.randn(1, kv_heads, length + 64, d_head, generator=g).to(dtype)[:, :, :length]
                        for _ in range(2))
                name = str(dtype).removeprefix("torch.")
                gqa = heads != kv_heads
                candidates[f"torch SDPA {name}"] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                    q, k, v, enable_gqa=gqa)
                candidates[f"llmcli {name}"] = lambda q=q, k=k, v=v: gemv.attention(q, k, v, enable_gqa=gqa)
            times = {name: [] for name in candidates}
            with torch.inference_mode():
                for call in candidates.values():
                    for _ in range(20):
                        call()
                for _ in range(args.reps):  # interleaved
                    for name, call in candidates.items():
                        start = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - start)
            for name, samples in times.items():
                quartiles = statistics.quantiles(samples, n=4)
                rows.append(f"| {model} ({heads}/{kv_heads} heads) | {length} | {name} | "
                            f"{1e6 * statistics.median(samples):,.1f} ({1e6 * quartiles[0]:,.1f}-"
                            f"{1e6 * quartiles[2]:,.1f}) |")
                print(rows[-1], file=sys.stderr, flush=True)
    record_table(
        "Decode attention: one query per sequence over the KV cache, torch's SDPA and llmcli's kernel (CPU)",
        f"One layer's call at batch 1, {args.threads} threads, median of {args.reps} interleaved calls "
        f"(interquartile range), in microseconds; keys and values are the first L slots of a longer cache buffer. "
        f"llmcli's kernel: {gemv.kernel_name()}, its attention body vectorized for the same ISA as its fp32 body.",
        ["heads", "cached positions", "kernel", "us per call (IQR)"], rows, dry_run=args.no_record)


if __name__ == "__main__":
    main()
