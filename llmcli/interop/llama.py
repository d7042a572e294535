"""Llama-style decoders (Llama, Mistral, Qwen2, Qwen3, OLMo 2, Phi-3, SmolLM3, Granite, and the mixtures of experts
Mixtral, Qwen3-MoE, OLMoE): one layout, told apart by config switches."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.interop.rope import hf_rope, rope_from_hf, rope_to_hf
from llmcli.interop.tables import Family, Rule, params, stack


@dataclass(frozen=True)
class Experts:
    """How a mixture-of-experts architecture names its router and experts and spells their settings."""

    router: str  # the router's HF layer, e.g. "mlp.gate"
    experts: str  # the experts' HF prefix, e.g. "mlp.experts"
    names: tuple[str, str, str]  # an expert's gate, up and down projections
    count_key: str  # config.json's number of experts
    defaults: tuple[int, int]  # its class defaults: experts, experts per token
    width_key: str | None = None  # an expert's width, when it is not intermediate_size (Qwen3-MoE)
    norm_topk_prob: bool | None = None  # fixed by the architecture (Mixtral), else config.json's (default False)
    extra_to_hf: tuple[tuple[str, object], ...] = ()  # settings it writes as llmcli computes them
    shared: tuple[str, str, str] | None = None  # a shared expert's HF layer, its gate's, its width's config key

    def rules(self, cfg: ModelConfig) -> list[Rule]:
        experts = [(f"ff.experts.{e}", f"{self.experts}.{e}") for e in range(cfg.n_experts)]
        if self.shared:
            experts.append(("ff.shared", self.shared[0]))
        return [*params("ff.router", self.router, bias=False),
                *(params("ff.shared_gate", self.shared[1], bias=False) if self.shared else []),
                *(rule for ours_prefix, hf_prefix in experts for ours, theirs in zip(("gate", "up", "down"), self.names)
                  for rule in params(f"{ours_prefix}.{ours}", f"{hf_prefix}.{theirs}", bias=False))]

    def from_hf(self, hf: dict) -> dict:
        experts, per_token = self.defaults
        count = hf.get(self.count_key, hf.get("num_local_experts", hf.get("num_experts", experts)))  # 5.x renames
        return {"n_experts": count, "experts_per_token": hf.get("num_experts_per_tok", per_token),
                "d_expert": hf.get(self.width_key) if self.width_key else None,
                "norm_topk_prob": (self.norm_topk_prob if self.norm_topk_prob is not None
                                   else bool(hf.get("norm_topk_prob", False))),
                "d_shared_expert": hf.get(self.shared[2], 5632) if self.shared else None}

    def to_hf(self, cfg: ModelConfig) -> dict:
        out = {self.count_key: cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
               "output_router_logits": False, **dict(self.extra_to_hf)}
        if self.width_key:
            out[self.width_key] = cfg.expert_width
        if self.norm_topk_prob is None:
            out["norm_topk_prob"] = cfg.norm_topk_prob
        if self.shared:
            out[self.shared[2]] = cfg.d_shared_expert
        return out

    def misfit(self, cfg: ModelConfig) -> str | None:
        if not cfg.n_experts:
            return "n_experts = 0 (it is a mixture of experts)"
        if self.width_key is None and cfg.d_expert not in (None, cfg.d_ff):
            return f"d_expert = {cfg.d_expert} (its experts are d_ff = {cfg.d_ff} wide)"
        if self.norm_topk_prob is not None and cfg.norm_topk_prob != self.norm_topk_prob:
            return f"norm_topk_prob = {cfg.norm_topk_prob} (it has {self.norm_topk_prob})"
        if (cfg.d_shared_expert is None) == bool(self.shared):
            return (f"d_shared_expert = {cfg.d_shared_expert} "
                    f"({'it has a shared expert' if self.shared else 'it has no shared expert'})")
        return None


def _llama_rules(cfg: ModelConfig, fused: bool = False, experts: Experts | None = None) -> list[Rule]:
    """LlamaForCausalLM's layout, which Mistral, Qwen2 and Qwen3 (with q_norm, k_norm) share; OLMo 2 norms each
    sublayer's output instead of its input (post_attention_layernorm, post_feedforward_layernorm); Phi-3 fuses
    q, k, v into qkv_proj and gate, up into gate_up_proj (fused: no biases there); a mixture of experts has a
    router and experts where the others have one feed-forward."""
    norms = (("post_attention_layernorm", "post_feedforward_layernorm") if cfg.norm_position == "output"
             else ("input_layernorm", "post_attention_layernorm"))
    kv = cfg.n_kv_heads * cfg.d_head
    if fused:
        projections = [*params(("attn.q_proj", "attn.k_proj", "attn.v_proj"), "self_attn.qkv_proj", bias=False,
                               sizes=(cfg.d_attn, kv, kv)),
                       *params("attn.o_proj", "self_attn.o_proj", bias=False)]
        feed_forward = params(("ff.gate", "ff.up"), "mlp.gate_up_proj", bias=False)
    else:
        projections = [rule for p in "qkvo" for rule in params(f"attn.{p}_proj", f"self_attn.{p}_proj",
                                                                 bias=cfg.projection_bias(p))]
        feed_forward = [rule for p in ("gate", "up") for rule in params(f"ff.{p}", f"mlp.{p}_proj",
                                                                         bias=cfg.projection_bias(p))]
    block = [*params("attn_norm", norms[0], bias=False), *projections,
             *([rule for p in "qk" for rule in params(f"attn.{p}_norm", f"self_attn.{p}_norm", bias=False)]
               if cfg.qk_norm else []),
             *params("ff_norm", norms[1], bias=False),
             *(experts.rules(cfg) if experts else
               [*feed_forward, *params("ff.down", "mlp.down_proj", bias=cfg.projection_bias("down"))])]
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
            "tokenizer": "bpe", "bos_token_id": hf.get("bos_token_id"), **eos_from_hf(hf.get("eos_token_id"))}


def eos_from_hf(value) -> dict:
    """eos_token_id may be a list (Llama 3 Instruct: end of text, end of turn, end of message): the first is the
    EOS, and generation stops at every one."""
    ids = value if isinstance(value, list) else [value] if value is not None else []
    return {"eos_token_id": ids[0] if ids else None, "stop_token_ids": ids[1:] or None}


def eos_to_hf(cfg: ModelConfig):
    return [cfg.eos_token_id, *cfg.stop_token_ids] if cfg.stop_token_ids else cfg.eos_token_id


def _llama_to_hf(cfg: ModelConfig) -> dict:
    """Rotary settings in both spellings, so that transformers 4 and 5 read them. No padding token: llmcli keeps
    none (the tokenizer has it), and a class default (Phi-3's 32000, SmolLM3's 128004) may lie outside a smaller
    vocabulary."""
    return {"head_dim": cfg.d_head, **rope_to_hf(cfg), "bos_token_id": cfg.bos_token_id,
            "eos_token_id": eos_to_hf(cfg), "pad_token_id": None, "pretraining_tp": 1}


def _phi3_to_hf(cfg: ModelConfig) -> dict:
    """Phi-3 keeps original_max_position_embeddings at the top, where it overrides the rotary dict's."""
    return {"original_max_position_embeddings": (cfg.rope_scaling or {}).get("original_max_seq_len",
                                                                             cfg.max_seq_len)}


