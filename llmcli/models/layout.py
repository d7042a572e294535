"""Where things are inside a built model: its blocks, the blocks' linear layers, and which block a
parameter or module name belongs to.

Quantization, pruning, LoRA, the memory estimate, distillation and tensor parallelism all ask these
questions; this is the one place that answers them.

The projections go by the short names of `--lora-targets`: q, k, v, o (self- and, in T5's decoder,
cross-attention) and up, gate, down (feed-forward; gate only with swiglu/geglu).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from llmcli.models.blocks import Attention, Block, FeedForward

# short name -> the attribute of Attention / FeedForward that holds the projection
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "up": "up", "gate": "gate", "down": "down"}
ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
FEED_FORWARD_PROJECTIONS = ("up", "gate", "down")
# split by output features for tensor parallelism (each rank whole heads); the others by input features
COLUMN_PARALLEL = ("q", "k", "v", "up", "gate")

_BLOCK_NAME = re.compile(r"^(?P<stack>(?:.+\.)?blocks)\.(?P<index>\d+)(?:\.(?P<rest>.+))?$")


def blocks(model: nn.Module) -> dict[str, Block]:
    """Every transformer block by name, encoder before decoder: the order activations flow through them."""
    return {name: module for name, module in model.named_modules() if isinstance(module, Block)}


def block_linears(model: nn.Module, targets: tuple[str, ...] | list[str] | None = None) -> dict[str, nn.Module]:
    """The projections of the blocks (all seven kinds, or only `targets`), by name, in forward order.

    Names are relative to `model` ("decoder.blocks.0.attn.q_proj"), so a Block gives "attn.q_proj". The
    values are whatever sits there: nn.Linear, or a LoRA or quantized layer that replaced it.
    """
    wanted = set(PROJECTIONS) if targets is None else set(targets)
    found = {}
    for name, module in model.named_modules():
        kinds = (ATTENTION_PROJECTIONS if isinstance(module, Attention)
                 else FEED_FORWARD_PROJECTIONS if isinstance(module, FeedForward) else ())
        for kind in kinds:
            layer = getattr(module, PROJECTIONS[kind])
            if kind in wanted and layer is not None:
                found[f"{name}.{PROJECTIONS[kind]}" if name else PROJECTIONS[kind]] = layer
    return found


def projection_kind(name: str) -> str:
    """'decoder.blocks.0.attn.q_proj' -> 'q'."""
    attribute = name.rsplit(".", 1)[-1]
    return next(kind for kind, attr in PROJECTIONS.items() if attr == attribute)


def split_block_name(name: str) -> tuple[str, int, str] | None:
    """'decoder.blocks.3.attn.q_proj' -> ('decoder.blocks', 3, 'attn.q_proj'); None outside the blocks."""
    match = _BLOCK_NAME.match(name)
    return (match["stack"], int(match["index"]), match["rest"] or "") if match else None


def block_of(name: str) -> str | None:
    """'decoder.blocks.3.attn.q_proj' -> 'decoder.blocks.3'; None for names outside the blocks (heads)."""
    parts = split_block_name(name)
    return f"{parts[0]}.{parts[1]}" if parts else None


def stack_depths(names) -> dict[str, int]:
    """Blocks per stack ('decoder.blocks': 12, ...) from parameter or module names."""
    depths: dict[str, int] = {}
    for name in names:
        parts = split_block_name(name)
        if parts:
            depths[parts[0]] = max(depths.get(parts[0], 0), parts[1] + 1)
    return depths


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` (replacing what was there)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def store_matrices_transposed(model: nn.Module, transposed: bool = True) -> nn.Module:
    """Keep every linear and embedding matrix W (out x in) as the transposed view of a contiguous (in x out)
    tensor, or back (transposed=False). Values, names and the saved state dict are unchanged; only the order in
    memory differs. A single-token matmul x·Wᵀ then reads W the way BLAS's fast kernel wants: on this AVX2 CPU
    gpt2-small decodes 1.30x faster (benchmarks/speed_parts.py in RESULTS.md). In place: the
    Parameter objects stay (an optimizer holding them keeps working)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.dim() == 2:
                weight = module.weight
                if weight.is_contiguous() == transposed:  # not yet in the wanted order
                    weight.data = weight.data.t().contiguous().t() if transposed else weight.data.contiguous()
    return model
