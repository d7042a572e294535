"""The CPU this runs on: its name and the vector and matrix features that decide which kernels can run.

Read at run time, never assumed: AMD EPYC with AVX2 only, AMD EPYC with AVX-512 (VNNI, BF16) and Intel Xeon
with AMX have all run llmcli, and torch's x86 kernels take different code on each.
"""

from __future__ import annotations

import functools
import platform

import torch

# /proc/cpuinfo flag -> the name a reader knows, in the order kernels grew (x86, then Arm)
NAMED_FLAGS = {
    "avx2": "AVX2", "fma": "FMA", "avx_vnni": "AVX-VNNI", "avx512f": "AVX-512", "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX-512-VNNI", "avx512_bf16": "AVX-512-BF16", "avx512_fp16": "AVX-512-FP16",
    "amx_tile": "AMX", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8",
    "asimd": "NEON", "asimddp": "NEON-DOT", "i8mm": "I8MM", "bf16": "BF16", "sve": "SVE", "sve2": "SVE2",
}


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The kernel's flags for the first CPU (x86 `flags`, Arm `Features`); empty where /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_features() -> list[str]:
    """The kernel-relevant features this CPU has, by their usual names: e.g. ['AVX2', 'FMA', 'AVX-512', ...]."""
    flags = cpu_flags()
    return [name for flag, name in NAMED_FLAGS.items() if flag in flags]


def aten_capability() -> str:
    """Which of its vector builds torch dispatches to here (DEFAULT, AVX2, AVX512; ATEN_CPU_CAPABILITY lowers it)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "unknown"


def describe_cpu() -> str:
    """One line: the model, its features and torch's dispatch, e.g. for a log header or a figure's caption."""
    features = " ".join(cpu_features()) or "no vector features read"
    return f"{cpu_model()}; {features}; torch dispatch {aten_capability()}"