def _unsupported_llama(hf: dict, where: str, partial_rotary: bool = False, moe: bool = False,
                       shared_expert: bool = False) -> None:
    """Refuse what llmcli's blocks do not compute, naming the field (never ignored silently)."""
    problems = []
    if not partial_rotary and hf_rope(hf).get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor ({hf.get('model_type')}'s attention rotates every dimension)")
    for key in ("num_local_experts", "num_experts", "moe_intermediate_size"):
        if hf.get(key) and not moe:
            problems.append(f"{key} = {hf[key]} (mixture of experts)")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        problems.append("mlp_only_layers / decoder_sparse_step (dense layers among the experts' layers)")
    for key in ("shared_expert_intermediate_size", "n_shared_experts", "clip_qkv"):
        if hf.get(key) and not (shared_expert and key == "shared_expert_intermediate_size"):
            problems.append(f"{key} = {hf[key]}")
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


# Sliding windows in config.json: none (Llama and OLMo 2 have no window), every layer (Mistral's sliding_window,
# 4096 when left out) or chosen layers (Qwen2 and Qwen3: use_sliding_window, then layer_types or max_window_layers).
WINDOW_KINDS = ("none", "every layer", "chosen layers")
HF_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def layer_types_from_hf(types: list[str], where: str) -> list[str]:
    """config.json's layer_types as llmcli's "full" and "sliding"; another kind of layer is refused by name."""
    unknown = sorted(set(types) - set(HF_LAYER_TYPES))
    if unknown:
        raise UserError(f"{where}: not supported: layer_types {unknown[0]!r} (llmcli has full and sliding attention)")
    return [HF_LAYER_TYPES[t] for t in types]


def layer_types_to_hf(cfg: ModelConfig) -> list[str]:
    return [("sliding" if cfg.window(i) else "full") + "_attention" for i in range(cfg.n_layers)]


def _windows_from_hf(hf: dict, kind: str, where: str) -> dict:
    if kind == "every layer":  # left out: Mistral's default window is 4096, Phi-3's none
        return {"sliding_window": hf.get("sliding_window", 4096 if hf.get("model_type") == "mistral" else None)}
    if kind == "none" or not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return {}
    layers = hf.get("num_hidden_layers", 32)
    if hf.get("model_type") == "smollm3":  # its default: the NoPE layers slide
        derived = ["full_attention" if rope else "sliding_attention" for rope in _smollm3_rope_flags(hf)]
    else:
        derived = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
                   for i in range(layers)]
    return {"sliding_window": hf["sliding_window"], "layer_types": layer_types_from_hf(hf.get("layer_types") or derived,
                                                                                       where)}


