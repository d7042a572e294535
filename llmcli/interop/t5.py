"""T5 (T5ForConditionalGeneration): relative position bias, v1.1's gated feed-forward."""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.interop.tables import Family, Rule, params, stack


def _t5_attention(ours: str, hf: str) -> list[Rule]:
    return [rule for p in "qkvo" for rule in params(f"{ours}.{p}_proj", f"{hf}.{p}", bias=False)]


def _t5_feed_forward(layer: int, gated: bool) -> list[Rule]:
    """T5 v1.1's gated FF computes act(wi_0 x) * wi_1 x: wi_0 is our gate, wi_1 our up."""
    ff = f"layer.{layer}.DenseReluDense"
    up = ([*params("ff.gate", f"{ff}.wi_0", bias=False), *params("ff.up", f"{ff}.wi_1", bias=False)] if gated
          else params("ff.up", f"{ff}.wi", bias=False))
    return [*params("ff_norm", f"layer.{layer}.layer_norm", bias=False), *up,
            *params("ff.down", f"{ff}.wo", bias=False)]


def _t5_rules(cfg: ModelConfig) -> list[Rule]:
    gated = cfg.activation in ("geglu", "swiglu")
    self_attention = [*params("attn_norm", "layer.0.layer_norm", bias=False),
                      *_t5_attention("attn", "layer.0.SelfAttention")]
    encoder_block = [*self_attention, *_t5_feed_forward(1, gated)]
    decoder_block = [*self_attention,
                     *params("cross_norm", "layer.1.layer_norm", bias=False),
                     *_t5_attention("cross_attn", "layer.1.EncDecAttention"),
                     *_t5_feed_forward(2, gated)]
    # HF keeps each stack's relative position bias in its first block; the other blocks reuse it.
    return [
        *params("tok_emb", "shared", bias=False),
        *params("encoder.rel_bias.embedding", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                 bias=False),
        *stack("encoder.blocks.", "encoder.block.", cfg.n_layers, encoder_block),
        *params("encoder.final_norm", "encoder.final_layer_norm", bias=False),
        *params("decoder.rel_bias.embedding", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                 bias=False),
        *stack("decoder.blocks.", "decoder.block.", cfg.n_decoder_layers, decoder_block),
        *params("decoder.final_norm", "decoder.final_layer_norm", bias=False),
        *([] if cfg.tie_embeddings else params("lm_head", "lm_head", bias=False)),
    ]



# Defaults are those of transformers' T5Config.
T5 = Family(
    family="t5", model_type="t5", architecture="T5ForConditionalGeneration", reads=("T5ForConditionalGeneration",),
    base_prefix="", rules=_t5_rules,
    fields=(("vocab_size", "vocab_size", 32128), ("d_model", "d_model", 512), ("d_head", "d_kv", 64),
            ("d_ff", "d_ff", 2048), ("n_layers", "num_layers", 6), ("n_decoder_layers", "num_decoder_layers", None),
            ("n_heads", "num_heads", 8), ("relative_buckets", "relative_attention_num_buckets", 32),
            ("relative_max_distance", "relative_attention_max_distance", 128),
            ("norm_eps", "layer_norm_epsilon", 1e-6), ("dropout", "dropout_rate", 0.1),
            ("max_seq_len", "n_positions", 512)),
    activation_key="feed_forward_proj", activation_default="relu",
    activations={"relu": "relu", "gelu": "gelu", "gated-gelu": "geglu", "gated-silu": "swiglu"},
    fixed={"is_encoder_decoder": True},
    requires={"position": "relative", "norm": "rmsnorm", "norm_position": "pre", "bias": False,
              "parallel_block": False},
    emb_key="shared.weight", head_key="lm_head.weight",
    ignored=(r"^(encoder|decoder)\.embed_tokens\.weight$"
             r"|^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$"),
    free_head_size=True, head_rescaled=True,
    extra_to_hf=lambda cfg: {"scale_decoder_outputs": cfg.tie_embeddings, "pad_token_id": 0, "eos_token_id": 1,
                             "decoder_start_token_id": 0},
)
