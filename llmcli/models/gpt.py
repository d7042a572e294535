"""GPT: a causal decoder with a language-model head (tied to the token embedding by default)."""

from __future__ import annotations

import torch
import torch.nn as nn

from llmcli.config import ModelConfig
from llmcli.models.base import LanguageModel, ModelOutput
from llmcli.models.blocks import KVCache, TransformerStack


class GPT(LanguageModel):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.decoder = TransformerStack(config, config.n_layers, causal=True)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> ModelOutput:
        """With a cache, input_ids are the new tokens and attention_mask covers cached + new positions.
        last_only: logits for the last position alone (all that generation reads of a prompt)."""
        embedded = self.tok_emb(input_ids)
        if self.config.embedding_multiplier != 1.0:
            embedded = embedded * self.config.embedding_multiplier
        hidden = self.decoder(embedded, attention_mask, position_ids, cache=cache)
        return ModelOutput(logits=self.lm_logits(hidden[:, -1:] if last_only else hidden), hidden_states=hidden)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.config, self.config.n_layers, batch, max_len, device or p.device, dtype or p.dtype)
