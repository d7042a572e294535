"""llmcli against llama.cpp on the same weights, batch 1, in one run: decode at F32, BF16, Q8_0 and Q4_0 (llmcli's
int8 and int4 group 32 with the LM head quantized too) and a 256-token prefill in bf16, interleaved repetition by
repetition through `llmcli bench --compare llama.cpp`. Also the machine's read bandwidth (the threads summing a
512 MB tensor), measured again before each decode repetition (a shared machine's moves by half within minutes),
against which each side's decode weight streaming in that repetition is put. Needs llama-bench on PATH (README: Side
by side with llama.cpp). Usage:
    python benchmarks/llama_cpp.py [--models gpt2-small,smollm2-135m] [--reps 5] [--compile] [--no-record]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).parent))
from _common import record_table  # noqa: E402

CASES = (("fp32", "decode", 128), ("bf16", "decode", 128), ("int8+head", "decode", 128),
         ("int4 g32+head", "decode", 128), ("bf16", "prefill", 256))


def read_bandwidth(threads: int) -> float:
    """The machine's read bandwidth with `threads` threads, measured now (llmcli.profiling.machine)."""
    import torch

    from llmcli.profiling.machine import machine_peaks

    torch.set_num_threads(threads)
    return machine_peaks(torch.device("cpu"), "fp32", fresh=True)["read_bytes_per_s"]


@contextlib.contextmanager
def bandwidth_before_each_decode(threads: int, measured: list[float]):
    """Measures the read bandwidth before each of llmcli's decode calls (warm-up and timed; outside its timing, which
    starts at the first token) and appends it to `measured`."""
    from llmcli.profiling.bench import Runner

    decode = Runner.decode

    def measuring(self, ids, steps):
        if steps:
            measured.append(read_bandwidth(threads))
        return decode(self, ids, steps)

    with mock.patch.object(Runner, "decode", measuring):
        yield


def shares(seconds: list[float], bytes_per_run: float, bandwidths: list[float]) -> str:
    """Each repetition's bytes/s over the bandwidth measured just before it: median (min-max)."""
    values = [bytes_per_run / s / bw for s, bw in zip(seconds, bandwidths)]
    return f"{statistics.median(values):.0%} ({min(values):.0%}-{max(values):.0%})"


