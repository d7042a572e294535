"""What a single-row matrix product (a decode step's linear layer) reaches on this CPU, against the machine's read
bandwidth: with what torch has (fp32 and bf16 F.linear with the weight (out, in), x @ W with the weight stored
(in, out), ATen's packed int8 and int4 weight-only kernels) and with llmcli's own kernels (models/gemv.cpp: fp32,
bf16, int8 and int4 g32 weights). Each candidate cycles through copies of its weight totalling 256 MB of its own bytes
(an int8 copy is a quarter of an fp32 one: four times as many copies), so that, as in a real decode step, the weights
come from memory and not from the caches. Usage:
    python benchmarks/gemv.py [--shapes 768x3072,3072x768] [--threads 2] [--no-record]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record_table  # noqa: E402
from llama_cpp import read_bandwidth  # noqa: E402

STREAM_BYTES = 256 * 2**20  # per candidate: well above the last-level cache


def candidates(k: int, n: int) -> dict:
    """name -> (list of calls, one per weight copy; weight bytes each call reads) for x (1, k) through k -> n."""
    import torch
    import torch.nn.functional as F

    from llmcli.models import gemv
    from llmcli.models.quantized import QuantizedLinear, qrange, scheme_bits, symmetric_scales

    x32, x16 = torch.randn(1, k), torch.randn(1, k).bfloat16()
    generator = torch.Generator().manual_seed(0)

    def weights(bytes_per_weight: float):
        """fp32 weights, one at a time, as many as make STREAM_BYTES at bytes_per_weight: each candidate streams as
        much (int4's copies would fill 2 GB as fp32 held at once)."""
        copies = max(1, math.ceil(STREAM_BYTES / (n * k * bytes_per_weight)))
        return (torch.randn(n, k, generator=generator) * 0.02 for _ in range(copies))

    found = {
        "fp32 linear, weight (out, in)": ([lambda w=w: F.linear(x32, w) for w in weights(4)], n * k * 4),
        "fp32 x @ W, weight stored (in, out)": ([lambda w=w.t().contiguous(): x32 @ w for w in weights(4)],
                                                n * k * 4),
        "bf16 linear, weight (out, in)": ([lambda w=w.bfloat16(): F.linear(x16, w) for w in weights(2)], n * k * 2),
        "bf16 x @ W, weight stored (in, out)": ([lambda w=w.bfloat16().t().contiguous(): x16 @ w
                                                 for w in weights(2)], n * k * 2),
    }
    if gemv.extension() is not None:  # llmcli's own kernels (models/gemv.cpp), as DecodeLinear calls them
        found["fp32 llmcli gemv"] = ([lambda w=w: gemv.linear(x32, w) for w in weights(4)], n * k * 4)
        found["bf16 llmcli gemv"] = ([lambda w=w.bfloat16(): gemv.linear(x16, w) for w in weights(2)], n * k * 2)
    for scheme, group in (("int8", None), ("int4", 32)):  # llmcli's quantized layer and its ATen packed kernel
        bits = scheme_bits(scheme)
        aten_calls, our_calls, nbytes = [], [], 0
        for weight in weights(bits / 8):
            scales = symmetric_scales(weight, group or k, bits)
            q = torch.clamp(torch.round(weight.reshape(n, -1, group or k) / scales[..., None]), *qrange(bits))
            layer = QuantizedLinear.from_linear(torch.nn.Linear(k, n, bias=False), scheme, group, q.reshape(n, k),
                                                scales)
            if not layer._kernel_fits():
                break
            nbytes = layer.stored_bytes()
            aten_calls.append(lambda f=layer._aten_kernel(): f(x16))  # packed from the row-major bytes
            if gemv.extension() is not None:  # ours read the tiles, as a decoding model holds them
                layer.tile_for_gemv()
                our_calls.append(lambda q=layer: gemv.int_linear(x32, q.qweight, q.scales, q.group_size, q.bits))
        label = f"{scheme}{f' g{group}' if group else ''}"
        if aten_calls:
            found[f"{label} ATen packed kernel, bf16 x"] = (aten_calls, nbytes)
        if our_calls:
            found[f"{label} llmcli gemv, fp32 x"] = (our_calls, nbytes)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="768x3072,3072x768,768x50257,576x1536,1536x576")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch

    bandwidth = read_bandwidth(args.threads)
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        found = candidates(k, n)
        times = {name: [] for name in found}
        with torch.inference_mode():
            for calls, _ in found.values():
                for call in calls[:10]:
                    call()
            for rep in range(args.reps):  # interleaved: every candidate once per repetition, the next weight copy
                for name, (calls, _) in found.items():
                    call = calls[rep % len(calls)]
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
        for name, (_, nbytes) in found.items():
            median = statistics.median(times[name])
            rate = nbytes / median
            spread = statistics.quantiles(times[name], n=4)
            rows.append(f"| {k} x {n} | {name} | {1e6 * median:,.1f} ({1e6 * spread[0]:,.0f}-{1e6 * spread[2]:,.0f}) "
                        f"| {rate / 1e9:.1f} | {rate / bandwidth:.0%} |")
            print(rows[-1], file=sys.stderr, flush=True)
        del found
    record_table(
        "Single-row matrix products, torch's and llmcli's kernels (CPU): weight bytes read per second",
        f"x (1, in) through a weight in -> out, {args.threads} threads, median of {args.reps} interleaved calls "
        f"(interquartile range), each call on the next of copies of the weight totalling 256 MB of each candidate's "
        f"own bytes so that "
        f"weights stream from memory as in decode; GB/s = the layer's stored bytes (int8: int8 weight + fp32 scale "
        f"per row; int4: packed nibbles + fp32 scale per group of 32; llmcli's kernels read the scales as fp16 in "
        f"tiles of 16 rows, a tenth fewer int4 bytes) / median time; share of the read bandwidth "
        f"measured just before ({bandwidth / 1e9:.1f} GB/s, {args.threads} threads summing 512 MB). Shapes: "
        f"gpt2-small's MLP and LM head, smollm2-135m's MLP.",
        ["in x out", "kernel", "us per call (IQR)", "GB/s", "of read bandwidth"], rows, dry_run=args.no_record)


if __name__ == "__main__":
    main()
