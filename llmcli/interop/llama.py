"""Llama-style decoders (Llama, Mistral, Qwen2, Qwen3, OLMo 2): one layout, told apart by config switches."""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.interop.rope import hf_rope, rope_from_hf, rope_to_hf
from llmcli.interop.tables import Family, Rule, params, stack


def _llama_rules(cfg: ModelConfig) -> list[Rule]:
    """LlamaForCausalLM's layout, which Mistral, Qwen2 and Qwen3 (with q_norm, k_norm) share; OLMo 2 norms each
    sublayer's output instead of its input (post_attention_layernorm, post_feedforward_layernorm)."""
    norms = (("post_attention_layernorm", "post_feedforward_layernorm") if cfg.norm_position == "output"
             else ("input_layernorm", "post_attention_layernorm"))
    block = [*params("attn_norm", norms[0], bias=False),
             *[rule for p in "qkvo" for rule in params(f"attn.{p}_proj", f"self_attn.{p}_proj",
                                                         bias=cfg.projection_bias(p))],
             *([rule for p in "qk" for rule in params(f"attn.{p}_norm", f"self_attn.{p}_norm", bias=False)]
               if cfg.qk_norm else []),
             *params("ff_norm", norms[1], bias=False),
             *params("ff.gate", "mlp.gate_proj", bias=cfg.projection_bias("gate")),
             *params("ff.up", "mlp.up_proj", bias=cfg.projection_bias("up")),
             *params("ff.down", "mlp.down_proj", bias=cfg.projection_bias("down"))]
    return [
        *params("tok_emb", "model.embed_tokens", bias=False),
        *stack("decoder.blocks.", "model.layers.", cfg.n_layers, block),
        *params("decoder.final_norm", "model.norm", bias=False),
        *([] if cfg.tie_embeddings else params("lm_head", "lm_head", bias=False)),
    ]


def _llama_config(hf: dict, where: str) -> dict:
    """The fields every Llama-style config.json spells alike (Mistral and Qwen2 have no bias flags)."""
    return {"position": "rope", **rope_from_hf(hf, where),
            "norm": "rmsnorm", "norm_position": "pre", "dropout": 0.0, "bias": False,
            "attention_bias": hf.get("attention_bias", False) or None, "mlp_bias": hf.get("mlp_bias", False) or None,
            "tokenizer": "bpe", "bos_token_id": hf.get("bos_token_id"), "eos_token_id": _first(hf.get("eos_token_id"))}


def _first(value):
    """Llama 3's eos_token_id may be a list; generation stops at the first of them."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _llama_to_hf(cfg: ModelConfig) -> dict:
    """Rotary settings in both spellings, so that transformers 4 and 5 read them."""
    return {"head_dim": cfg.d_head, **rope_to_hf(cfg),
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pretraining_tp": 1}


def _unsupported_llama(hf: dict, where: str) -> None:
    """Refuse what llmcli's blocks do not compute, naming the field (never ignored silently)."""
    problems = []
    if hf_rope(hf).get("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial_rotary_factor (Llama's attention rotates every dimension)")
    window = hf.get("sliding_window")
    windowed = hf.get("use_sliding_window", hf.get("model_type") not in ("qwen2", "qwen3"))  # their default: off
    if window is not None and windowed and window < hf.get("max_position_embeddings", 0):
        problems.append(f"sliding_window = {window} (llmcli attends to the whole context; a checkpoint whose "
                        f"window covers max_position_embeddings converts)")
    for key in ("num_local_experts", "num_experts", "moe_intermediate_size"):
        if hf.get(key):
            problems.append(f"{key} = {hf[key]} (mixture of experts)")
    if hf.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp = {hf['pretraining_tp']} (use 1)")
    if problems:
        raise UserError(f"{where}: not supported: {'; '.join(problems)}")


# Llama's defaults (LlamaConfig); Mistral and Qwen2 differ in the defaults of their own Family below.
LLAMA_FIELDS = (("vocab_size", "vocab_size", 32000), ("d_model", "hidden_size", 4096),
                ("n_layers", "num_hidden_layers", 32), ("n_heads", "num_attention_heads", 32),
                ("n_kv_heads", "num_key_value_heads", None), ("d_head", "head_dim", None),
                ("d_ff", "intermediate_size", 11008), ("max_seq_len", "max_position_embeddings", 2048),
                ("norm_eps", "rms_norm_eps", 1e-6))