def _windows_to_hf(cfg: ModelConfig, kind: str) -> dict:
    if kind == "every layer":
        return {"sliding_window": cfg.sliding_window}
    if kind == "none":
        return {}
    types = layer_types_to_hf(cfg)
    first = types.index("sliding_attention") if "sliding_attention" in types else cfg.n_layers
    return {"use_sliding_window": cfg.sliding_window is not None, "sliding_window": cfg.sliding_window,
            "max_window_layers": first, "layer_types": types}


def _windows_fit(cfg: ModelConfig, kind: str) -> str | None:
    """Why the architecture cannot hold this config's windows, or None."""
    if cfg.sliding_window is None or kind == "chosen layers":
        return None
    if kind == "none":
        return f"sliding_window = {cfg.sliding_window} (it attends to the whole context)"
    if cfg.layer_types is not None and "full" in cfg.layer_types:
        return "layer_types with full-attention layers (its window covers every layer)"
    return None


def _smollm3_rope_flags(hf: dict) -> list[int]:
    """SmolLM3's no_rope_layers: 1 where a layer rotates, 0 where it takes no positions (every 4th by default)."""
    interval = hf.get("no_rope_layer_interval", 4)
    return hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(hf.get("num_hidden_layers", 36))]


# What one architecture has that the others lack: the llmcli fields it carries (all others stay at their defaults),
# and how config.json spells them.
SPECIAL_FIELDS = ("rotary_fraction", "nope_layers", "embedding_multiplier", "residual_multiplier",
                  "attention_multiplier", "logits_divisor", "attention_softcap", "logits_softcap", "rope_local_base")
DEFAULTS = {f.name: f.default for f in fields(ModelConfig)}


def specials(cfg: ModelConfig) -> set[str]:
    """The architecture-specific fields this config sets away from their defaults."""
    return {key for key in SPECIAL_FIELDS if getattr(cfg, key) != DEFAULTS[key]}



@dataclass(frozen=True)
class Special:
    keeps: tuple[str, ...] = ()
    from_hf: Callable[[dict], dict] = lambda hf: {}
    to_hf: Callable[[ModelConfig], dict] = lambda cfg: {}


PHI3_SPECIAL = Special(keeps=("rotary_fraction",), to_hf=lambda cfg: _phi3_to_hf(cfg))
SMOLLM3_SPECIAL = Special(
    keeps=("nope_layers",),
    from_hf=lambda hf: {"nope_layers": [i for i, rope in enumerate(_smollm3_rope_flags(hf)) if not rope] or None},
    to_hf=lambda cfg: {"no_rope_layers": [int(i not in (cfg.nope_layers or ())) for i in range(cfg.n_layers)]})