def quantized_dir(name: str, scheme: str, root: Path) -> Path:
    """The zoo model with random weights, quantized as `llmcli quantize --include-head` (RTN) writes it."""
    from llmcli.compression.quantize import quantize_model
    from llmcli.model_dir import QUANTIZATION_FILE, resolve_config, save_model, write_json
    from llmcli.models import build_model
    from llmcli.progress import SILENT

    config, _ = resolve_config(name)
    model = build_model(config, seed=0).eval()
    spec, _ = quantize_model(model, scheme, 32, "rtn", True, None, False, SILENT)
    directory = root / f"{name}-{scheme}"
    directory.mkdir()
    save_model(model, directory)
    write_json(directory / QUANTIZATION_FILE, spec)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="gpt2-small,smollm2-135m")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="llmcli's decode step (and blocks) via torch.compile")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch

    from llmcli.profiling.bench import run_bench

    rows, bandwidths = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for weights, mode, length in CASES:
                source, dtype = name, weights if weights in ("fp32", "bf16") else "fp32"
                if weights.startswith("int"):
                    source = str(quantized_dir(name, weights.split()[0].removesuffix("+head"), Path(tmp)))
                if args.compile:  # each case starts as its own `llmcli bench --compile` process would: no graphs
                    torch._dynamo.reset()  # of earlier cases left to look through, nor their frozen weights
                per_rep: list[float] = []
                with bandwidth_before_each_decode(args.threads, per_rep):
                    if mode != "decode":
                        per_rep.append(read_bandwidth(args.threads))
                    results, _ = run_bench(source, [mode], [1], [length], dtype, "cpu", args.reps, 2, "llama.cpp",
                                           threads=[args.threads], compile=args.compile,
                                           log=lambda m: print(m, file=sys.stderr))
                per_rep = per_rep[-args.reps:]  # the timed repetitions' (the warm-up's came first)
                bandwidths.extend(per_rep)
                bandwidth = statistics.median(per_rep)
                print(f"read bandwidth: {min(per_rep) / 1e9:.1f}-{max(per_rep) / 1e9:.1f} GB/s ({args.threads} "
                      "threads)", file=sys.stderr)
                r = results[0]
                peer = r.peer
                ratios = [theirs / ours for ours, theirs in zip(r.samples_s, peer["samples_s"])]  # per repetition
                streamed = peer_streamed = "-"
                if mode == "decode" and r.bandwidth_bytes_per_s:  # the same weights on both sides: bytes a token alike
                    run_bytes = r.bandwidth_bytes_per_s / r.tokens_per_s * length  # the bytes of `length` steps
                    theirs = r.bandwidth_bytes_per_s / r.tokens_per_s * peer["tokens_per_s"]
                    streamed = f"{r.bandwidth_bytes_per_s / 1e9:.1f} ({shares(r.samples_s, run_bytes, per_rep)})"
                    peer_streamed = f"{theirs / 1e9:.1f} ({shares(peer['samples_s'], run_bytes, per_rep)})"
                rows.append(f"| {name} | {weights} / {peer['configuration']['type'].upper()} | {mode} {length} | "
                            f"{r.tokens_per_s:,.1f} ± {r.tokens_per_s_std:,.1f} | "
                            f"{peer['tokens_per_s']:,.1f} ± {peer['tokens_per_s_std']:,.1f} | "
                            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {streamed} | "
                            f"{peer_streamed} | {bandwidth / 1e9:.1f} ({min(per_rep) / 1e9:.1f}-"
                            f"{max(per_rep) / 1e9:.1f}) |")
                print(rows[-1], file=sys.stderr, flush=True)
                build, kernels = peer["configuration"], r.provenance["decode_kernels"]
    torch.set_num_threads(args.threads)
    record_table(
        "llmcli against llama.cpp: batch-1 decode and prefill on the same weights (CPU)"
        + (", llmcli compiled" if args.compile else ""),
        f"`llmcli bench --compare llama.cpp`, {args.threads} threads on both sides, {args.reps} repetitions "
        f"interleaved (llama-bench `-r 1` per repetition, its own warm-up each call), random weights exported to "
        f"GGUF at the matching type. llmcli: "
        + ("torch.compile (`--compile`: each decode step one graph, the blocks compiled for prefill; compiled in the "
           "warm-up steps, not timed; torch.compile's caches reset before each case)" if args.compile else "eager PyTorch")
        + f", KV cache, decode's matrix products by {kernels} (int8/int4: "
        f"activations quantized to int8 per block of 32; LM head quantized too), prefill's by torch, decode: 128 "
        f"steps timed after an 8-token prompt's first token (its pass left out, as llama-bench leaves it); "
        f"llama.cpp build {build['build_commit']} ({build['backends']}, flash attention {build['flash_attn']}), "
        f"`-n 128` decode from an empty context, `-p 256` prefill. Ratio: llmcli / "
        f"llama.cpp, median of per-repetition ratios (min-max). Streamed: the weights a decode step reads times "
        f"steps/s (llama.cpp: the same bytes a token, as its GGUF holds the same weights, times its tokens/s), and "
        f"its share of the read bandwidth measured just before each repetition ({args.threads} threads summing 512 MB, "
        f"best of 5), median (min-max) over the repetitions; read bandwidth: median (min-max) of those measurements "
        f"({min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f} GB/s in this run).",
        ["model", "weights", "case", "llmcli tok/s", "llama.cpp tok/s", "llmcli / llama.cpp", "llmcli GB/s streamed",
         "llama.cpp GB/s streamed", "read bandwidth GB/s"],
        rows, dry_run=args.no_record)


if __name__ == "__main__":
    main()
