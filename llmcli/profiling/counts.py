"""Counting formulas, each written once: exact parameter counts (the model built on the meta device), FLOPs
per token, training compute, and KV-cache bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llmcli.config import ModelConfig
from llmcli.models import build_on_meta
from llmcli.models.blocks import MixtureOfExperts

TRAIN_MODE = "train"


@dataclass
class ModelCounts:
    params: int  # the published convention: everything but task heads (BERT's MLM transform)
    params_with_heads: int  # every parameter the built model holds
    non_embedding_params: int  # N of Kaplan et al. 2020: without token and learned position embeddings
    active_params: int  # what one token computes with (params): a mixture of experts counts its top-k experts
    flops_per_token: int  # forward pass, at a context of max_seq_len, from the active parameters
    fp16_weight_bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def idle_expert_parameters(model) -> int:
    """The parameters of the experts a token skips: n_experts - k experts' worth in every mixture."""
    return sum((len(m.experts) - m.top_k) * sum(p.numel() for p in m.experts[0].parameters())
               for m in model.modules() if isinstance(m, MixtureOfExperts))


def count(config: ModelConfig) -> ModelCounts:
    model = build_on_meta(config)
    total, params = model.num_parameters(), model.num_parameters(include_heads=False)
    counts = ModelCounts(params=params, params_with_heads=total,
                         non_embedding_params=total - model.embedding_parameters(),
                         active_params=params - idle_expert_parameters(model), flops_per_token=0,
                         fp16_weight_bytes=2 * total)
    counts.flops_per_token = int(flops_per_token(config, counts, "forward", config.max_seq_len))
    return counts


def flops_per_token(config: ModelConfig, counts: ModelCounts, mode: str, seq_len: int) -> float:
    """PaLM (Chowdhery et al. 2022, appendix B): 6N + 12·L·H·Q·T for training, 2N + 4·L·H·Q·T forward,
    with N the parameters a token's matmuls use (non-embedding, plus a tied LM head; a mixture of experts' top-k
    experts only) and L counting T5's decoder twice (self- and cross-attention). The attention term covers both
    q·kᵀ and the product with v."""
    idle = counts.params - counts.active_params
    n = counts.non_embedding_params - idle + (config.d_model * config.vocab_size if config.tie_embeddings else 0)
    layers = config.n_layers + 2 * (config.n_decoder_layers or 0)
    attention = layers * config.n_heads * config.d_head * seq_len
    return 6 * n + 12 * attention if mode == TRAIN_MODE else 2 * n + 4 * attention


def training_compute(params: float, tokens: float) -> float:
    """C ≈ 6·N·D (Kaplan et al. 2020): the FLOPs of training N parameters on D tokens, forward and backward."""
    return 6 * params * tokens


def tokens_for_compute(params: float, compute: float) -> float:
    """D = C / (6·N): the tokens a FLOP budget buys for N parameters."""
    return compute / (6 * params)


def kv_cache_bytes(config: ModelConfig, element_bytes: float, context: int) -> float:
    """K and V that one sequence's cache holds at `context` positions: a full-attention layer keeps them all, a
    sliding-window layer its last window - 1 (all the next query sees besides itself)."""
    layers = config.n_decoder_layers if config.family == "t5" else config.n_layers
    windows = [config.window(i) for i in range(layers)]
    positions = sum(context if w is None else min(context, w - 1) for w in windows)
    return 2 * positions * config.n_kv_heads * config.d_head * element_bytes
