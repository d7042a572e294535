"""BERT: a bidirectional post-norm encoder with segment embeddings, an optional pooler and an MLM head."""

from __future__ import annotations

import torch
import torch.nn as nn

from llmcli.config import ModelConfig
from llmcli.models.base import LanguageModel, ModelOutput
from llmcli.models.blocks import ACTIVATIONS, TransformerStack, make_norm


class MLMHead(nn.Module):
    """dense -> activation -> norm, then the (tied) vocabulary projection plus a bias."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.act = ACTIVATIONS[config.activation]
        self.norm = make_norm(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))


class BERT(LanguageModel):
    head_prefixes = ("mlm_head.", "lm_head.")  # published BERT sizes count encoder + pooler only

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.type_emb = nn.Embedding(config.type_vocab_size, config.d_model) if config.type_vocab_size else None
        self.encoder = TransformerStack(config, config.n_layers, causal=False)
        self.pooler = nn.Linear(config.d_model, config.d_model) if config.pooler else None
        self.mlm_head = MLMHead(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> ModelOutput:
        x = self.tok_emb(input_ids)
        if self.type_emb is not None:
            x = x + self.type_emb(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        hidden = self.encoder(x, attention_mask)
        pooled = torch.tanh(self.pooler(hidden[:, 0])) if self.pooler is not None else None
        logits = self.lm_logits(self.mlm_head(hidden)) + self.mlm_head.bias
        return ModelOutput(logits=logits, hidden_states=hidden, pooled=pooled)