GRANITE_SPECIAL = Special(
    keeps=("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_divisor"),
    from_hf=lambda hf: {"embedding_multiplier": hf.get("embedding_multiplier", 1.0),
                        "residual_multiplier": hf.get("residual_multiplier", 1.0),
                        "attention_multiplier": hf.get("attention_multiplier", 1.0),
                        "logits_divisor": hf.get("logits_scaling", 1.0)},
    to_hf=lambda cfg: {"embedding_multiplier": cfg.embedding_multiplier,
                       "residual_multiplier": cfg.residual_multiplier,
                       "attention_multiplier": cfg.attention_multiplier or cfg.d_head ** -0.5,
                       "logits_scaling": cfg.logits_divisor})


def _llama_like(model_type: str, architecture: str, biases: str | tuple[bool, bool, bool], hf_fields=LLAMA_FIELDS,
                from_hf: dict | None = None, windows: str = "none", fused: bool = False,
                special: Special = Special(), experts: Experts | None = None) -> Family:
    """biases: "flags" (config.json's attention_bias and mlp_bias), "attention" (attention_bias only, no
    feed-forward bias) or the fixed (q/k/v, o, feed-forward) biases of an architecture without flags.
    windows: one of WINDOW_KINDS. fused: Phi-3's fused projections. special: the fields only it has.
    hf_fields: its config.json fields with their defaults; from_hf: its fixed llmcli fields (its norms).
    experts: a mixture of experts' names and settings."""
    fixed_from_hf = {"hf_architecture": architecture, **(from_hf or {})}
    if isinstance(biases, tuple):  # no bias flags in its config.json: the architecture fixes them
        fixed_from_hf.update(attention_bias=None, mlp_bias=None, qkv_bias=True if biases[0] else None)
    elif biases == "attention":
        fixed_from_hf.update(mlp_bias=None)

    def check_fit(cfg: ModelConfig) -> str | None:
        qkv, o, ff = _projection_biases(cfg)
        fits = {"flags": qkv == o, "attention": qkv == o and not ff}.get(biases, (qkv, o, ff) == biases)
        if not fits:
            return f"projection biases q/k/v {qkv}, o {o}, feed-forward {ff}"
        extra = sorted(specials(cfg) - set(special.keeps))
        if extra:
            return f"{extra[0]} = {getattr(cfg, extra[0])!r} (it has {DEFAULTS[extra[0]]!r})"
        if experts is not None and (problem := experts.misfit(cfg)):
            return problem
        return _windows_fit(cfg, windows)

    def bias_flags(cfg: ModelConfig) -> dict:
        flags = {"flags": ("attention_bias", "mlp_bias"), "attention": ("attention_bias",)}.get(biases, ())
        return {key: cfg.projection_bias("o" if key == "attention_bias" else "up") for key in flags}

    norms = {"norm_position": "pre", "qk_norm": None, **(from_hf or {})}

    return Family(
        family="gpt", model_type=model_type, architecture=architecture,
        reads=(architecture, architecture.replace("ForCausalLM", "Model")), base_prefix="model.",
        rules=lambda cfg: _llama_rules(cfg, fused, experts), fields=hf_fields, activation_key="hidden_act",
        activation_default="silu",
        activations={"silu": "swiglu"}, fixed={"attention_dropout": 0.0},
        requires={"position": "rope", "norm": "rmsnorm", "parallel_block": False,
                  "norm_position": norms["norm_position"], "qk_norm": norms["qk_norm"]},
        misfit=check_fit,
        emb_key="model.embed_tokens.weight", head_key="lm_head.weight",
        ignored=r"\.rotary_emb\.inv_freq$", free_head_size=True, grouped_query=True,
        refuse=lambda hf, where: _unsupported_llama(hf, where, "rotary_fraction" in special.keeps, experts is not None,
                                                    bool(experts and experts.shared)),
        extra_from_hf=lambda hf, state, where: {**_llama_config(hf, where), **_windows_from_hf(hf, windows, where),
                                                **special.from_hf(hf), **(experts.from_hf(hf) if experts else {}),
                                                **fixed_from_hf},
        extra_to_hf=lambda cfg: {**_llama_to_hf(cfg), **bias_flags(cfg), **_windows_to_hf(cfg, windows),
                                 **special.to_hf(cfg), **(experts.to_hf(cfg) if experts else {})},
        moe=experts is not None)


def with_defaults(fields: tuple, **defaults) -> tuple:
    return tuple((ours, key, defaults.get(key, default)) for ours, key, default in fields)


