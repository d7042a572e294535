"""Exact parameter counts and per-token FLOPs, from the config alone (the model is built on the meta device)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llmcli.config import ModelConfig


@dataclass
class ModelCounts:
    params: int  # the published convention: everything but task heads (BERT's MLM transform)
    params_with_heads: int  # every parameter the built model holds
    non_embedding_params: int  # N of Kaplan et al. 2020: without token and learned position embeddings
    flops_per_token: int  # forward pass, at a context of max_seq_len
    fp16_weight_bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def count(config: ModelConfig) -> ModelCounts:
    from llmcli.models import build_on_meta

    model = build_on_meta(config)
    total = model.num_parameters()
    non_embedding = total - model.embedding_parameters()
    # Forward FLOPs per token, Kaplan et al. 2020 Table 1: 2N + 2 * n_layer * n_ctx * d_attn,
    # plus the LM-head matmul when it reuses the (uncounted) token embedding.
    tied_head = config.d_model * config.vocab_size if config.tie_embeddings else 0
    attention_layers = config.n_layers + 2 * (config.n_decoder_layers or 0)  # T5: + decoder self and cross
    flops = 2 * (non_embedding + tied_head) + 2 * attention_layers * config.max_seq_len * config.d_attn
    return ModelCounts(params=model.num_parameters(include_heads=False), params_with_heads=total,
                       non_embedding_params=non_embedding, flops_per_token=flops, fp16_weight_bytes=2 * total)
