"""Hugging Face interop: GPT-2, BERT, T5 and Llama-style (Llama, Mistral, Qwen2) checkpoints to and from llmcli
model directories.

Each architecture is described once: a table that pairs llmcli tensor names with Hugging Face's,
and a table of config fields. Both directions read the same tables, and a conversion only
transposes, splits and concatenates tensors, so llmcli -> HF -> llmcli is bit-identical.
Weights are read from safetensors only; pickle checkpoints are refused, never opened.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from llmcli.config import ModelConfig, config_from_dict
from llmcli.errors import UserError
from llmcli.model_dir import (CONFIG_FILE, PICKLE_SUFFIXES, QUANTIZATION_FILE, TOKENIZER_FILE, WEIGHTS_FILE,
                              atomic_output_dir, check_outside, load_model, read_safetensors, save_model,
                              write_json)
from llmcli.models import build_model, build_on_meta

INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"

# ---------------------------------------------------------------- tensor rules


@dataclass(frozen=True)
class Rule:
    """One Hugging Face tensor and the llmcli tensor(s) it holds.

    Several llmcli names: HF fuses them along the output dimension (GPT-2's c_attn holds q, k, v).
    conv1d: HF stores the weight as (in, out), the layout of GPT-2's Conv1D.
    """

    ours: tuple[str, ...]
    hf: str
    conv1d: bool = False

    def to_ours(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.conv1d and tensor.dim() == 2:
            tensor = tensor.t()
        return {name: part.contiguous() for name, part in zip(self.ours, tensor.chunk(len(self.ours)))}

    def to_hf(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        tensor = torch.cat([state[name] for name in self.ours])
        if self.conv1d and tensor.dim() == 2:
            tensor = tensor.t()
        return tensor.contiguous()


def _params(ours: str | tuple[str, ...], hf: str, bias: bool = True, conv1d: bool = False) -> list[Rule]:
    """The weight (and bias) of one layer; a tuple of llmcli layers is one fused HF layer."""
    layers = (ours,) if isinstance(ours, str) else ours
    kinds = ("weight", "bias") if bias else ("weight",)
    return [Rule(tuple(f"{layer}.{kind}" for layer in layers), f"{hf}.{kind}", conv1d) for kind in kinds]


def _stack(ours: str, hf: str, n_layers: int, block: list[Rule]) -> list[Rule]:
    """A block table repeated for layers 0 .. n_layers-1 under the two prefixes."""
    return [Rule(tuple(f"{ours}{i}.{name}" for name in rule.ours), f"{hf}{i}.{rule.hf}", rule.conv1d)
            for i in range(n_layers) for rule in block]


# ---------------------------------------------------------------- GPT-2

GPT2_BLOCK = [
    *_params("attn_norm", "ln_1"),
    *_params(("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.c_attn", conv1d=True),
    *_params("attn.o_proj", "attn.c_proj", conv1d=True),
    *_params("ff_norm", "ln_2"),
    *_params("ff.up", "mlp.c_fc", conv1d=True),
    *_params("ff.down", "mlp.c_proj", conv1d=True),
]


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    return [
        *_params("tok_emb", "transformer.wte", bias=False),
        *_params("decoder.pos_emb", "transformer.wpe", bias=False),
        *_stack("decoder.blocks.", "transformer.h.", cfg.n_layers, GPT2_BLOCK),
        *_params("decoder.final_norm", "transformer.ln_f"),
        *([] if cfg.tie_embeddings else _params("lm_head", "lm_head", bias=False)),
    ]


# ---------------------------------------------------------------- BERT

BERT_BLOCK = [
    *_params("attn.q_proj", "attention.self.query"),
    *_params("attn.k_proj", "attention.self.key"),
    *_params("attn.v_proj", "attention.self.value"),
    *_params("attn.o_proj", "attention.output.dense"),
    *_params("attn_norm", "attention.output.LayerNorm"),
    *_params("ff.up", "intermediate.dense"),
    *_params("ff.down", "output.dense"),
    *_params("ff_norm", "output.LayerNorm"),
]

BERT_MLM_HEAD = [
    *_params("mlm_head.dense", "cls.predictions.transform.dense"),
    *_params("mlm_head.norm", "cls.predictions.transform.LayerNorm"),
    Rule(("mlm_head.bias",), "cls.predictions.bias"),
]


def _bert_rules(cfg: ModelConfig) -> list[Rule]:
    return [
        *_params("tok_emb", "bert.embeddings.word_embeddings", bias=False),
        *(_params("type_emb", "bert.embeddings.token_type_embeddings", bias=False) if cfg.type_vocab_size else []),
        *_params("encoder.pos_emb", "bert.embeddings.position_embeddings", bias=False),
        *_params("encoder.emb_norm", "bert.embeddings.LayerNorm"),
        *_stack("encoder.blocks.", "bert.encoder.layer.", cfg.n_layers, BERT_BLOCK),
        *(_params("pooler", "bert.pooler.dense") if cfg.pooler else []),
        *BERT_MLM_HEAD,
        *([] if cfg.tie_embeddings else _params("lm_head", "cls.predictions.decoder", bias=False)),
    ]


# ---------------------------------------------------------------- T5


def _t5_attention(ours: str, hf: str) -> list[Rule]:
    return [rule for p in "qkvo" for rule in _params(f"{ours}.{p}_proj", f"{hf}.{p}", bias=False)]


def _t5_feed_forward(layer: int, gated: bool) -> list[Rule]:
    """T5 v1.1's gated FF computes act(wi_0 x) * wi_1 x: wi_0 is our gate, wi_1 our up."""
    ff = f"layer.{layer}.DenseReluDense"
    up = ([*_params("ff.gate", f"{ff}.wi_0", bias=False), *_params("ff.up", f"{ff}.wi_1", bias=False)] if gated
          else _params("ff.up", f"{ff}.wi", bias=False))
    return [*_params("ff_norm", f"layer.{layer}.layer_norm", bias=False), *up,
            *_params("ff.down", f"{ff}.wo", bias=False)]


def _t5_rules(cfg: ModelConfig) -> list[Rule]:
    gated = cfg.activation in ("geglu", "swiglu")
    self_attention = [*_params("attn_norm", "layer.0.layer_norm", bias=False),
                      *_t5_attention("attn", "layer.0.SelfAttention")]
    encoder_block = [*self_attention, *_t5_feed_forward(1, gated)]
    decoder_block = [*self_attention,
                     *_params("cross_norm", "layer.1.layer_norm", bias=False),
                     *_t5_attention("cross_attn", "layer.1.EncDecAttention"),
                     *_t5_feed_forward(2, gated)]
    # HF keeps each stack's relative position bias in its first block; the other blocks reuse it.
    return [
        *_params("tok_emb", "shared", bias=False),
        *_params("encoder.rel_bias.embedding", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                 bias=False),
        *_stack("encoder.blocks.", "encoder.block.", cfg.n_layers, encoder_block),
        *_params("encoder.final_norm", "encoder.final_layer_norm", bias=False),
        *_params("decoder.rel_bias.embedding", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                 bias=False),
        *_stack("decoder.blocks.", "decoder.block.", cfg.n_decoder_layers, decoder_block),
        *_params("decoder.final_norm", "decoder.final_layer_norm", bias=False),
        *([] if cfg.tie_embeddings else _params("lm_head", "lm_head", bias=False)),
    ]


# ---------------------------------------------------------------- Llama, Mistral, Qwen2


def _llama_rules(cfg: ModelConfig) -> list[Rule]:
    """LlamaForCausalLM's layout, which MistralForCausalLM and Qwen2ForCausalLM share."""
    block = [*_params("attn_norm", "input_layernorm", bias=False),
             *[rule for p in "qkvo" for rule in _params(f"attn.{p}_proj", f"self_attn.{p}_proj",
                                                         bias=cfg.projection_bias(p))],
             *_params("ff_norm", "post_attention_layernorm", bias=False),
             *_params("ff.gate", "mlp.gate_proj", bias=cfg.projection_bias("gate")),
             *_params("ff.up", "mlp.up_proj", bias=cfg.projection_bias("up")),
             *_params("ff.down", "mlp.down_proj", bias=cfg.projection_bias("down"))]
    return [
        *_params("tok_emb", "model.embed_tokens", bias=False),
        *_stack("decoder.blocks.", "model.layers.", cfg.n_layers, block),
        *_params("decoder.final_norm", "model.norm", bias=False),
        *([] if cfg.tie_embeddings else _params("lm_head", "lm_head", bias=False)),
    ]


def _llama_config(hf: dict) -> dict:
    """The fields every Llama-style config.json spells alike (Mistral and Qwen2 have no bias flags)."""
    return {"position": "rope", "rope_base": _rope(hf).get("rope_theta", 10000.0),
            "norm": "rmsnorm", "norm_position": "pre", "dropout": 0.0, "bias": False,
            "attention_bias": hf.get("attention_bias", False) or None, "mlp_bias": hf.get("mlp_bias", False) or None,
            "tokenizer": "bpe", "bos_token_id": hf.get("bos_token_id"), "eos_token_id": _first(hf.get("eos_token_id"))}


def _first(value):
    """Llama 3's eos_token_id may be a list; generation stops at the first of them."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _rope(hf: dict) -> dict:
    """Rotary settings: transformers 5 keeps them in rope_parameters, older configs in rope_theta and
    rope_scaling."""
    theta = {"rope_theta": hf["rope_theta"]} if "rope_theta" in hf else {}
    if isinstance(hf.get("rope_parameters"), dict):
        return {**theta, **hf["rope_parameters"]}
    scaling = hf.get("rope_scaling") if isinstance(hf.get("rope_scaling"), dict) else {}
    return {**scaling, **theta}


def _llama_to_hf(cfg: ModelConfig) -> dict:
    """Rotary settings in both spellings, so that transformers 4 and 5 read them."""
    return {"head_dim": cfg.d_head, "rope_theta": cfg.rope_base, "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pretraining_tp": 1}


def _unsupported_llama(hf: dict, where: str) -> None:
    """Refuse what llmcli's blocks do not compute, naming the field (never ignored silently)."""
    problems = []
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key)
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else rope
        if rope and kind != "default":
            problems.append(f"{key} ({kind!r} scaling: llmcli's rotary positions are unscaled)")
    window = hf.get("sliding_window")
    windowed = hf.get("use_sliding_window", hf.get("model_type") != "qwen2")  # Qwen2's default is off
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


