"""GPT-2 (GPT2LMHeadModel): fused q/k/v in Conv1D layout, learned positions."""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.interop.tables import Family, Rule, params, stack


GPT2_BLOCK = [
    *params("attn_norm", "ln_1"),
    *params(("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.c_attn", conv1d=True),
    *params("attn.o_proj", "attn.c_proj", conv1d=True),
    *params("ff_norm", "ln_2"),
    *params("ff.up", "mlp.c_fc", conv1d=True),
    *params("ff.down", "mlp.c_proj", conv1d=True),
]


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    return [
        *params("tok_emb", "transformer.wte", bias=False),
        *params("decoder.pos_emb", "transformer.wpe", bias=False),
        *stack("decoder.blocks.", "transformer.h.", cfg.n_layers, GPT2_BLOCK),
        *params("decoder.final_norm", "transformer.ln_f"),
        *([] if cfg.tie_embeddings else params("lm_head", "lm_head", bias=False)),
    ]



# Defaults are those of transformers' GPT2Config.
GPT2 = Family(
    family="gpt", model_type="gpt2", architecture="GPT2LMHeadModel", reads=("GPT2LMHeadModel", "GPT2Model"),
    base_prefix="transformer.", rules=_gpt2_rules,
    fields=(("vocab_size", "vocab_size", 50257), ("d_model", "n_embd", 768), ("n_layers", "n_layer", 12),
            ("n_heads", "n_head", 12), ("max_seq_len", "n_positions", 1024),
            ("norm_eps", "layer_norm_epsilon", 1e-5), ("dropout", "resid_pdrop", 0.1)),
    activation_key="activation_function", activation_default="gelu_new",
    activations={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"},
    fixed={"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False},
    requires={"position": "learned", "norm": "layernorm", "norm_position": "pre", "bias": True,
              "parallel_block": False},
    emb_key="transformer.wte.weight", head_key="lm_head.weight",
    ignored=r"\.attn\.(bias|masked_bias)$",
    extra_from_hf=lambda hf, state, where: {"d_ff": hf.get("n_inner") or 4 * hf.get("n_embd", 768)},
    extra_to_hf=lambda cfg: {"n_inner": cfg.d_ff, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                             # GPT-2's <|endoftext|>, where the vocabulary has it
                             "bos_token_id": 50256 if cfg.vocab_size > 50256 else None,
                             "eos_token_id": 50256 if cfg.vocab_size > 50256 else None},
)
