"""LoRA (Hu et al. 2021): y = W x + (alpha / r) · B A x, with W frozen, A (r × in) and B (out × r) trained.

A wraps an existing nn.Linear in place. The wrapper keeps the linear's own `weight` and `bias`
(same state-dict names as before), so a LoRA model's base tensors load and save unchanged, and
`merge_lora` gives back plain nn.Linear layers holding W + (alpha / r) · B A.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.errors import UserError
from llmcli.models.layout import PROJECTIONS, block_linears, set_submodule
from llmcli.models.quantized import QuantizedLinear

DEFAULT_TARGETS = ("q", "v")  # Hu et al. 2021, sec. 7.1: adapting W_q and W_v works best for a fixed budget


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trained low-rank update. The frozen layer may be a QuantizedLinear (QLoRA,
    Dettmers et al. 2023): it is then kept whole as `base`, its integers untouched, the update in float."""

    def __init__(self, base: nn.Linear | QuantizedLinear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, QuantizedLinear):
            self.base, self.weight, self.bias = base, None, None
            like = dict(device=base.scales.device, dtype=base.scales.dtype)
        else:
            self.base, self.weight = None, base.weight
            self.register_parameter("bias", base.bias)
            like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))  # zero: training starts at W
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init (and the paper's code)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        frozen = self.base(x) if self.base is not None else F.linear(x, self.weight, self.bias)
        return frozen + self.scaling * update

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B A, the (out × in) update that merging adds to W."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def merged(self) -> nn.Linear:
        if self.base is not None:
            raise ValueError("a quantized base has no float weight to fold the update into")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(text: str | list[str]) -> list[str]:
    """'q,v' -> ['q', 'v'], in the canonical order of PROJECTIONS."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown or not names:
        what = f"unknown target {unknown[0]!r}" if unknown else "no targets"
        raise UserError(f"--lora-targets {','.join(names)!r}: {what}; "
                        f"use a comma-separated list of {', '.join(PROJECTIONS)}")
    return [t for t in PROJECTIONS if t in names]


def lora_sites(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """Every target projection by name, in self- and cross-attention and feed-forward."""
    sites = {name: layer for name, layer in block_linears(model, targets).items()
             if isinstance(layer, (nn.Linear, QuantizedLinear, LoRALinear))}
    found = {name.rsplit(".", 1)[-1] for name in sites}
    missing = [t for t in targets if PROJECTIONS[t] not in found]
    if missing:
        raise UserError(f"--lora-targets {missing[0]}: this model has no {PROJECTIONS[missing[0]]} projection "
                        f"(gate exists only with gated activations such as swiglu); choose other targets")
    return sites


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> int:
    """Wrap the target projections in LoRALinear; returns how many were wrapped."""
    if rank <= 0:
        raise UserError(f"--lora-rank must be positive, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--lora-dropout must be in [0, 1), got {dropout}")
    sites = lora_sites(model, targets)
    for name, layer in sites.items():
        set_submodule(model, name, LoRALinear(layer, rank, alpha, dropout))
    return len(sites)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + (alpha / r) · B A (in place)."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, attr, child.merged())
    return model
