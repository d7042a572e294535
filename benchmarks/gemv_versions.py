"""llmcli's integer decode products at this checkout against another commit's gemv.cpp, in one process: the other
source is built under its own op namespace (`llmcli_base`), both run the same random weights in the shapes of
smollm2-135m's layers (each shape copied until the copies fill 96 MB, three times the L3 of the machines we see, so
that they stream from memory as in a decode step) and a hot case (one gate/up pair read again and again, in cache),
interleaved repetition by repetition; the two outputs are checked to agree. Each side makes the call a model makes
at its commit: ours reads int8 and int4 in the tile bodies' layout with fp16 scales (models.quantized's
tile_for_kernels; the random scales are fp16 values, as symmetric_scales gives); the base's reads tiles with fp32
scales where its source has the op for them (`linear_int_tiles`, or int4's `linear_int4_tiles`), else row-major
bytes (`linear_int`). Usage:
    python benchmarks/gemv_versions.py [--base HEAD~1] [--bits 4,8] [--threads 2] [--reps 15] [--isa 1|2] [--no-record]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# name, K, the N of each matrix of one call, whether it streams (copies filling STREAMED bytes) or stays in cache
SHAPES = (("q, k, v", 576, [576, 192, 192], True), ("o", 576, [576], True), ("gate, up", 576, [1536, 1536], True),
          ("down", 1536, [576], True), ("LM head", 576, [49152], True), ("gate, up in cache", 576, [1536, 1536], False))
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


def operands(bits: int, K: int, sizes: list[int], generator):
    import torch

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

    tile = tile_for_kernels if fp16_scales else tile_rows
    tiles = [tile(q, s, bits) for q, s in zip(call[0], call[1])]
    return [q for q, _ in tiles], [s for _, s in tiles], call[2]


def call(namespace, bits: int, isa: int):
    """(op, whether it reads tiles) for the commit built as `namespace`: the call its model makes."""
    if hasattr(namespace, "linear_int_tiles"):
        return functools.partial(namespace.linear_int_tiles.default, isa=isa), True
    if bits == 4 and hasattr(namespace, "linear_int4_tiles"):
        return (lambda x, q, s, group, bits: namespace.linear_int4_tiles.default(x, q, s, group, isa)), True
    return functools.partial(namespace.linear_int.default, isa=isa), False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="HEAD~1")
    parser.add_argument("--bits", default="4,8")
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
    level = args.isa or gemv.LEVELS["int"]
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        build_base(args.base, Path(tmp))
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for bits in map(int, args.bits.split(",")):
        ours, _ = call(torch.ops.llmcli, bits, level)
        theirs, base_tiled = call(torch.ops.llmcli_base, bits, level)
        for name, K, sizes, streams in SHAPES:
            first = operands(bits, K, sizes, generator)
            nbytes = sum(t.numel() * t.element_size() for t in [*first[0], *first[1]])
            copies = -(-STREAMED // nbytes) if streams else 1
            calls = [first, *(operands(bits, K, sizes, generator) for _ in range(copies - 1))]
            mine = [tile_operands(each, bits, True) for each in calls]
            their_calls = [tile_operands(each, bits, False) for each in calls] if base_tiled else calls
            x = torch.randn(1, K, generator=generator)
            torch.testing.assert_close(ours(x, *mine[0], bits=bits), theirs(x, *their_calls[0], bits=bits),
                                       rtol=1e-4, atol=1e-2)
            inner = 1 if streams else 20
            times = {"ours": [], "base": []}
            for _ in range(args.reps):
                for label, op, each in (("ours", ours, mine), ("base", theirs, their_calls)):
                    start = time.perf_counter()
                    for _ in range(inner):
                        for q, s, group in each:
                            op(x, q, s, group, bits=bits)
                    times[label].append((time.perf_counter() - start) / (copies * inner))
            speedups = [b / o for o, b in zip(times["ours"], times["base"])]
            rate = {label: nbytes / statistics.median(t) / 1e9 for label, t in times.items()}
            rows.append(f"| int{bits} | {name} ({nbytes / 1e3:,.0f} KB) | {rate['ours']:.1f} | {rate['base']:.1f} | "
                        f"{statistics.median(speedups):.2f}x ({min(speedups):.2f}-{max(speedups):.2f}) |")
            print(rows[-1], file=sys.stderr, flush=True)
    record_table(
        f"Integer decode products: this commit's kernels against {base}'s",
        f"`python benchmarks/gemv_versions.py --base {args.base}{' --isa 1' if args.isa == 1 else ''}`: one "
        f"activation row against int4 (group 32) or int8 weights in smollm2-135m's shapes (copies of each filling "
        f"{STREAMED >> 20} MB: streamed from memory; the last row one pair read 20 times over, in cache), "
        f"{args.threads} threads, {args.reps} repetitions interleaved; the body run: "
        f"{'AVX2 on both sides' if level == 1 else gemv.kernel_name()}. GB/s: weight and scale bytes over the "
        f"median time; "
        f"speedup: the base's time over ours, median of the repetitions (min-max).",
        ["weights", "call", "ours GB/s", f"{base} GB/s", "speedup"], rows, dry_run=args.no_record)


if __name__ == "__main__":
    main()