LLAMA = _llama_like("llama", "LlamaForCausalLM", "flags")
MISTRAL = _llama_like(
    "mistral", "MistralForCausalLM", (False, False, False),
    hf_fields=with_defaults(LLAMA_FIELDS, intermediate_size=14336, max_position_embeddings=4096 * 32,
                            rms_norm_eps=1e-6, num_key_value_heads=8),
    windows="every layer")
QWEN2 = _llama_like(
    "qwen2", "Qwen2ForCausalLM", (True, False, False),
    hf_fields=with_defaults(LLAMA_FIELDS, vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                            num_key_value_heads=32),
    windows="chosen layers")
QWEN3 = _llama_like(
    "qwen3", "Qwen3ForCausalLM", "attention",
    hf_fields=with_defaults(LLAMA_FIELDS, vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                            num_key_value_heads=32, head_dim=128),
    from_hf={"qk_norm": "head"}, windows="chosen layers")
OLMO2 = _llama_like(
    "olmo2", "Olmo2ForCausalLM", "attention",
    hf_fields=with_defaults(LLAMA_FIELDS, vocab_size=50304, rms_norm_eps=1e-5),
    from_hf={"qk_norm": "projection", "norm_position": "output"})
PHI3 = _llama_like(
    "phi3", "Phi3ForCausalLM", (False, False, False),
    hf_fields=with_defaults(LLAMA_FIELDS, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                            max_position_embeddings=4096, rms_norm_eps=1e-5),
    windows="every layer", fused=True, special=PHI3_SPECIAL)
SMOLLM3 = _llama_like(
    "smollm3", "SmolLM3ForCausalLM", "flags",
    hf_fields=with_defaults(LLAMA_FIELDS, vocab_size=128256, hidden_size=2048, num_hidden_layers=36,
                            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768),
    windows="chosen layers", special=SMOLLM3_SPECIAL)
GRANITE = _llama_like("granite", "GraniteForCausalLM", "flags", special=GRANITE_SPECIAL)
EVERY_LAYER_SPARSE = (("decoder_sparse_step", 1), ("mlp_only_layers", []))  # written so: llmcli has no dense layers


def _mlp_experts(defaults: tuple[int, int], **options) -> Experts:
    """The experts as Qwen's and OLMoE's layouts name them: mlp.gate routes to mlp.experts.{e}.gate/up/down_proj."""
    return Experts("mlp.gate", "mlp.experts", ("gate_proj", "up_proj", "down_proj"), "num_experts", defaults,
                   **options)


MIXTRAL = _llama_like(
    "mixtral", "MixtralForCausalLM", (False, False, False),
    hf_fields=with_defaults(LLAMA_FIELDS, intermediate_size=14336, max_position_embeddings=4096 * 32,
                            rms_norm_eps=1e-5, num_key_value_heads=8),
    windows="every layer",
    experts=Experts("block_sparse_moe.gate", "block_sparse_moe.experts", ("w1", "w3", "w2"), "num_local_experts",
                    (8, 2), norm_topk_prob=True))
QWEN3_MOE = _llama_like(
    "qwen3_moe", "Qwen3MoeForCausalLM", "attention",
    hf_fields=with_defaults(LLAMA_FIELDS, vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                            num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4,
                            max_position_embeddings=32768),
    from_hf={"qk_norm": "head"}, windows="chosen layers",
    experts=_mlp_experts((128, 8), width_key="moe_intermediate_size", extra_to_hf=EVERY_LAYER_SPARSE))
OLMOE = _llama_like(
    "olmoe", "OlmoeForCausalLM", "attention",
    hf_fields=with_defaults(LLAMA_FIELDS, vocab_size=50304, hidden_size=2048, intermediate_size=2048,
                            num_hidden_layers=16, num_attention_heads=16, max_position_embeddings=4096,
                            rms_norm_eps=1e-5),
    from_hf={"qk_norm": "projection"},
    experts=_mlp_experts((64, 8)))
QWEN2_MOE = _llama_like(
    "qwen2_moe", "Qwen2MoeForCausalLM", (True, False, False),
    hf_fields=with_defaults(LLAMA_FIELDS, vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                            num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=32768),
    windows="chosen layers",
    experts=_mlp_experts((60, 4), width_key="moe_intermediate_size", extra_to_hf=EVERY_LAYER_SPARSE,
                         shared=("mlp.shared_expert", "mlp.shared_expert_gate", "shared_expert_intermediate_size")))