# ---------------------------------------------------------------- the families


@dataclass(frozen=True)
class Family:
    """Everything that differs between the families; the conversion code below is shared."""

    family: str  # llmcli family
    model_type: str  # HF config.json model_type
    architecture: str  # what to-hf writes
    reads: tuple[str, ...]  # architectures from-hf accepts
    base_prefix: str  # where the bare base model's tensors sit inside `architecture`
    rules: Callable[[ModelConfig], list[Rule]]
    # (llmcli field, HF key, HF default): HF's config.json may leave defaults out.
    fields: tuple[tuple[str, str, Any], ...]
    activation_key: str
    activation_default: str
    # HF activation -> llmcli; to-hf writes the first HF name listed for an activation.
    activations: dict[str, str]
    fixed: dict[str, Any]  # HF options llmcli models have only one way (e.g. GPT-2 always scales attention)
    requires: dict[str, Any]  # llmcli fields the HF class cannot change
    emb_key: str  # HF token embedding
    head_key: str  # HF output projection, when not tied to the embedding
    ignored: str  # regex: HF tensors that hold nothing of their own (buffers, tied copies)
    # HF tensors kept twice, copy -> original: the copy is what HF's forward reads, and it is
    # separate when the embeddings are untied (transformers 5), so from-hf prefers it and to-hf writes both.
    copies: dict[str, str] = field(default_factory=dict)
    dropped: str = r"^$"  # regex: heads llmcli has no place for, dropped with a warning
    fresh: tuple[str, ...] = ()  # llmcli prefixes that may be missing: initialised afresh, with a warning
    free_head_size: bool = False  # d_head may differ from d_model / n_heads
    head_rescaled: bool = False  # T5: a tied head also rescales by d_model**-0.5 (llmcli ties the two)
    extra_from_hf: Callable[[dict, dict], dict] = lambda hf, state: {}
    extra_to_hf: Callable[[ModelConfig], dict] = lambda cfg: {}
    refuse: Callable[[dict, str], None] = lambda hf, where: None  # raises on config features llmcli lacks
    grouped_query: bool = False  # num_key_value_heads < num_attention_heads can be written
    biases: Callable[[ModelConfig], str | None] = lambda cfg: None  # why the projection biases do not fit


