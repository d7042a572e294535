"""AdamW with decay on matrices only, and linear warm-up then cosine decay."""

from __future__ import annotations

import math

import torch


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.95), foreach: bool = True,
                   fused: bool = True) -> torch.optim.AdamW:
    """Weight decay only on 2-D weights (linear and embedding matrices), never on biases or norms,
    as in nanoGPT's configure_optimizers; betas (0.9, 0.95) as in GPT-3 (Brown et al. 2020, B).

    fused: torch's fused AdamW kernel where it runs (float parameters on CPU or CUDA): one pass per
    tensor, no multi-tensor temporaries (measured 6x faster than foreach on this CPU). Processes under
    torchrun pass fused=False; foreach=False for tensor parallelism: its parameters mix DTensors and
    plain tensors (or meshes), which one multi-tensor kernel call cannot take."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if fused and params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=foreach)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
