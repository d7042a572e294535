"""T5: encoder-decoder with cross-attention, bucketed relative position bias and unscaled attention."""

from __future__ import annotations

import torch
import torch.nn as nn

from llmcli.config import ModelConfig
from llmcli.models.base import LanguageModel, ModelOutput
from llmcli.models.blocks import KVCache, TransformerStack


class T5(LanguageModel):
    # T5 folds 1/sqrt(d_head) into its weight init, so attention scores are not scaled (Raffel et al. 2020).
    attn_scale = 1.0

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = TransformerStack(config, config.n_layers, causal=False, attn_scale=self.attn_scale)
        self.decoder = TransformerStack(config, config.n_decoder_layers, causal=True, cross=True,
                                        attn_scale=self.attn_scale)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.tok_emb(input_ids), attention_mask)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        """decoder_input_ids start with the decoder start token (the pad id, 0, as in T5)."""
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids (start them with the pad id)")
        memory = encoder_hidden_states if encoder_hidden_states is not None else self.encode(input_ids, attention_mask)
        hidden = self.decoder(self.tok_emb(decoder_input_ids), decoder_attention_mask,
                              memory=memory, memory_mask=attention_mask, cache=cache)
        # With tied embeddings T5 rescales before the LM head (Mesh TensorFlow convention).
        head_input = hidden * self.config.d_model ** -0.5 if self.config.tie_embeddings else hidden
        return ModelOutput(logits=self.lm_logits(head_input), hidden_states=hidden, encoder_hidden_states=memory)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.config, self.config.n_decoder_layers, batch, max_len,
                       device or p.device, dtype or p.dtype, cross=True)
