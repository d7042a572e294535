"""Hugging Face interop: GPT-2, BERT, T5, Llama-style and Gemma checkpoints to and from llmcli model directories:
the conversion machinery, shared by every architecture.

Each architecture is described once, in a module of its own (gpt2, bert, t5, llama, gemma): a table that pairs
llmcli tensor names with Hugging Face's, and a table of config fields (llmcli.interop.tables). Both directions read
the same tables, and a conversion only transposes, splits and concatenates tensors, so llmcli -> HF -> llmcli is
bit-identical.
Weights are read from safetensors only; pickle checkpoints are refused, never opened.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmcli.config import ModelConfig, config_from_dict
from llmcli.errors import UserError
from llmcli.model_dir import (CONFIG_FILE, PICKLE_SUFFIXES, QUANTIZATION_FILE, TOKENIZER_FILE, WEIGHTS_FILE,
                              atomic_output_dir, check_outside, load_model, read_safetensors, save_model,
                              write_json)
from llmcli.interop.bert import BERT
from llmcli.interop.gemma import GEMMA2, GEMMA3
from llmcli.interop.gpt2 import GPT2
from llmcli.interop.llama import GRANITE, GRANITE_SPECIAL, LLAMA, MISTRAL, OLMO2, PHI3, QWEN2, QWEN3, SMOLLM3, specials
from llmcli.interop.t5 import T5
from llmcli.interop.tables import Family
from llmcli.models import build_model, build_on_meta

INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"

SPECS = (GPT2, BERT, T5, LLAMA, MISTRAL, QWEN2, QWEN3, OLMO2, PHI3, SMOLLM3, GRANITE, GEMMA2, GEMMA3)
BY_MODEL_TYPE = {spec.model_type: spec for spec in SPECS}
BY_ARCHITECTURE = {spec.architecture: spec for spec in SPECS}
SUPPORTED = ", ".join(arch for spec in SPECS for arch in spec.reads)


def spec_for(config: ModelConfig) -> Family:
    """The Hugging Face layout an llmcli config converts to: the one it came from, else by family and position
    (a rotary GPT becomes Qwen3 with per-head QK-norm, OLMo 2 with projection QK-norm, Phi-3 with partial rotation,
    SmolLM3 with NoPE layers, Granite with its multipliers, Qwen2 with q/k/v biases, Llama without)."""
    if config.hf_architecture in BY_ARCHITECTURE:
        return BY_ARCHITECTURE[config.hf_architecture]
    if config.family == "gpt" and config.position == "rope":
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
    data.update(spec.extra_from_hf(hf_cfg, state, where))
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