def _projection_biases(cfg: ModelConfig) -> tuple[bool, bool, bool]:
    """(q/k/v, o, feed-forward) biases."""
    return cfg.projection_bias("q"), cfg.projection_bias("o"), cfg.projection_bias("up")


def _llama_like(model_type: str, architecture: str, biases: str | tuple[bool, bool, bool], fields=LLAMA_FIELDS,
                from_hf: dict | None = None, to_hf: dict | None = None) -> Family:
    """biases: "flags" (config.json's attention_bias and mlp_bias), "attention" (attention_bias only, no
    feed-forward bias) or the fixed (q/k/v, o, feed-forward) biases of an architecture without flags.
    from_hf: this architecture's fixed llmcli fields (its norms); to_hf: its fixed config.json keys."""
    fixed_from_hf = {"hf_architecture": architecture, **(from_hf or {})}
    if isinstance(biases, tuple):  # no bias flags in its config.json: the architecture fixes them
        fixed_from_hf.update(attention_bias=None, mlp_bias=None, qkv_bias=True if biases[0] else None)
    elif biases == "attention":
        fixed_from_hf.update(mlp_bias=None)

    def check_biases(cfg: ModelConfig) -> str | None:
        qkv, o, ff = _projection_biases(cfg)
        fits = {"flags": qkv == o, "attention": qkv == o and not ff}.get(biases, (qkv, o, ff) == biases)
        return None if fits else f"projection biases q/k/v {qkv}, o {o}, feed-forward {ff}"

    def bias_flags(cfg: ModelConfig) -> dict:
        flags = {"flags": ("attention_bias", "mlp_bias"), "attention": ("attention_bias",)}.get(biases, ())
        return {key: cfg.projection_bias("o" if key == "attention_bias" else "up") for key in flags}

    norms = {"norm_position": "pre", "qk_norm": None, **(from_hf or {})}

    return Family(
        family="gpt", model_type=model_type, architecture=architecture,
        reads=(architecture, architecture.replace("ForCausalLM", "Model")), base_prefix="model.",
        rules=_llama_rules, fields=fields, activation_key="hidden_act", activation_default="silu",
        activations={"silu": "swiglu"}, fixed={"attention_dropout": 0.0},
        requires={"position": "rope", "norm": "rmsnorm", "parallel_block": False, "norm_position": norms["norm_position"],
                  "qk_norm": norms["qk_norm"]},
        biases=check_biases,
        emb_key="model.embed_tokens.weight", head_key="lm_head.weight",
        ignored=r"\.rotary_emb\.inv_freq$", free_head_size=True, grouped_query=True, refuse=_unsupported_llama,
        extra_from_hf=lambda hf, state, where: {**_llama_config(hf, where), **fixed_from_hf},
        extra_to_hf=lambda cfg: {**_llama_to_hf(cfg), **(to_hf or {}), **bias_flags(cfg)})


def _with(fields: tuple, **defaults) -> tuple:
    return tuple((ours, key, defaults.get(key, default)) for ours, key, default in fields)


LLAMA = _llama_like("llama", "LlamaForCausalLM", "flags")
MISTRAL = _llama_like(
    "mistral", "MistralForCausalLM", (False, False, False),
    fields=_with(LLAMA_FIELDS, intermediate_size=14336, max_position_embeddings=4096 * 32, rms_norm_eps=1e-6,
                 num_key_value_heads=8),
    to_hf={"sliding_window": None})
QWEN2 = _llama_like(
    "qwen2", "Qwen2ForCausalLM", (True, False, False),
    fields=_with(LLAMA_FIELDS, vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                 num_key_value_heads=32),
    to_hf={"use_sliding_window": False, "sliding_window": None})
QWEN3 = _llama_like(
    "qwen3", "Qwen3ForCausalLM", "attention",
    fields=_with(LLAMA_FIELDS, vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                 num_key_value_heads=32, head_dim=128),
    from_hf={"qk_norm": "head"}, to_hf={"use_sliding_window": False, "sliding_window": None})
OLMO2 = _llama_like(
    "olmo2", "Olmo2ForCausalLM", "attention",
    fields=_with(LLAMA_FIELDS, vocab_size=50304, rms_norm_eps=1e-5),
    from_hf={"qk_norm": "projection", "norm_position": "output"})
