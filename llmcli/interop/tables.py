"""The vocabulary of the Hugging Face interop tables: a Rule pairs llmcli tensor names with one Hugging Face
tensor, a Family holds everything that differs between architectures. Each architecture's table is a module of
its own (gpt2, bert, t5, llama); llmcli.interop.hf reads them, in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from llmcli.config import ModelConfig

@dataclass(frozen=True)
class Rule:
    """One Hugging Face tensor and the llmcli tensor(s) it holds.

    Several llmcli names: HF fuses them along the output dimension (GPT-2's c_attn holds q, k, v), in equal
    parts or in `sizes` (Phi-3's qkv_proj under grouped-query attention).
    conv1d: HF stores the weight as (in, out), the layout of GPT-2's Conv1D.
    """

    ours: tuple[str, ...]
    hf: str
    conv1d: bool = False
    sizes: tuple[int, ...] | None = None

    def to_ours(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.conv1d and tensor.dim() == 2:
            tensor = tensor.t()
        parts = tensor.split(list(self.sizes)) if self.sizes else tensor.chunk(len(self.ours))
        return {name: part.contiguous() for name, part in zip(self.ours, parts)}

    def to_hf(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        tensor = torch.cat([state[name] for name in self.ours])
        if self.conv1d and tensor.dim() == 2:
            tensor = tensor.t()
        return tensor.contiguous()


def params(ours: str | tuple[str, ...], hf: str, bias: bool = True, conv1d: bool = False,
           sizes: tuple[int, ...] | None = None) -> list[Rule]:
    """The weight (and bias) of one layer; a tuple of llmcli layers is one fused HF layer."""
    layers = (ours,) if isinstance(ours, str) else ours
    kinds = ("weight", "bias") if bias else ("weight",)
    return [Rule(tuple(f"{layer}.{kind}" for layer in layers), f"{hf}.{kind}", conv1d, sizes) for kind in kinds]


def stack(ours: str, hf: str, n_layers: int, block: list[Rule]) -> list[Rule]:
    """A block table repeated for layers 0 .. n_layers-1 under the two prefixes."""
    return [Rule(tuple(f"{ours}{i}.{name}" for name in rule.ours), f"{hf}{i}.{rule.hf}", rule.conv1d, rule.sizes)
            for i in range(n_layers) for rule in block]


@dataclass(frozen=True)
class Family:
    """Everything that differs between the architectures; the conversion code (llmcli.interop.hf) is shared."""

    family: str  # llmcli family
    model_type: str  # HF config.json model_type
    architecture: str  # what to-hf writes
    reads: tuple[str, ...]  # architectures from-hf accepts
    base_prefix: str  # where the bare base model's tensors sit inside `architecture`
    rules: Callable[[ModelConfig], list[Rule]]
    # (llmcli field, HF key, HF default): HF's config.json may leave defaults out.
    fields: tuple[tuple[str, str, Any], ...]
    activation_key: str
    activation_default: str
    # HF activation -> llmcli; to-hf writes the first HF name listed for an activation.
    activations: dict[str, str]
    fixed: dict[str, Any]  # HF options llmcli models have only one way (e.g. GPT-2 always scales attention)
    requires: dict[str, Any]  # llmcli fields the HF class cannot change
    emb_key: str  # HF token embedding
    head_key: str  # HF output projection, when not tied to the embedding
    ignored: str  # regex: HF tensors that hold nothing of their own (buffers, tied copies)
    # HF tensors kept twice, copy -> original: the copy is what HF's forward reads, and it is
    # separate when the embeddings are untied (transformers 5), so from-hf prefers it and to-hf writes both.
    copies: dict[str, str] = field(default_factory=dict)
    dropped: str = r"^$"  # regex: heads llmcli has no place for, dropped with a warning
    fresh: tuple[str, ...] = ()  # llmcli prefixes that may be missing: initialised afresh, with a warning
    free_head_size: bool = False  # d_head may differ from d_model / n_heads
    head_rescaled: bool = False  # T5: a tied head also rescales by d_model**-0.5 (llmcli ties the two)
    extra_from_hf: Callable[[dict, dict, str], dict] = lambda hf, state, where: {}  # where: for error messages
    extra_to_hf: Callable[[ModelConfig], dict] = lambda cfg: {}
    refuse: Callable[[dict, str], None] = lambda hf, where: None  # raises on config features llmcli lacks
    grouped_query: bool = False  # num_key_value_heads < num_attention_heads can be written
    misfit: Callable[[ModelConfig], str | None] = lambda cfg: None  # why its biases or windows do not fit
    moe: bool = False  # its feed-forwards are mixtures of experts
