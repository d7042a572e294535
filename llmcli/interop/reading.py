"""Reading a Hugging Face checkpoint directory as it is: its config, and its model in memory.

`convert from-hf` writes what this reads; every command that reads a model (through `model_dir.load_model` and
`model_dir.resolve_config`) takes such a directory without a convert step. Tensors are read from the safetensors
file(s) when a rule first asks for them, so reading the config alone loads at most the embedding and the head
(to see whether they are tied). Pickle checkpoints are refused, never opened.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmcli.config import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, ModelConfig, config_from_dict
from llmcli.errors import UserError
from llmcli.interop.bert import BERT
from llmcli.interop.gemma import GEMMA2, GEMMA3
from llmcli.interop.gpt2 import GPT2
from llmcli.interop.llama import (GRANITE, LLAMA, MISTRAL, MIXTRAL, OLMO2, OLMOE, PHI3, QWEN2, QWEN2_MOE, QWEN3,
                                  QWEN3_MOE, SMOLLM3)
from llmcli.interop.t5 import T5
from llmcli.interop.tables import Family
from llmcli.models import build_model, build_on_meta

INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"

SPECS = (GPT2, BERT, T5, LLAMA, MISTRAL, QWEN2, QWEN3, OLMO2, PHI3, SMOLLM3, GRANITE, GEMMA2, GEMMA3, MIXTRAL,
         QWEN3_MOE, OLMOE, QWEN2_MOE)
BY_MODEL_TYPE = {spec.model_type: spec for spec in SPECS}
BY_ARCHITECTURE = {spec.architecture: spec for spec in SPECS}
SUPPORTED = ", ".join(arch for spec in SPECS for arch in spec.reads)


def is_hf_checkpoint(directory: Path) -> bool:
    """Whether a directory holds a Hugging Face checkpoint (config.json with model_type or architectures, no
    llmcli family), rather than an llmcli model directory."""
    try:
        data = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "family" not in data and ("model_type" in data or "architectures" in data)


def hf_checkpoint_config(src: Path) -> ModelConfig:
    """The llmcli config of a Hugging Face checkpoint directory, as `convert from-hf` would write it."""
    return _open(src)[2]


def load_hf_model(src: Path):
    """A Hugging Face checkpoint directory as an llmcli model, converted in memory."""
    spec, tensors, config = _open(src)
    ours, fresh = _tensors_from_hf(spec, config, tensors, str(src))
    return _assemble(config, ours, fresh, str(src))


def _open(src: Path) -> tuple[Family, "CheckpointTensors", ModelConfig]:
    shards = _weight_files(src)
    hf_cfg = _read_hf_config(src)
    where = str(src / CONFIG_FILE)
    spec = _family_of(hf_cfg, where)
    tensors = CheckpointTensors(shards)
    _normalise_names(spec, tensors)
    config = _config_from_hf(spec, {**hf_cfg, **_generation_ids(src)}, tensors, src.resolve().name, where)
    return spec, tensors, config


class CheckpointTensors(MutableMapping):
    """The tensors of a checkpoint's safetensors file(s) by name, each read from disk when it is asked for."""

    def __init__(self, shards: list[Path]):
        self._files, self._stored, self._held = {}, {}, {}
        for shard in shards:
            try:
                self._files[shard] = handle = safe_open(str(shard), framework="pt")
                self._stored.update({name: (shard, name) for name in handle.keys()})
            except (SafetensorError, OSError, ValueError) as e:
                raise _unreadable(shard, e) from None

    def rename(self, old: str, new: str) -> None:
        if old in self._held:
            self._held[new] = self._held.pop(old)
        else:
            self._stored[new] = self._stored.pop(old)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._held:
            return self._held[name]
        shard, stored = self._stored[name]
        try:
            return self._files[shard].get_tensor(stored)
        except (SafetensorError, OSError, ValueError) as e:
            raise _unreadable(shard, e) from None

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self._stored.pop(name, None)
        self._held[name] = tensor

    def __delitem__(self, name: str) -> None:
        if self._held.pop(name, None) is None:
            del self._stored[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._held
        yield from (name for name in self._stored if name not in self._held)

    def __len__(self) -> int:
        return len(self._held) + len(self._stored)


def _unreadable(path: Path, error: Exception) -> UserError:
    return UserError(f"{path}: not a readable safetensors file ({error}); download or re-save the checkpoint")


def _normalise_names(spec: Family, tensors: CheckpointTensors) -> None:
    """The names the family's table uses, whatever layout the checkpoint was saved in."""
    if spec.base_prefix and not any(name.startswith(spec.base_prefix) for name in tensors):
        for name in list(tensors):  # a bare base model
            tensors.rename(name, spec.base_prefix + name)
    # Checkpoints converted from TensorFlow (bert-base-uncased) still call LayerNorm's weight and bias gamma, beta.
    legacy = {"gamma": "weight", "beta": "bias"}
    for name in list(tensors):
        renamed = re.sub(r"(LayerNorm\.)(gamma|beta)$", lambda m: m[1] + legacy[m[2]], name)
        if renamed != name:
            tensors.rename(name, renamed)
    for copy, original in spec.copies.items():
        if copy in tensors:
            tensors.rename(copy, original)
def not_a_checkpoint(src: Path) -> UserError:
    if src.is_file() and src.suffix in PICKLE_SUFFIXES:
        return _pickle_error(src)
    return UserError(f"{src}: not a directory; pass a Hugging Face checkpoint directory (config.json + "
                     f"model.safetensors)")


def _weight_files(src: Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint; pickle checkpoints are refused without being opened."""
    if not src.is_dir():
        raise not_a_checkpoint(src)
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
        print_warning(f"{where}: dropped {len(dropped)} tensors of a head llmcli does not have: "
                      f"{', '.join(dropped)}")
    if fresh:
        tied = ", output projection tied to the token embeddings" if config.tie_embeddings else ""
        print_warning(f"{where}: the checkpoint has no {', '.join(fresh)}; initialised them afresh (seed 0{tied}); "
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


def print_warning(message: str) -> None:
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


