"""Prompt tuning (Lester et al. 2021): N learned virtual-token embeddings in front of the input, base frozen.

The virtual tokens get ids vocab_size .. vocab_size + N - 1, looked up by `PromptEmbedding`, which takes
the place of the model's token embedding (keeping its `weight`, so a tied LM head still reads the real
vocabulary only). `PromptTuned` inserts those ids into every input (GPT: the decoder input, BERT: right
after [CLS], T5: the encoder input), extends the attention mask, and drops the virtual positions from
the outputs again: callers see logits and hidden states for their own tokens, so labels need no change.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.errors import UserError
from llmcli.models.base import ModelOutput


class PromptEmbedding(nn.Module):
    """The token embedding plus `n_tokens` trained rows for the virtual ids above the vocabulary."""

    def __init__(self, base: nn.Embedding, n_tokens: int) -> None:
        super().__init__()
        self.weight = base.weight
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        # Lester et al. 2021, sec. 3.2: initialising from vocabulary embeddings beats random init.
        rows = torch.randint(base.num_embeddings, (n_tokens,))
        self.prompt = nn.Parameter(base.weight.detach()[rows].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        virtual = ids >= self.num_embeddings
        real = F.embedding(ids.masked_fill(virtual, 0), self.weight)
        prompt = self.prompt[(ids - self.num_embeddings).clamp(0, len(self.prompt) - 1)]
        return torch.where(virtual[..., None], prompt.to(real.dtype), real)


class PromptTuned(nn.Module):
    """A model whose inputs get the learned prompt; same call signature and output lengths as the model."""

    def __init__(self, model: nn.Module, n_tokens: int) -> None:
        super().__init__()
        if n_tokens <= 0:
            raise UserError(f"--prompt-tokens must be positive, got {n_tokens}")
        self.model = model
        self.config = model.config
        self.n_tokens = n_tokens
        self.start = 1 if model.config.family == "bert" else 0  # BERT: keep [CLS] first, for the pooler
        model.tok_emb = PromptEmbedding(model.tok_emb, n_tokens)

    def _insert(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :self.start], values, x[:, self.start:]], dim=1)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :self.start], x[:, self.start + self.n_tokens:]], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs) -> ModelOutput:
        """kwargs (decoder_input_ids, ...) go to the model unchanged; there is no KV-cache path."""
        batch, device = input_ids.shape[0], input_ids.device
        vocab = self.model.tok_emb.num_embeddings
        virtual = torch.arange(vocab, vocab + self.n_tokens, device=device).expand(batch, -1)
        ids = self._insert(input_ids, virtual)
        if attention_mask is not None:
            kwargs["attention_mask"] = self._insert(attention_mask, torch.ones_like(virtual).to(attention_mask.dtype))
        if token_type_ids is not None:
            kwargs["token_type_ids"] = self._insert(token_type_ids, torch.zeros_like(virtual))
        out = self.model(ids, **kwargs)
        if self.config.family == "t5":
            return out  # decoder outputs have the target's length already; the memory keeps the prompt
        return ModelOutput(logits=self._drop(out.logits), hidden_states=self._drop(out.hidden_states),
                           pooled=out.pooled)
