"""Gemma 2 (Gemma2ForCausalLM) and Gemma 3 text (Gemma3ForCausalLM): four (1 + w) RMSNorms a block, embeddings
scaled by sqrt(d_model), q·k scaled by query_pre_attn_scalar^-0.5, local and global layers; Gemma 2 caps attention
scores and logits with tanh, Gemma 3 norms q and k per head and gives its local layers their own rotary base."""

from __future__ import annotations

import math

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.interop.llama import (LLAMA_FIELDS, eos_from_hf, eos_to_hf, layer_types_from_hf, layer_types_to_hf,
                                  specials, with_defaults)
from llmcli.interop.rope import rope_from_hf, rope_to_hf
from llmcli.interop.tables import Family, Rule, params, stack

GEMMA_FIELDS = with_defaults(LLAMA_FIELDS, vocab_size=256000, hidden_size=2304, num_hidden_layers=26,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=256, intermediate_size=9216,
                             max_position_embeddings=8192)
GEMMA_KEEPS = ("embedding_multiplier", "attention_multiplier", "attention_softcap", "logits_softcap",
               "rope_local_base")  # of llama.SPECIAL_FIELDS, those Gemma has


def _gemma_rules(cfg: ModelConfig) -> list[Rule]:
    block = [*params("attn_norm", "input_layernorm", bias=False),
             *[rule for p in "qkvo" for rule in params(f"attn.{p}_proj", f"self_attn.{p}_proj",
                                                         bias=cfg.projection_bias(p))],
             *([rule for p in "qk" for rule in params(f"attn.{p}_norm", f"self_attn.{p}_norm", bias=False)]
               if cfg.qk_norm else []),
             *params("attn_post_norm", "post_attention_layernorm", bias=False),
             *params("ff_norm", "pre_feedforward_layernorm", bias=False),
             *[rule for p in ("gate", "up", "down") for rule in params(f"ff.{p}", f"mlp.{p}_proj", bias=False)],
             *params("ff_post_norm", "post_feedforward_layernorm", bias=False)]
    return [
        *params("tok_emb", "model.embed_tokens", bias=False),
        *stack("decoder.blocks.", "model.layers.", cfg.n_layers, block),
        *params("decoder.final_norm", "model.norm", bias=False),
        *([] if cfg.tie_embeddings else params("lm_head", "lm_head", bias=False)),
    ]


def _rope_from_gemma(hf: dict, where: str, local_layers: bool) -> dict:
    """Gemma 3's rotary settings are per layer type (rope_parameters.full_attention and .sliding_attention; older
    configs: rope_theta, rope_scaling and rope_local_base_freq); Gemma 2's are one set."""
    if not local_layers:
        return rope_from_hf(hf, where)
    nested = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    full = nested.get("full_attention") or {**(hf.get("rope_scaling") or {}),
                                             "rope_theta": hf.get("rope_theta", 1_000_000.0)}
    local = nested.get("sliding_attention") or {"rope_type": "default",
                                                "rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    if local.get("rope_type", "default") != "default":
        raise UserError(f"{where}: not supported: {local['rope_type']!r} rotary scaling on the sliding layers")
    return {**rope_from_hf({"rope_parameters": full, "max_position_embeddings": hf.get("max_position_embeddings")},
                           where), "rope_local_base": local.get("rope_theta", 10000.0)}


def _layer_types(hf: dict, pattern: int, where: str) -> list[str]:
    """Which layers slide: config.json's layer_types, else every layer but each pattern-th (Gemma 2: 2, Gemma 3: 6)."""
    pattern = hf.get("sliding_window_pattern", pattern)
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                      for i in range(hf.get("num_hidden_layers", 26))]
    return layer_types_from_hf(types, where)


def _gemma_from_hf(hf: dict, where: str, gemma3: bool) -> dict:
    if hf.get("use_bidirectional_attention"):
        raise UserError(f"{where}: not supported: use_bidirectional_attention (llmcli's decoders are causal)")
    types = _layer_types(hf, 6 if gemma3 else 2, where)
    default_caps = (None, None) if gemma3 else (50.0, 30.0)
    return {"position": "rope", **_rope_from_gemma(hf, where, gemma3), "norm": "gemma_rmsnorm",
            "norm_position": "sandwich", "dropout": 0.0, "bias": False, "mlp_bias": None,
            "attention_bias": hf.get("attention_bias", False) or None, "qk_norm": "head" if gemma3 else None,
            "embedding_multiplier": hf.get("hidden_size", 2304) ** 0.5,
            "attention_multiplier": hf.get("query_pre_attn_scalar", 256) ** -0.5,
            "attention_softcap": hf.get("attn_logit_softcapping", default_caps[0]),
            "logits_softcap": hf.get("final_logit_softcapping", default_caps[1]),
            "sliding_window": hf.get("sliding_window", 4096), "layer_types": types,
            "tokenizer": "bpe", "bos_token_id": hf.get("bos_token_id"), **eos_from_hf(hf.get("eos_token_id")),
            "hf_architecture": "Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"}


