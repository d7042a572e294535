"""Hugging Face interop: GPT-2, BERT, T5, Llama-style and Gemma checkpoints to and from llmcli model directories,
written on disk (reading a checkpoint in memory is llmcli.interop.reading).

Each architecture is described once, in a module of its own (gpt2, bert, t5, llama, gemma): a table that pairs
llmcli tensor names with Hugging Face's, and a table of config fields (llmcli.interop.tables). Both directions read
the same tables, and a conversion only transposes, splits and concatenates tensors, so llmcli -> HF -> llmcli is
bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.interop.bert import BERT
from llmcli.interop.gemma import GEMMA2, GEMMA3
from llmcli.interop.gpt2 import GPT2
from llmcli.interop.llama import (GRANITE, GRANITE_SPECIAL, LLAMA, MIXTRAL, OLMO2, OLMOE, PHI3, QWEN2, QWEN3,
                                  QWEN2_MOE, QWEN3_MOE, SMOLLM3, specials)
from llmcli.interop.reading import BY_ARCHITECTURE, GENERATION_FILE, load_hf_model, not_a_checkpoint, print_warning
from llmcli.interop.t5 import T5
from llmcli.interop.tables import Family
from llmcli.model_dir import (CONFIG_FILE, QUANTIZATION_FILE, TOKENIZER_FILE, WEIGHTS_FILE, atomic_output_dir,
                              check_outside, copy_tokenizer_files, load_model, save_model, write_json)


def spec_for(config: ModelConfig) -> Family:
    """The Hugging Face layout an llmcli config converts to: the one it came from, else by family and position
    (a rotary GPT becomes Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE (a shared expert) with experts, Qwen3 with per-head
    QK-norm, OLMo 2 with projection QK-norm, Phi-3 with partial rotation, SmolLM3 with NoPE layers, Granite with its
    multipliers, Qwen2 with q/k/v biases, Llama without)."""
    if config.hf_architecture in BY_ARCHITECTURE:
        return BY_ARCHITECTURE[config.hf_architecture]
    if config.family == "gpt" and config.position == "rope":
        if config.n_experts:
            if config.d_shared_expert is not None:
                return QWEN2_MOE
            return {"projection": OLMOE, "head": QWEN3_MOE}.get(config.qk_norm, MIXTRAL)
        if config.norm_position == "sandwich":
            return GEMMA3 if config.rope_local_base is not None else GEMMA2
        if config.qk_norm is not None:
            return OLMO2 if config.qk_norm == "projection" else QWEN3
        extra = specials(config)
        if "rotary_fraction" in extra:
            return PHI3
        if "nope_layers" in extra:
            return SMOLLM3
        if extra & set(GRANITE_SPECIAL.keeps):
            return GRANITE
        return QWEN2 if config.projection_bias("q") and not config.projection_bias("o") else LLAMA
    return {"gpt": GPT2, "bert": BERT, "t5": T5}[config.family]


# ---------------------------------------------------------------- from Hugging Face


def convert_from_hf(src_dir: str | Path, out_dir: str | Path, force: bool = False) -> ModelConfig:
    """Turn a Hugging Face checkpoint directory into an llmcli model directory; returns the derived config."""
    src = Path(src_dir)
    if not src.is_dir():
        raise not_a_checkpoint(src)
    check_outside(src, out_dir, "OUT")
    with atomic_output_dir(out_dir, force) as tmp:
        model = load_hf_model(src)
        save_model(model, tmp)
        _copy_tokenizer(src, tmp, warn=True)
    return model.config


def _copy_tokenizer(src: Path, out: Path, warn: bool = False) -> None:
    if not copy_tokenizer_files(src, out) and warn:
        print_warning(f"{src}: no {TOKENIZER_FILE}; the model converts, but eval, generate and training need one: "
                      f"copy the checkpoint's tokenizer.json beside it")


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
        hf_cfg = _config_to_hf(spec, config, state["tok_emb.weight"].dtype)
        write_json(tmp / CONFIG_FILE, hf_cfg)
        if isinstance(hf_cfg.get("eos_token_id"), list):  # an EOS list: transformers' generate reads it here
            write_json(tmp / GENERATION_FILE, {key: hf_cfg[key] for key in GENERATION_KEYS
                                               if hf_cfg.get(key) is not None})
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _copy_tokenizer(src, tmp)
    return spec.architecture


GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def check_expressible(spec: Family, config: ModelConfig, where: str) -> None:
    problems = [f"{key} = {getattr(config, key)!r} (it has {want!r})"
                for key, want in spec.requires.items() if getattr(config, key) != want]
    if config.activation not in spec.activations.values():
        supported = ", ".join(sorted(set(spec.activations.values())))
        problems.append(f"activation = {config.activation!r} (it has {supported})")
    if config.n_experts and not spec.moe:
        problems.append(f"n_experts = {config.n_experts} (it has no mixture of experts)")
    if config.n_kv_heads != config.n_heads and not spec.grouped_query:
        problems.append(f"n_kv_heads = {config.n_kv_heads} (it has no grouped-query attention)")
    if (misfit := spec.misfit(config)) is not None:
        problems.append(misfit)
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
