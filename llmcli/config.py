"""The model config dataclass, the zoo registry, and resolving NAME|TOML|DIR references.

Nothing here imports torch: `llmcli zoo list --help` and friends stay instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from llmcli.errors import UserError

# The files of a model directory; a Hugging Face checkpoint names its config and weights the same.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
QUANTIZATION_FILE = "quantization.json"  # only in quantized model directories
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # refused, never opened


def user_cache_dir() -> Path:
    """llmcli's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache): measured peaks, compiled kernels."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmcli"

FAMILIES = ("bert", "gpt", "t5")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu", "geglu")
NORMS = ("layernorm", "rmsnorm", "gemma_rmsnorm")  # gemma_rmsnorm: RMSNorm times (1 + w), w starting at 0
# pre: before each sublayer (GPT-2, Llama); post: after each residual add (BERT); output: on each sublayer's output,
# inside the residual (OLMo 2); sandwich: both, four norms a block (Gemma 2, Gemma 3)
NORM_POSITIONS = ("pre", "post", "output", "sandwich")
QK_NORMS = ("head", "projection")  # RMSNorm of q and k per head (Qwen3, Gemma 3) or over the projection (OLMo 2)
# relative = T5 bucketed bias; transformer_xl = Dai et al. 2019 relative attention (Gopher).
POSITIONS = ("learned", "sinusoidal", "rope", "relative", "transformer_xl")
TOKENIZERS = ("bpe", "wordpiece", "unigram")

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt": dict(activation="gelu_tanh", norm="layernorm", norm_position="pre", position="learned",
                bias=True, tie_embeddings=True, dropout=0.0, norm_eps=1e-5, tokenizer="bpe",
                type_vocab_size=0, pooler=False),
    "bert": dict(activation="gelu", norm="layernorm", norm_position="post", position="learned",
                 bias=True, tie_embeddings=True, dropout=0.1, norm_eps=1e-12, tokenizer="wordpiece",
                 type_vocab_size=2, pooler=True),
    "t5": dict(activation="relu", norm="rmsnorm", norm_position="pre", position="relative",
               bias=False, tie_embeddings=True, dropout=0.1, norm_eps=1e-6, tokenizer="unigram",
               type_vocab_size=0, pooler=False),
}


