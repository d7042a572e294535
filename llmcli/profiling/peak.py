"""Peak memory of a piece of work, measured one way for `bench` and `memory-estimate --measure`.

- CUDA: torch.cuda.max_memory_allocated() above the allocation at the start: live tensors, not the caching
  allocator's reserve nor the CUDA context.
- CPU: the process's peak resident memory (VmHWM, reset at the start through /proc/self/clear_refs) less its
  file-backed and shared pages (the code of torch's libraries), above the anonymous memory at the start.
  Freed memory is handed back to the OS first (malloc_trim), so that the start is honest.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc

import torch


def memory_in_use(device: torch.device) -> int:
    """Bytes held now: allocated CUDA memory, or this process's anonymous resident memory."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status()["RssAnon"]


def reset_peak(device: torch.device) -> None:
    """Start a new peak from what is held now."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # the peak then also covers what ran before


def peak_memory(device: torch.device) -> int:
    """The most bytes held since reset_peak, on the same scale as memory_in_use."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    status = _status()
    return status["VmHWM"] - status["RssFile"] - status.get("RssShmem", 0)


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`, then `peak.peak`: the bytes the block added at its highest."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        reset_peak(self.device)
        self.start = memory_in_use(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(0, peak_memory(self.device) - self.start)


def _status() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return fields