def _query_pre_attn_scalar(cfg: ModelConfig) -> float:
    """The scalar whose -1/2 power is the q·k scale; a whole number where it is one (256, 144)."""
    scalar = (cfg.attention_multiplier or cfg.d_head ** -0.5) ** -2
    return round(scalar) if math.isclose(scalar, round(scalar), rel_tol=1e-9) else scalar


def _gemma_to_hf(cfg: ModelConfig, gemma3: bool) -> dict:
    if gemma3:
        rope = {"rope_parameters": {"full_attention": rope_to_hf(cfg)["rope_parameters"], "sliding_attention": {
            "rope_type": "default", "rope_theta": cfg.rope_local_base}}}
    else:
        rope = rope_to_hf(cfg)
    return {"head_dim": cfg.d_head, **rope, "query_pre_attn_scalar": _query_pre_attn_scalar(cfg),
            "attn_logit_softcapping": cfg.attention_softcap, "final_logit_softcapping": cfg.logits_softcap,
            "sliding_window": cfg.sliding_window, "layer_types": layer_types_to_hf(cfg),
            "attention_bias": cfg.projection_bias("o"), "bos_token_id": cfg.bos_token_id,
            "eos_token_id": eos_to_hf(cfg), "use_bidirectional_attention": False}


def _gemma_fit(cfg: ModelConfig, gemma3: bool) -> str | None:
    """Why this config is no Gemma 2 or 3, beyond the fixed fields of Family.requires."""
    checks = [
        (math.isclose(cfg.embedding_multiplier, cfg.d_model ** 0.5), f"embedding_multiplier = "
         f"{cfg.embedding_multiplier} (it scales embeddings by sqrt(d_model) = {cfg.d_model ** 0.5:g})"),
        (not specials(cfg) - set(GEMMA_KEEPS), f"{', '.join(sorted(specials(cfg) - set(GEMMA_KEEPS)))} "
         f"(it has none of them)"),
        (cfg.projection_bias("q") == cfg.projection_bias("o") and not cfg.projection_bias("up"),
         "projection biases other than attention_bias"),
        (cfg.sliding_window is not None, "no sliding_window (its local layers have one)"),
        ((cfg.rope_local_base is not None) == gemma3,
         "rope_local_base (Gemma 3 has one for its local layers, Gemma 2 none)"),
    ]
    return next((why for fits, why in checks if not fits), None)


def _gemma(gemma3: bool) -> Family:
    model_type, architecture = ("gemma3_text", "Gemma3ForCausalLM") if gemma3 else ("gemma2", "Gemma2ForCausalLM")
    return Family(
        family="gpt", model_type=model_type, architecture=architecture,
        reads=(architecture, "Gemma3TextModel" if gemma3 else "Gemma2Model"), base_prefix="model.",
        rules=_gemma_rules,
        fields=with_defaults(GEMMA_FIELDS, **({"vocab_size": 262208, "max_position_embeddings": 131072} if gemma3
                                              else {})),
        activation_key="hidden_activation", activation_default="gelu_pytorch_tanh",
        activations={"gelu_pytorch_tanh": "geglu"}, fixed={"attention_dropout": 0.0},
        requires={"position": "rope", "norm": "gemma_rmsnorm", "norm_position": "sandwich", "parallel_block": False,
                  "qk_norm": "head" if gemma3 else None},
        misfit=lambda cfg: _gemma_fit(cfg, gemma3),
        emb_key="model.embed_tokens.weight", head_key="lm_head.weight",
        ignored=r"\.rotary_emb\.|\.embed_scale$", free_head_size=True, grouped_query=True,
        extra_from_hf=lambda hf, state, where: _gemma_from_hf(hf, where, gemma3),
        extra_to_hf=lambda cfg: _gemma_to_hf(cfg, gemma3))


GEMMA2 = _gemma(gemma3=False)
GEMMA3 = _gemma(gemma3=True)