# Defaults below are those of transformers' GPT2Config, BertConfig and T5Config.
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
    extra_from_hf=lambda hf, state: {"d_ff": hf.get("n_inner") or 4 * hf.get("n_embd", 768)},
    extra_to_hf=lambda cfg: {"n_inner": cfg.d_ff, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                             # GPT-2's <|endoftext|>, where the vocabulary has it
                             "bos_token_id": 50256 if cfg.vocab_size > 50256 else None,
                             "eos_token_id": 50256 if cfg.vocab_size > 50256 else None},
)

BERT = Family(
    family="bert", model_type="bert", architecture="BertForMaskedLM", reads=("BertForMaskedLM", "BertModel"),
    base_prefix="bert.", rules=_bert_rules,
    fields=(("vocab_size", "vocab_size", 30522), ("d_model", "hidden_size", 768),
            ("n_layers", "num_hidden_layers", 12), ("n_heads", "num_attention_heads", 12),
            ("d_ff", "intermediate_size", 3072), ("max_seq_len", "max_position_embeddings", 512),
            ("type_vocab_size", "type_vocab_size", 2), ("norm_eps", "layer_norm_eps", 1e-12),
            ("dropout", "hidden_dropout_prob", 0.1)),
    activation_key="hidden_act", activation_default="gelu",
    activations={"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"},
    fixed={"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False},
    requires={"position": "learned", "norm": "layernorm", "norm_position": "post", "bias": True,
              "parallel_block": False},
    emb_key="bert.embeddings.word_embeddings.weight", head_key="cls.predictions.decoder.weight",
    ignored=r"embeddings\.(position_ids|token_type_ids)$",
    copies={"cls.predictions.decoder.bias": "cls.predictions.bias"},
    dropped=r"^cls\.seq_relationship\.",  # BERT's next-sentence head
    fresh=("mlm_head.", "lm_head."),
    # BertForMaskedLM has no pooler: a checkpoint without one becomes pooler = false.
    extra_from_hf=lambda hf, state: {"pooler": "bert.pooler.dense.weight" in state},
    extra_to_hf=lambda cfg: {"attention_probs_dropout_prob": cfg.dropout, "pad_token_id": 0},
)

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

# Llama's defaults (LlamaConfig); Mistral and Qwen2 differ in the defaults of their own Family below.
LLAMA_FIELDS = (("vocab_size", "vocab_size", 32000), ("d_model", "hidden_size", 4096),
                ("n_layers", "num_hidden_layers", 32), ("n_heads", "num_attention_heads", 32),
                ("n_kv_heads", "num_key_value_heads", None), ("d_head", "head_dim", None),
                ("d_ff", "intermediate_size", 11008), ("max_seq_len", "max_position_embeddings", 2048),
                ("norm_eps", "rms_norm_eps", 1e-6))


def _projection_biases(cfg: ModelConfig) -> tuple[bool, bool, bool]:
    """(q/k/v, o, feed-forward) biases."""
    return cfg.projection_bias("q"), cfg.projection_bias("o"), cfg.projection_bias("up")


def _llama_like(model_type: str, architecture: str, biases: tuple[bool, bool, bool] | None, fields=LLAMA_FIELDS,
                from_hf: dict | None = None, to_hf: dict | None = None) -> Family:
    """biases: the (q/k/v, o, feed-forward) biases the architecture has; None: attention_bias and mlp_bias.
    from_hf, to_hf: fixed fields of this architecture's llmcli config and config.json."""
    fixed_from_hf = {"hf_architecture": architecture, **(from_hf or {})}
    if biases is not None:  # no bias flags in its config.json: the architecture fixes them
        fixed_from_hf.update(attention_bias=None, mlp_bias=None, qkv_bias=True if biases[0] else None)

    def check_biases(cfg: ModelConfig) -> str | None:
        qkv, o, ff = _projection_biases(cfg)
        fits = (qkv == o) if biases is None else (qkv, o, ff) == biases
        return None if fits else f"projection biases q/k/v {qkv}, o {o}, feed-forward {ff}"

    return Family(
        family="gpt", model_type=model_type, architecture=architecture,
        reads=(architecture, architecture.replace("ForCausalLM", "Model")), base_prefix="model.",
        rules=_llama_rules, fields=fields, activation_key="hidden_act", activation_default="silu",
        activations={"silu": "swiglu"}, fixed={"attention_dropout": 0.0},
        requires={"position": "rope", "norm": "rmsnorm", "norm_position": "pre", "parallel_block": False},
        biases=check_biases,
        emb_key="model.embed_tokens.weight", head_key="lm_head.weight",
        ignored=r"\.rotary_emb\.inv_freq$", free_head_size=True, grouped_query=True, refuse=_unsupported_llama,
        extra_from_hf=lambda hf, state: {**_llama_config(hf), **fixed_from_hf},
        extra_to_hf=lambda cfg: {**_llama_to_hf(cfg), **(to_hf or {}), **({} if biases is not None else {
            "attention_bias": cfg.projection_bias("o"), "mlp_bias": cfg.projection_bias("up")})})


def _with(fields: tuple, **defaults) -> tuple:
    return tuple((ours, key, defaults.get(key, default)) for ours, key, default in fields)


LLAMA = _llama_like("llama", "LlamaForCausalLM", None)
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

SPECS = (GPT2, BERT, T5, LLAMA, MISTRAL, QWEN2)
BY_MODEL_TYPE = {spec.model_type: spec for spec in SPECS}
BY_ARCHITECTURE = {spec.architecture: spec for spec in SPECS}
SUPPORTED = ", ".join(arch for spec in SPECS for arch in spec.reads)


def spec_for(config: ModelConfig) -> Family:
    """The Hugging Face layout an llmcli config converts to: the one it came from, else by family and position
    (a rotary GPT becomes Qwen2 with q/k/v biases, Llama without)."""
    if config.hf_architecture in BY_ARCHITECTURE:
        return BY_ARCHITECTURE[config.hf_architecture]
    if config.family == "gpt" and config.position == "rope":
        return QWEN2 if config.projection_bias("q") and not config.projection_bias("o") else LLAMA
    return {"gpt": GPT2, "bert": BERT, "t5": T5}[config.family]


# ---------------------------------------------------------------- from Hugging Face


def convert_from_hf(src_dir: str | Path, out_dir: str | Path, force: bool = False) -> ModelConfig:
    """Turn a Hugging Face checkpoint directory into an llmcli model directory; returns the derived config."""
    src = Path(src_dir)
    shards = _weight_files(src)
    check_outside(src, out_dir, "OUT")
    hf_cfg = _read_hf_config(src)
    where = str(src / CONFIG_FILE)
    spec = _family_of(hf_cfg, where)
    with atomic_output_dir(out_dir, force) as tmp:
        state = {}
        for shard in shards:
            state.update(read_safetensors(shard))
        state = _normalise_names(spec, state)
        config = _config_from_hf(spec, {**hf_cfg, **_generation_ids(src)}, state, src.resolve().name, where)
        ours, fresh = _tensors_from_hf(spec, config, state, str(src))
        save_model(_assemble(config, ours, fresh, str(src)), tmp)
        _copy_tokenizer(src, tmp, warn=True)
    return config


def _normalise_names(spec: Family, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names the family's table uses, whatever layout the checkpoint was saved in."""
    if spec.base_prefix and not any(name.startswith(spec.base_prefix) for name in state):
        state = {spec.base_prefix + name: tensor for name, tensor in state.items()}  # a bare base model
    # Checkpoints converted from TensorFlow (bert-base-uncased) still call LayerNorm's weight and bias gamma, beta.
    legacy = {"gamma": "weight", "beta": "bias"}
    state = {re.sub(r"(LayerNorm\.)(gamma|beta)$", lambda m: m[1] + legacy[m[2]], name): tensor
             for name, tensor in state.items()}
    for copy, original in spec.copies.items():
        if copy in state:
            state[original] = state.pop(copy)
    return state


def _weight_files(src: Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint; pickle checkpoints are refused without being opened."""
    if src.is_file() and src.suffix in PICKLE_SUFFIXES:
        raise _pickle_error(src)
    if not src.is_dir():
        raise UserError(f"{src}: not a directory; pass a Hugging Face checkpoint directory "
                        f"(config.json + model.safetensors)")
    if (src / WEIGHTS_FILE).is_file():
        return [src / WEIGHTS_FILE]
    if (src / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((src / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{src / INDEX_FILE}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict):
            raise UserError(f"{src / INDEX_FILE}: 'weight_map' must map tensor names to shard files")
        names = sorted(set(weight_map.values()))
        outside = [name for name in names if Path(name).name != name]
        if outside:
            raise UserError(f"{src / INDEX_FILE}: shard {outside[0]!r} is outside the checkpoint directory")
        missing = [name for name in names if not (src / name).is_file()]
        if missing:
            raise UserError(f"{src}: shard {missing[0]} named in {INDEX_FILE} is missing; download it again")
        return [src / name for name in names]
    pickles = sorted(p for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_error(pickles[0])
    raise UserError(f"{src}: no {WEIGHTS_FILE} or {INDEX_FILE}; not a Hugging Face safetensors checkpoint")


def _pickle_error(path: Path) -> UserError:
    return UserError(f"{path}: is a pickle checkpoint, which llmcli never opens (unpickling can run arbitrary "
                     f"code); re-save it as safetensors, e.g. model.save_pretrained(dir, safe_serialization=True)")


def _read_hf_config(src: Path) -> dict:
    path = src / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{src}: no {CONFIG_FILE}; not a Hugging Face checkpoint directory") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _family_of(hf_cfg: dict, where: str) -> Family:
    architecture = (hf_cfg.get("architectures") or [None])[0]
    spec = BY_MODEL_TYPE.get(hf_cfg.get("model_type"))
    if spec is None or (architecture is not None and architecture not in spec.reads):
        what = architecture or f"model_type {hf_cfg.get('model_type')!r}"
        raise UserError(f"{where}: architecture {what} is not supported; llmcli converts {SUPPORTED}")
    return spec


def _config_from_hf(spec: Family, hf_cfg: dict, state: dict, name: str, where: str) -> ModelConfig:
    spec.refuse(hf_cfg, where)
    for key, value in spec.fixed.items():
        if hf_cfg.get(key, value) != value:
            raise UserError(f"{where}: {key} = {hf_cfg[key]!r} is not supported; llmcli {spec.family} models "
                            f"need {key} = {value!r}")
    activation = hf_cfg.get(spec.activation_key, spec.activation_default)
    if activation not in spec.activations:
        raise UserError(f"{where}: {spec.activation_key} = {activation!r} is not supported; "
                        f"llmcli converts {', '.join(spec.activations)}")
    data = {"name": name, "family": spec.family, "activation": spec.activations[activation],
            "tie_embeddings": _head_is_tied(spec, hf_cfg, state, where)}
    for ours, key, default in spec.fields:
        data[ours] = hf_cfg.get(key, default)
    data.update(spec.extra_from_hf(hf_cfg, state))
    return config_from_dict({k: v for k, v in data.items() if v is not None}, where)


def _head_is_tied(spec: Family, hf_cfg: dict, state: dict, where: str) -> bool:
    """Whether the output projection is the token embedding. Takes a tied copy out of `state`,
    and puts a separate head (or, for an untied T5 stored without one, a copy) in."""
    head, embedding = state.pop(spec.head_key, None), state.get(spec.emb_key)
    shared = head is None or embedding is None or torch.equal(head, embedding)
    if not spec.head_rescaled:
        tied = shared
    else:
        # T5 ties the d_model**-0.5 rescale to tied embeddings; transformers 5 names it scale_decoder_outputs.
        tied = hf_cfg.get("scale_decoder_outputs", hf_cfg.get("tie_word_embeddings", True) is not False)
        if tied and not shared:
            raise UserError(f"{where}: rescales the decoder output (tied embeddings) but has its own "
                            f"{spec.head_key}; llmcli has no such combination")
    if not tied and head is not None:
        state[spec.head_key] = head
    elif not tied and embedding is not None:
        state[spec.head_key] = embedding.clone()  # its own storage: safetensors refuses shared tensors
    return tied


def _tensors_from_hf(spec: Family, config: ModelConfig, state: dict,
                     where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our tensors by the family's table, and the names left to fresh initialisation."""
    ours, fresh, missing, used = {}, [], [], set()
    for rule in spec.rules(config):
        if rule.hf in state:
            ours.update(rule.to_ours(state[rule.hf]))
            used.add(rule.hf)
        elif spec.fresh and all(name.startswith(spec.fresh) for name in rule.ours):
            fresh.extend(rule.ours)
        else:
            missing.append(rule.hf)
    if missing:
        raise UserError(f"{where}: missing tensor {missing[0]} ({len(missing)} missing in all); the checkpoint "
                        f"is incomplete or not a {spec.architecture}")
    left = sorted(name for name in set(state) - used if not re.search(spec.ignored, name))
    dropped = [name for name in left if re.search(spec.dropped, name)]
    unknown = [name for name in left if name not in dropped]
    if unknown:
        raise UserError(f"{where}: {len(unknown)} tensors have no place in an llmcli {spec.family} model "
                        f"(e.g. {', '.join(unknown[:3])}); this {spec.architecture} variant is not supported")
    if dropped:
        _warn(f"{where}: dropped {len(dropped)} tensors of a head llmcli does not have: {', '.join(dropped)}")
    if fresh:
        tied = ", output projection tied to the token embeddings" if config.tie_embeddings else ""
        _warn(f"{where}: the checkpoint has no {', '.join(fresh)}; initialised them afresh (seed 0{tied}); "
              f"fine-tune before relying on them")
    return ours, fresh


def _assemble(config: ModelConfig, ours: dict[str, torch.Tensor], fresh: list[str], where: str):
    if fresh:
        with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's random stream
            model = build_model(config, seed=0)
    else:
        model = build_on_meta(config)
    expected = model.state_dict()
    for name, tensor in ours.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"{where}: tensor for {name} has shape {tuple(tensor.shape)}, config.json implies "
                            f"{tuple(expected[name].shape)}; the weights do not match config.json")
    model.load_state_dict(ours, strict=not fresh, assign=True)
    return model.to(dtype=ours["tok_emb.weight"].dtype)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _generation_ids(src: Path) -> dict:
    """BOS/EOS of generation_config.json, which generation uses over config.json's."""
    path = src / GENERATION_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt JSON ({e})") from None
    return {key: data[key] for key in ("bos_token_id", "eos_token_id") if isinstance(data, dict) and
            data.get(key) is not None}


def _copy_tokenizer(src: Path, out: Path, warn: bool = False) -> None:
    if (src / TOKENIZER_FILE).is_file():
        shutil.copyfile(src / TOKENIZER_FILE, out / TOKENIZER_FILE)
    elif warn:
        _warn(f"{src}: no {TOKENIZER_FILE}; the model converts, but eval, generate and training need one: copy the "
              f"checkpoint's tokenizer.json beside it")


# ---------------------------------------------------------------- to Hugging Face


def convert_to_hf(src_dir: str | Path, out_dir: str | Path, force: bool = False) -> str:
    """Write an llmcli model directory as a Hugging Face checkpoint; returns the HF architecture."""
    src = Path(src_dir)
    if not src.is_dir():
        raise UserError(f"{src}: not a model directory; to-hf converts a directory written by llmcli "
                        f"(build, train or convert from-hf)")
    check_outside(src, out_dir, "OUT")
    if (src / QUANTIZATION_FILE).is_file():
        raise UserError(f"{src}: is quantized ({QUANTIZATION_FILE}); transformers' classes hold float weights: "
                        f"convert the full-precision model, then quantize on either side")
    model = load_model(src)
    config = model.config
    spec = spec_for(config)
    check_expressible(spec, config, str(src))
    state = model.state_dict()
    with atomic_output_dir(out_dir, force) as tmp:
        rules = spec.rules(config)
        unmapped = set(state) - {name for rule in rules for name in rule.ours}
        if unmapped:  # a model parameter the table does not know: never drop weights silently
            raise RuntimeError(f"the {spec.model_type} interop table has no rule for {sorted(unmapped)}")
        tensors = {rule.hf: rule.to_hf(state) for rule in rules}
        tensors.update({copy: tensors[original].clone() for copy, original in spec.copies.items()})
        write_json(tmp / CONFIG_FILE, _config_to_hf(spec, config, state["tok_emb.weight"].dtype))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _copy_tokenizer(src, tmp)
    return spec.architecture


def check_expressible(spec: Family, config: ModelConfig, where: str) -> None:
    problems = [f"{key} = {getattr(config, key)!r} (it has {want!r})"
                for key, want in spec.requires.items() if getattr(config, key) != want]
    if config.activation not in spec.activations.values():
        supported = ", ".join(sorted(set(spec.activations.values())))
        problems.append(f"activation = {config.activation!r} (it has {supported})")
    if config.n_kv_heads != config.n_heads and not spec.grouped_query:
        problems.append(f"n_kv_heads = {config.n_kv_heads} (it has no grouped-query attention)")
    if (bias_problem := spec.biases(config)) is not None:
        problems.append(bias_problem)
    if not spec.free_head_size and config.d_attn != config.d_model:
        problems.append(f"d_head = {config.d_head} (it has d_head = d_model / n_heads = "
                        f"{config.d_model // config.n_heads})")
    if spec.family == "bert" and not config.type_vocab_size:
        problems.append("type_vocab_size = 0 (it has segment embeddings)")
    if problems:
        raise UserError(f"{where}: cannot become a Hugging Face {spec.architecture}: {'; '.join(problems)}")


def hf_config(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json `convert to-hf` writes for this config."""
    spec = spec_for(config)
    check_expressible(spec, config, config.name)
    return _config_to_hf(spec, config, dtype)


def _config_to_hf(spec: Family, config: ModelConfig, dtype: torch.dtype) -> dict:
    activation = next(hf for hf, ours in spec.activations.items() if ours == config.activation)
    return {
        "architectures": [spec.architecture], "model_type": spec.model_type,
        **{key: getattr(config, ours) for ours, key, _ in spec.fields},
        spec.activation_key: activation, "tie_word_embeddings": config.tie_embeddings,
        **spec.fixed, **spec.extra_to_hf(config), "dtype": str(dtype).removeprefix("torch."),
    }