@dataclass
class ModelConfig:
    """Every architectural choice of a model. `None` means "the family default"."""

    name: str
    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    n_kv_heads: int | None = None  # < n_heads: GQA; 1: MQA
    n_decoder_layers: int | None = None  # t5 only
    d_head: int | None = None  # defaults to d_model // n_heads
    activation: str | None = None
    norm: str | None = None
    norm_position: str | None = None
    position: str | None = None
    bias: bool | None = None  # every linear layer and LayerNorm
    attention_bias: bool | None = None  # q, k, v and o projections (default: bias); Llama's attention_bias
    qkv_bias: bool | None = None  # q, k and v only (default: attention_bias); Qwen2
    mlp_bias: bool | None = None  # the feed-forward projections (default: bias); Llama's mlp_bias
    tie_embeddings: bool | None = None
    dropout: float | None = None
    norm_eps: float | None = None
    type_vocab_size: int | None = None  # bert segment embeddings
    pooler: bool | None = None  # bert [CLS] pooler
    relative_buckets: int = 32  # t5 relative attention
    relative_max_distance: int = 128
    rope_base: float = 10000.0
    rope_scaling: dict | None = None  # context extension: {type = "llama3", factor = 8.0, ...} (ROPE_SCALINGS)
    rotary_fraction: float = 1.0  # the leading share of each head's dimensions that rotates (Phi-4-mini: 0.75)
    qk_norm: str | None = None  # QK_NORMS: q and k normalised before rotary (None: not)
    sliding_window: int | None = None  # local attention: a query sees the last sliding_window positions (itself too)
    layer_types: list | None = None  # per layer "full" or "sliding" (default: every layer sliding if a window is set)
    nope_layers: list | None = None  # layers whose attention takes no rotary positions (SmolLM3: every 4th)
    embedding_multiplier: float = 1.0  # token embeddings times this (Granite)
    residual_multiplier: float = 1.0  # each sublayer's output times this before the residual add (Granite)
    attention_multiplier: float | None = None  # the q·kᵀ scale (default 1 / sqrt(d_head); Granite sets its own)
    logits_divisor: float = 1.0  # LM-head logits divided by this (Granite's logits_scaling)
    attention_softcap: float | None = None  # scores -> c·tanh(scores / c) before the softmax (Gemma 2)
    logits_softcap: float | None = None  # LM-head logits -> c·tanh(logits / c) (Gemma 2)
    rope_local_base: float | None = None  # rotary base of the sliding-window layers, unscaled (Gemma 3)
    parallel_block: bool = False  # attention and MLP side by side (GPT-J, PaLM)
    n_experts: int = 0  # > 0: each block's feed-forward is a mixture of this many experts (gpt family)
    experts_per_token: int = 2  # the k of top-k routing
    d_expert: int | None = None  # an expert's hidden width (default d_ff)
    norm_topk_prob: bool = False  # the top-k router probabilities renormalised to sum to 1 (Mixtral, Qwen3-MoE)
    d_shared_expert: int | None = None  # a shared expert of this width on every token, gated by sigmoid (Qwen2-MoE)
    tokenizer: str | None = None
    bos_token_id: int | None = None  # a converted checkpoint's own special tokens (its config or
    eos_token_id: int | None = None  # generation_config.json); None: found in the tokenizer by name
    stop_token_ids: list | None = None  # more ids that end a generated sequence (the rest of an EOS list)
    hf_architecture: str | None = None  # what `convert to-hf` writes (default: by family and position)
    published_params: int | None = None
    published_active_params: int | None = None  # a mixture of experts: the parameters one token uses
    source: str | None = None

    def __post_init__(self) -> None:
        for key, value in FAMILY_DEFAULTS.get(self.family, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_head is None and self.n_heads and self.d_model % self.n_heads == 0:
            self.d_head = self.d_model // self.n_heads
        if self.family == "t5" and self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers

    @property
    def expert_width(self) -> int:
        return self.d_expert or self.d_ff

    @property
    def d_attn(self) -> int:
        """Width of the concatenated attention heads."""
        return self.n_heads * self.d_head

    def window(self, layer: int) -> int | None:
        """The attention window of decoder layer `layer`, or None where it sees the whole context."""
        if self.sliding_window is None:
            return None
        return self.sliding_window if self.layer_types is None or self.layer_types[layer] == "sliding" else None

    def projection_bias(self, kind: str) -> bool:
        """Whether the projection q, k, v, o, up, gate or down has a bias."""
        attention = self.bias if self.attention_bias is None else self.attention_bias
        if kind in ("q", "k", "v"):
            return attention if self.qkv_bias is None else self.qkv_bias
        if kind == "o":
            return attention
        return self.bias if self.mlp_bias is None else self.mlp_bias

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELD_TYPES = {
    "int": int, "int | None": int, "float": float, "float | None": float,
    "str": str, "str | None": str, "bool": bool, "bool | None": bool, "dict | None": dict, "list | None": list,
}
_CHOICES = {"family": FAMILIES, "activation": ACTIVATIONS, "norm": NORMS,
            "norm_position": NORM_POSITIONS, "position": POSITIONS, "tokenizer": TOKENIZERS, "qk_norm": QK_NORMS}
# Each rotary scaling's keys (transformers' rope_parameters, original_max_position_embeddings shortened): required,
# then optional.
ROPE_SCALINGS = {
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"), ()),
    "yarn": (("factor", "original_max_seq_len"), ("beta_fast", "beta_slow", "attention_factor", "truncate")),
    "longrope": (("short_factor", "long_factor", "original_max_seq_len"), ("factor", "attention_factor")),
}
REQUIRED = ("name", "family", "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")


def config_from_dict(data: dict[str, Any], where: str) -> ModelConfig:
    """Validate a raw mapping (TOML or config.json) and resolve family defaults.

    `where` names the file in error messages. A None value (JSON null) means "the default".
    """
    data = {key: value for key, value in data.items() if value is not None}
    known = {f.name: f for f in fields(ModelConfig)}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "remove it"
            raise UserError(f"{where}: unknown key '{key}'; {hint}")
    for key in REQUIRED:
        if key not in data:
            raise UserError(f"{where}: missing required key '{key}'; add it (required: {', '.join(REQUIRED)})")
    for key, value in data.items():
        want = _FIELD_TYPES[str(known[key].type)]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            data[key] = value
            ok = True
        if not ok:
            raise UserError(f"{where}: key '{key}' must be {want.__name__}, got {type(value).__name__} {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise UserError(f"{where}: key '{key}' = {value!r} is not one of {', '.join(_CHOICES[key])}")
    cfg = ModelConfig(**data)
    _check_sizes(cfg, where)
    return cfg


def _check_sizes(cfg: ModelConfig, where: str) -> None:
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "n_kv_heads"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{where}: '{key}' must be positive, got {getattr(cfg, key)}")
    if cfg.d_head is None:
        raise UserError(f"{where}: d_model ({cfg.d_model}) is not divisible by n_heads ({cfg.n_heads}); "
                        f"change one of them or set d_head explicitly")
    if cfg.d_head <= 0:
        raise UserError(f"{where}: 'd_head' must be positive, got {cfg.d_head}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise UserError(f"{where}: n_heads ({cfg.n_heads}) is not divisible by n_kv_heads ({cfg.n_kv_heads}); "
                        f"use a divisor of n_heads (1 = multi-query)")
    if cfg.position == "rope" and cfg.d_head % 2:
        raise UserError(f"{where}: rotary positions need an even d_head, got {cfg.d_head}")
    if not 0.0 < cfg.rotary_fraction <= 1.0 or int(cfg.d_head * cfg.rotary_fraction) % 2:
        raise UserError(f"{where}: 'rotary_fraction' {cfg.rotary_fraction} must be in (0, 1] and leave an even "
                        f"number of rotating dimensions of d_head {cfg.d_head}")
    if cfg.rope_scaling is not None:
        _check_rope_scaling(cfg, where)
    if cfg.sliding_window is not None and cfg.sliding_window <= 0:
        raise UserError(f"{where}: 'sliding_window' must be positive, got {cfg.sliding_window}")
    layers = cfg.n_decoder_layers if cfg.family == "t5" else cfg.n_layers
    if cfg.layer_types is not None:
        if len(cfg.layer_types) != layers or not set(cfg.layer_types) <= {"full", "sliding"}:
            raise UserError(f"{where}: 'layer_types' must list \"full\" or \"sliding\" for each of the {layers} "
                            f"layers")
        if "sliding" in cfg.layer_types and cfg.sliding_window is None:
            raise UserError(f"{where}: 'layer_types' has sliding layers but no 'sliding_window'; set the window")
    if cfg.stop_token_ids is not None and not all(isinstance(i, int) and 0 <= i < cfg.vocab_size
                                                  for i in cfg.stop_token_ids):
        raise UserError(f"{where}: 'stop_token_ids' must list token ids below vocab_size ({cfg.vocab_size})")
    if cfg.nope_layers is not None and (cfg.position != "rope" or not all(
            isinstance(i, int) and 0 <= i < layers for i in cfg.nope_layers)):
        raise UserError(f"{where}: 'nope_layers' must list layer numbers 0..{layers - 1} of a rotary model")
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_divisor",
                "attention_softcap", "logits_softcap", "rope_local_base"):
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            raise UserError(f"{where}: '{key}' must be positive, got {getattr(cfg, key)}")
    if cfg.sliding_window is not None and cfg.family != "gpt":
        raise UserError(f"{where}: 'sliding_window' is for the gpt family; remove it")
    if cfg.position == "sinusoidal" and cfg.d_model % 2:
        raise UserError(f"{where}: sinusoidal positions need an even d_model, got {cfg.d_model}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"{where}: 'dropout' must be in [0, 1), got {cfg.dropout}")
    if cfg.family == "t5" and cfg.n_decoder_layers <= 0:
        raise UserError(f"{where}: 'n_decoder_layers' must be positive, got {cfg.n_decoder_layers}")
    if cfg.norm_position in ("output", "sandwich") and cfg.family != "gpt":
        raise UserError(f"{where}: norm_position {cfg.norm_position!r} is for the gpt family; use pre or post")
    if cfg.family != "t5" and cfg.n_decoder_layers is not None:
        raise UserError(f"{where}: 'n_decoder_layers' is only for the t5 family; remove it")
    if cfg.type_vocab_size < 0:
        raise UserError(f"{where}: 'type_vocab_size' must be >= 0, got {cfg.type_vocab_size}")
    if cfg.n_experts:
        if cfg.family != "gpt" or cfg.parallel_block:
            raise UserError(f"{where}: 'n_experts' is for the gpt family with sequential blocks; remove it")
        if cfg.n_experts < 0 or not 1 <= cfg.experts_per_token <= cfg.n_experts:
            raise UserError(f"{where}: 'experts_per_token' ({cfg.experts_per_token}) must be between 1 and "
                            f"n_experts ({cfg.n_experts})")
        for key in ("d_expert", "d_shared_expert"):
            if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
                raise UserError(f"{where}: '{key}' must be positive, got {getattr(cfg, key)}")


def _check_rope_scaling(cfg: ModelConfig, where: str) -> None:
    scaling = cfg.rope_scaling
    kind = scaling.get("type")
    if kind not in ROPE_SCALINGS:
        raise UserError(f"{where}: rope_scaling type {kind!r} is not one of {', '.join(ROPE_SCALINGS)}")
    required, optional = ROPE_SCALINGS[kind]
    missing = [key for key in required if scaling.get(key) is None]
    unknown = sorted(set(scaling) - {"type", *required, *optional})
    if missing or unknown:
        what = f"needs {', '.join(missing)}" if missing else f"has no key {unknown[0]!r}"
        raise UserError(f"{where}: rope_scaling {kind!r} {what} (its keys: {', '.join((*required, *optional))})")
    pairs = int(cfg.d_head * cfg.rotary_fraction) // 2  # rotary_fraction leaves an even number of dimensions
    for key in ("short_factor", "long_factor"):
        if key in scaling and (not isinstance(scaling[key], list) or len(scaling[key]) != pairs):
            raise UserError(f"{where}: rope_scaling {key} must list {pairs} numbers, one per rotating pair")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len", "beta_fast", "beta_slow",
                "attention_factor"):
        value = scaling.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise UserError(f"{where}: rope_scaling {key} must be a positive number, got {value!r}")


# ---------------------------------------------------------------- the zoo registry


def zoo_dirs() -> list[Path]:
    """The built-in zoo (inside the wheel, or the repo's zoo/ when run from source) plus LLMCLI_ZOO_PATH."""
    here = Path(__file__).resolve().parent
    dirs = [d for d in (here / "zoo", here.parent / "zoo") if d.is_dir()][:1]
    for extra in os.environ.get("LLMCLI_ZOO_PATH", "").split(os.pathsep):
        if extra:
            dirs.append(Path(extra))
    return dirs


def zoo_entries() -> dict[str, Path]:
    """Map of zoo name -> TOML path; a later folder overrides an earlier one."""
    entries: dict[str, Path] = {}
    for folder in zoo_dirs():
        for path in sorted(folder.rglob("*.toml")):
            entries[path.stem] = path
    return entries


def load_toml(path: Path) -> ModelConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: malformed TOML ({e}); fix the syntax") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return config_from_dict(data, str(path))


def load_config_json(directory: Path) -> ModelConfig:
    path = directory / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory}: not a model directory (no config.json); "
                        f"create one with `llmcli build NAME --out {directory}`") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt JSON ({e}); rebuild or re-convert the model") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of config fields")
    return config_from_dict(data, str(path))
