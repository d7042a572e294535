"""The machine's measured peaks, against which bench puts its figures: matmul FLOP/s in the dtype a case runs in,
and the memory's read bandwidth. Measured once per machine (CPU or GPU, its features, torch, threads) and cached
in the user's cache directory with where and when they were measured; `fresh=True` measures again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from llmcli.config import user_cache_dir
from llmcli.cpu import cpu_features, cpu_model
from llmcli.profiling.provenance import provenance
from llmcli.runtime import torch_dtype

MATMUL_N = {"cpu": 1024, "cuda": 4096}
READ_BYTES = {"cpu": 512 * 2**20, "cuda": 2 * 2**30}  # far above the last-level cache


def cache_file() -> Path:
    return user_cache_dir() / "machine_peaks.json"


def machine_peaks(device: torch.device, dtype: str = "fp32", fresh: bool = False) -> dict:
    """matmul_flops (in `dtype`; CUDA measures bf16 for fp32 as its tensor cores run it), read_bytes_per_s (a sum
    over a tensor far above the caches), copy_bytes_per_s (read + write), with the current thread count."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    key = (f"{name} | {','.join(cpu_features())} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
           f"{dtype}")
    cache = _read(cache_file())
    if not fresh and key in cache:
        return cache[key]
    peaks = _measure(device, dtype)
    peaks["measured"] = provenance(device)
    cache[key] = peaks
    _write(cache_file(), cache)
    return peaks


def _measure(device: torch.device, dtype: str) -> dict:
    compute = torch.bfloat16 if device.type == "cuda" and dtype == "fp32" else torch_dtype(dtype)
    n = MATMUL_N[device.type]
    a, b = (torch.randn(n, n, device=device, dtype=compute) for _ in range(2))
    matmul = _best_time(lambda: a @ b, device)
    data = torch.ones(READ_BYTES[device.type] // 4, device=device)
    read = _best_time(lambda: data.sum(), device)
    src = data[:data.numel() // 8]
    dst = torch.empty_like(src)
    copy = _best_time(lambda: dst.copy_(src), device)
    return {"device": str(device), "matmul_dtype": str(compute).replace("torch.", ""),
            "matmul_flops": 2 * n**3 / matmul, "read_bytes_per_s": data.numel() * 4 / read,
            "copy_bytes_per_s": 2 * src.numel() * 4 / copy}


def _best_time(fn: Callable, device: torch.device, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    """Atomically; a cache that cannot be written (a read-only home) only costs measuring again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass
