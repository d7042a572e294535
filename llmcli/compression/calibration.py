"""Calibration passes shared by GPTQ and Wanda/head pruning: run batches with forward hooks attached.

With `stop_after`, each forward stops once that module has run, so block-by-block calibration does
not pay for the layers after the block being calibrated.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from llmcli.runtime import model_outputs


class _StopForward(Exception):
    """Raised by the hook on `stop_after`: the rest of the model is not needed."""


def _stop_forward(module, args, output):
    raise _StopForward


@torch.no_grad()
def run_calibration(model: nn.Module, batches: list[dict], device: torch.device, hooks: list,
                    stop_after: nn.Module | None = None, advance: Callable[[], None] = lambda: None) -> None:
    """Run `batches` through the model in eval mode with `hooks` (handles) attached; removes them after."""
    if stop_after is not None:
        hooks = [*hooks, stop_after.register_forward_hook(_stop_forward)]
    try:
        model.eval()
        for batch in batches:
            with contextlib.suppress(_StopForward):
                model_outputs(model, {k: v.to(device) for k, v in batch.items()})
            advance()
    finally:
        for handle in hooks:
            handle.remove()
