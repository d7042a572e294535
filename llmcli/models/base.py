"""What the three families have in common: the output type, weight init and parameter counting."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from llmcli.config import ModelConfig
from llmcli.models.blocks import Attention, FeedForward, RMSNorm


@dataclass
class ModelOutput:
    logits: torch.Tensor  # LM-head logits: GPT next token, BERT MLM, T5 decoder
    hidden_states: torch.Tensor  # final hidden states before the head
    pooled: torch.Tensor | None = None  # BERT pooler output
    encoder_hidden_states: torch.Tensor | None = None  # T5


class LanguageModel(nn.Module):
    """Base of BERT, GPT and T5."""

    # Parameter-name prefixes of task heads that published counts leave out (BERT's MLM transform).
    head_prefixes: tuple[str, ...] = ()
    # hidden, embedding -> logits when the head is tied; models.gemv.prepare_for_decode swaps in its kernels
    tied_head = staticmethod(nn.functional.linear)
    decode_forward = None  # forward for decode steps where runtime.compile_decode compiled one

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def num_parameters(self, include_heads: bool = True) -> int:
        return sum(p.numel() for name, p in self.named_parameters()
                   if include_heads or not name.startswith(self.head_prefixes))

    def embedding_parameters(self) -> int:
        """Token and learned position embeddings: what Kaplan et al. 2020 leave out of N."""
        return sum(m.weight.numel() for name, m in self.named_modules()
                   if isinstance(m, nn.Embedding) and (name.endswith("tok_emb") or name.endswith("pos_emb")))

    def init_weights(self) -> None:
        """GPT-2's scheme: N(0, 0.02), zero biases, residual output projections scaled by 1/sqrt(2L)."""
        depth = self.config.n_layers + (self.config.n_decoder_layers or 0)
        residual_std = 0.02 / math.sqrt(2 * depth)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                (nn.init.zeros_ if getattr(module, "unit_offset", False) else nn.init.ones_)(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            if isinstance(module, Attention):
                nn.init.normal_(module.o_proj.weight, 0.0, residual_std)
            if isinstance(module, FeedForward):
                nn.init.normal_(module.down.weight, 0.0, residual_std)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.tie_embeddings:
            logits = self.tied_head(hidden, self.tok_emb.weight)
        else:
            logits = self.lm_head(hidden)
        divisor, cap = self.config.logits_divisor, self.config.logits_softcap
        in_place = not torch.is_grad_enabled()  # a prefill's logits are the largest tensor of inference
        if divisor != 1.0:  # Granite
            logits = logits.div_(divisor) if in_place else logits / divisor
        if cap is not None:  # Gemma 2: c·tanh(logits / c)
            logits = logits.div_(cap).tanh_().mul_(cap) if in_place else torch.tanh(logits / cap) * cap
        return logits
