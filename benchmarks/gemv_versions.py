"""llmcli's decode products at this checkout against another commit's gemv.cpp, in one process: the other source is
built under its own op namespace (`llmcli_base`), both run the same random weights (fp32, bf16, int8 or int4 g32) in
the shapes of a model's layers (smollm2-135m or gpt2-small; each shape copied until the copies fill 96 MB, three
times the L3 of the machines we see, and the copies held in one 2 MB-page buffer as a decoding model holds its
weights (gemv.gather_weights), so that they stream from memory as in a decode step) and a hot case (one MLP call
read again and again, in cache), interleaved repetition by repetition; the two outputs are checked to agree. Each
side makes the call a model makes at its commit: float weights through `linear` (x in the weights' dtype); ours
reads int8 and int4 in the tile bodies' layout with fp16 scales (models.quantized's tile_for_kernels; the random
scales are fp16 values, as symmetric_scales gives); the base's reads tiles with fp32 scales where its source has the
op for them (`linear_int_tiles`, or int4's `linear_int4_tiles`), else row-major bytes (`linear_int`). Usage:
    python benchmarks/gemv_versions.py [--base HEAD~1] [--kinds int4,int8,bf16,fp32] [--model smollm2-135m]
        [--threads 2] [--reps 15] [--isa 1|2] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# per model: name, K, the N of each matrix of one call, whether it streams (copies filling STREAMED bytes) or stays
# in cache
SHAPES = {
    "smollm2-135m": (("q, k, v", 576, [576, 192, 192], True), ("o", 576, [576], True),
                     ("gate, up", 576, [1536, 1536], True), ("down", 1536, [576], True),
                     ("LM head", 576, [49152], True), ("gate, up in cache", 576, [1536, 1536], False)),
    "gpt2-small": (("q, k, v", 768, [768, 768, 768], True), ("o", 768, [768], True), ("fc", 768, [3072], True),
                   ("proj", 3072, [768], True), ("LM head", 768, [50257], True), ("fc in cache", 768, [3072], False)),
}
STREAMED = 96 * 2**20


def build_base(revision: str, directory: Path):
    """The revision's gemv.cpp as ops under torch.ops.llmcli_base."""
    from torch.utils.cpp_extension import load

    source = subprocess.run(["git", "show", f"{revision}:llmcli/models/gemv.cpp"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    source = source.replace("TORCH_LIBRARY(llmcli,", "TORCH_LIBRARY(llmcli_base,")
    source = source.replace("TORCH_LIBRARY_IMPL(llmcli,", "TORCH_LIBRARY_IMPL(llmcli_base,")
    (directory / "gemv_base.cpp").write_text(source)
    load("llmcli_gemv_base", [str(directory / "gemv_base.cpp")], extra_cflags=["-O3", "-fopenmp"],
         extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False)


def operands(kind: str, K: int, sizes: list[int], generator):
    """One call's weights: (float matrices, None, None) or (int8/int4 bytes, scales, group), row-major."""
    import torch

    if kind in ("fp32", "bf16"):
        dtype = torch.float32 if kind == "fp32" else torch.bfloat16
        return [(torch.randn(n, K, generator=generator) * 0.05).to(dtype) for n in sizes], None, None
    bits = int(kind[3:])

    def scales(n, groups):  # fp16 values, as symmetric_scales gives
        return torch.rand(n, groups, generator=generator).half().float()

    if bits == 4:
        return ([torch.randint(0, 256, (n, K // 2), dtype=torch.uint8, generator=generator) for n in sizes],
                [scales(n, K // 32) for n in sizes], 32)
    return ([torch.randint(-127, 128, (n, K), dtype=torch.int8, generator=generator) for n in sizes],
            [scales(n, 1) for n in sizes], K)


def tile_operands(call, bits: int, fp16_scales: bool):
    """A call's operands in the tile bodies' layout, the scales fp32 or as this checkout's model holds them."""
    from llmcli.models.quantized import tile_for_kernels, tile_rows

    if call[1] is None:  # float weights: row-major as they are
        return call
    tile = tile_for_kernels if fp16_scales else tile_rows
    tiles = [tile(q, s, bits) for q, s in zip(call[0], call[1])]
    return [q for q, _ in tiles], [s for _, s in tiles], call[2]


def call(namespace, kind: str, isa: int):
    """(op(x, weights, scales, group), whether it reads tiles) for the commit built as `namespace`: the call its
    model makes."""
    if kind in ("fp32", "bf16"):
        return (lambda x, w, s, group: namespace.linear.default(x, w, None, isa)), False
    bits = int(kind[3:])
    if hasattr(namespace, "linear_int_tiles"):
        return (lambda x, q, s, group: namespace.linear_int_tiles.default(x, q, s, group, bits, isa)), True
    if bits == 4 and hasattr(namespace, "linear_int4_tiles"):
        return (lambda x, q, s, group: namespace.linear_int4_tiles.default(x, q, s, group, isa)), True
    return (lambda x, q, s, group: namespace.linear_int.default(x, q, s, group, bits, isa)), False


def held_as_decode(calls: list):
    """Move the calls' tensors (in place: the same tensor objects) into one buffer of 2 MB pages, in call order, as
    gemv.gather_weights holds a decoding model's weights; returns the buffer, to be kept while they are used."""
    import torch.nn as nn

    from llmcli.models.gemv import gather_weights

    holder = nn.Module()
    tensors = list({id(t): t for c in calls for part in c[:2] if part is not None for t in part}.values())
    for i, t in enumerate(tensors):
        holder.register_buffer(f"t{i}", t)
    return gather_weights(holder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="HEAD~1")
    parser.add_argument("--kinds", default="int4,int8,bf16,fp32")
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--isa", type=int, choices=(1, 2), help="the body both sides run: 1 AVX2, 2 AVX-512 "
                        "(default: the one this CPU runs)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch

    from llmcli.models import gemv

    if gemv.extension() is None or "int" not in gemv.LEVELS:
        sys.exit("llmcli's kernels did not load here")
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        build_base(args.base, Path(tmp))
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for kind in args.kinds.split(","):
        level = args.isa or gemv.LEVELS["int" if kind.startswith("int") else kind]
        bits = int(kind[3:]) if kind.startswith("int") else None
        ours, _ = call(torch.ops.llmcli, kind, level)
        theirs, base_tiled = call(torch.ops.llmcli_base, kind, level)
        for name, K, sizes, streams in SHAPES[args.model]:
            first = operands(kind, K, sizes, generator)
            nbytes = sum(t.numel() * t.element_size() for part in first[:2] if part is not None for t in part)
            copies = -(-STREAMED // nbytes) if streams else 1
            calls = [first, *(operands(kind, K, sizes, generator) for _ in range(copies - 1))]
            mine = [tile_operands(each, bits, True) for each in calls]
            their_calls = [tile_operands(each, bits, False) for each in calls] if base_tiled else calls
            arena = held_as_decode(mine + their_calls)  # float weights: the same tensors on both sides
            x = torch.randn(1, K, generator=generator).to(torch.bfloat16 if kind == "bf16" else torch.float32)
            torch.testing.assert_close(ours(x, *mine[0]), theirs(x, *their_calls[0]), rtol=1e-4, atol=1e-2)
            inner = 1 if streams else 20
            times = {"ours": [], "base": []}
            for _ in range(args.reps):
                for label, op, each in (("ours", ours, mine), ("base", theirs, their_calls)):
                    start = time.perf_counter()
                    for _ in range(inner):
                        for w, s, group in each:
                            op(x, w, s, group)
                    times[label].append((time.perf_counter() - start) / (copies * inner))
            del arena, calls, mine, their_calls
            speedups = [b / o for o, b in zip(times["ours"], times["base"])]
            rate = {label: nbytes / statistics.median(t) / 1e9 for label, t in times.items()}
            rows.append(f"| {kind} | {name} ({nbytes / 1e3:,.0f} KB) | {rate['ours']:.1f} | {rate['base']:.1f} | "
                        f"{statistics.median(speedups):.2f}x ({min(speedups):.2f}-{max(speedups):.2f}) |")
            print(rows[-1], file=sys.stderr, flush=True)
    record_table(
        f"Decode products: this commit's kernels against {base}'s",
        f"`python benchmarks/gemv_versions.py --base {args.base} --model {args.model}"
        f"{' --isa 1' if args.isa == 1 else ''}`: one activation row against fp32, bf16, int8 or int4 (group 32) "
        f"weights in {args.model}'s shapes (copies of each filling {STREAMED >> 20} MB in 2 MB pages: streamed from "
        f"memory; the last row one call read 20 times over, in cache), {args.threads} threads, {args.reps} "
        f"repetitions interleaved; the bodies run: {'AVX2 on both sides' if args.isa == 1 else gemv.kernel_name()}. "
        f"GB/s: weight and scale bytes over the median time; speedup: the base's time over ours, median of the "
        f"repetitions (min-max).",
        ["weights", "call", "ours GB/s", f"{base} GB/s", "speedup"], rows, dry_run=args.no_record)


if __name__ == "__main__":
    main()
