"""Bottleneck adapters (Houlsby et al. 2019): h -> h + up(act(down(h))), after attention and after feed-forward.

Each block gets `attn_adapter` and `ff_adapter` submodules, applied by forward hooks on the block's
`attn` and `ff` outputs: before dropout and the residual add (and, in post-norm BERT, before the
norm), where the paper puts them. The model classes are not touched and the base tensors keep their names.

Unlike the paper, the layer norms stay frozen: the adapter file then holds only adapter weights, and
the base model is bit-identical after training.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.errors import UserError
from llmcli.models.layout import blocks


class Adapter(nn.Module):
    """d_model -> size -> d_model with a residual; `up` starts at zero, so a new adapter is the identity."""

    def __init__(self, d_model: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, size)
        self.up = nn.Linear(size, d_model)
        nn.init.normal_(self.down.weight, 0.0, 0.02)  # near-identity init (Houlsby et al. 2019, sec. 2.1)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """A forward hook: replaces the hooked module's output by the adapter's."""
        return self(output)


def add_adapters(model: nn.Module, size: int) -> int:
    """Give every block an adapter after its attention and after its feed-forward; returns the count added."""
    if size <= 0:
        raise UserError(f"--adapter-size must be positive, got {size}")
    in_model = list(blocks(model).values())
    for block in in_model:
        d_model = block.attn.o_proj.out_features
        like = next(p for p in block.parameters() if p.is_floating_point())  # o_proj may hold integers
        block.attn_adapter = Adapter(d_model, size).to(like.device, like.dtype)
        block.ff_adapter = Adapter(d_model, size).to(like.device, like.dtype)
        block.attn.register_forward_hook(block.attn_adapter.hook)
        block.ff.register_forward_hook(block.ff_adapter.hook)
    return 2 * len(in_model)
