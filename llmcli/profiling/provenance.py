"""Where a measurement was made: llmcli and torch versions, git commit, device, CPU and its features, threads, time.

Every bench row carries this, so that a figure copied out of its run still says how it was obtained.
"""

from __future__ import annotations

import datetime
import functools
import subprocess
from pathlib import Path

import torch

from llmcli import __version__
from llmcli.cpu import aten_capability, cpu_features, cpu_model
from llmcli.models.gemv import kernel_name


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the llmcli checkout this runs from (None for an installed wheel), '+' if modified."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():  # an installed package: not a checkout of its own
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def provenance(device: torch.device) -> dict:
    return {"llmcli_version": __version__, "git_commit": git_commit(), "torch_version": torch.__version__,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
            "cpu_model": cpu_model(), "cpu_features": cpu_features(),
            "torch_cpu_dispatch": aten_capability(), "threads": torch.get_num_threads(),
            "decode_kernels": kernel_name() if device.type == "cpu" else "torch",
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
