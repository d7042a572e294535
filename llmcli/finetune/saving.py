"""Saving and loading fine-tuned adapters, and folding LoRA into the weights.

A fine-tuning output is a model directory plus an adapter:

    config.json, tokenizer.json, model.safetensors   the base (LoRA, adapter, prompt: hard-linked from
                                                     DIR where possible) or the tuned weights (full)
    adapter/adapter_config.json                      method and hyperparameters, task, labels, template,
                                                     the base's config and its hash
    adapter/adapter.safetensors                      the trained tensors only (full: only the class head)

`load_model(OUT)` gives the base; `load_finetuned(OUT)` gives base + adapter, and
`load_finetuned(OUT, base=DIR)` puts the adapter on another copy of the base (its config must match).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
import torch.nn as nn

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.finetune.heads import language_model
from llmcli.finetune.lora import merge_lora
from llmcli.finetune.methods import FinetuneSpec, adapter_tensors, attach
from llmcli.model_dir import (atomic_output_dir, check_outside, copy_tokenizer_files, load_model,
                              read_quantization_spec, read_safetensors, resolve_config, save_model, write_json)

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
FORMAT = "llmcli-adapter"
# config fields that do not change the weights' shapes
NOT_ARCHITECTURE = ("name", "published_params", "source", "bos_token_id", "eos_token_id", "hf_architecture")
# fields added after adapters were first saved: they count only when set, so older adapters still match
LATER_FIELDS = ("attention_bias", "qkv_bias", "mlp_bias")


def config_hash(config: ModelConfig) -> str:
    """sha256 of the architecture fields: a renamed copy of the base still matches, another model does not."""
    return hashlib.sha256(json.dumps(_architecture(config), sort_keys=True).encode()).hexdigest()


def _architecture(config: ModelConfig | dict) -> dict:
    data = config if isinstance(config, dict) else config.to_dict()
    return {k: v for k, v in data.items()
            if k not in NOT_ARCHITECTURE and not (k in LATER_FIELDS and v is None)}


def head_kind(config: ModelConfig, task: str) -> str | None:
    if task != "classify":
        return None
    if config.family == "t5":
        return "text-to-text"
    return "last_token" if config.family == "gpt" else ("pooled" if config.pooler else "cls")


def save_adapter(model: nn.Module, spec: FinetuneSpec, labels: list[str] | None, base_config: ModelConfig,
                 base_path: str | Path, directory: Path, extra: dict | None = None) -> Path:
    """Write directory/adapter/ (atomically): the adapter tensors and their config."""
    tensors = {name: p.detach().cpu().contiguous() for name, p in adapter_tensors(model, spec).items()}
    meta = {"format": FORMAT, "version": 1, **spec.to_dict(), "labels": labels,
            "head": head_kind(base_config, spec.task), "template": "alpaca" if spec.task == "instruct" else None,
            "base_model": base_config.name, "base_config_sha256": config_hash(base_config),
            "base_path": str(Path(base_path).resolve()), "base_config": base_config.to_dict(),
            "params": sum(t.numel() for t in tensors.values()), **(extra or {})}
    with atomic_output_dir(directory / ADAPTER_DIR, force=True) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})  # one key keeps the bytes deterministic
        write_json(tmp / ADAPTER_CONFIG, meta)
    return directory / ADAPTER_DIR


def read_adapter_config(directory: str | Path) -> dict | None:
    """directory/adapter/adapter_config.json, or None where there is no adapter."""
    path = Path(directory) / ADAPTER_DIR / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable adapter config ({e}); fine-tune again to rewrite it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not {"method", "task"} <= set(meta):
        raise UserError(f"{path}: not an llmcli adapter config (a PEFT export lives in peft/, for the peft library)")
    return meta


def check_base(meta: dict, config: ModelConfig, base: Path, adapter: Path) -> None:
    """The adapter must have been trained on a model of exactly this architecture."""
    if meta.get("base_config_sha256") == config_hash(config):
        return
    saved, here = _architecture(meta.get("base_config") or {}), _architecture(config)
    diffs = [f"{k} {saved.get(k)!r} there, {here[k]!r} here" for k in here if saved.get(k) != here[k]]
    detail = "; ".join(diffs[:3]) or "its config hash differs"
    raise UserError(f"{adapter}: this adapter was trained on {meta.get('base_model')!r}, a different model from "
                    f"{base} ({detail}); load it on the base model it was trained on")


def load_finetuned(directory: str | Path, base: str | Path | None = None, device: str | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """A fine-tuning output: the base model with its adapter (and class head) loaded, in eval mode.

    A plain model directory (no adapter/) loads as it is.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    if meta is None:
        if base is not None:
            raise UserError(f"{directory}: holds no {ADAPTER_DIR}/ to load on {base}; pass a `llmcli finetune` output")
        return load_model(directory, device=device, dtype=dtype)
    base_dir = Path(base) if base is not None else directory
    config, found = resolve_config(base_dir)
    if found is None:
        raise UserError(f"{base_dir}: the base must be a model directory (config.json + model.safetensors)")
    adapter = directory / ADAPTER_DIR
    check_base(meta, config, base_dir, adapter)
    spec = FinetuneSpec.from_dict(meta)
    labels = meta.get("labels")
    with torch.random.fork_rng(devices=[]):  # new modules draw inits that are overwritten below
        model = attach(load_model(base_dir), spec, len(labels) if labels else None)
    tensors = read_safetensors(adapter / ADAPTER_WEIGHTS)
    expected = adapter_tensors(model, spec)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{adapter / ADAPTER_WEIGHTS}: tensors do not match {ADAPTER_CONFIG} ({detail}); "
                        f"the adapter directory mixes files from different runs")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise UserError(f"{adapter / ADAPTER_WEIGHTS}: '{name}' has shape {tuple(tensor.shape)}, the config "
                                f"implies {tuple(expected[name].shape)}; the adapter files do not belong together")
            expected[name].copy_(tensor)
    model.eval()
    return model.to(device=device or "cpu", dtype=dtype)


MERGE_REFUSALS = {
    "adapter": "adds bottleneck layers with a nonlinearity, which no weight matrix can absorb",
    "prompt": "adds learned input tokens, not a change of the weights",
}


def merge(directory: str | Path, out: str | Path, base: str | Path | None = None, force: bool = False) -> dict:
    """Fold a LoRA adapter into the weights: a plain model directory (with the class head for classify)."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    if meta is None:
        raise UserError(f"{directory}: holds no {ADAPTER_DIR}/, so it is not a `llmcli finetune` output; "
                        f"nothing to merge")
    method = meta.get("method")
    if method == "full":
        raise UserError(f"{directory}: was fine-tuned with --method full; its model.safetensors already holds the "
                        f"tuned weights, there is nothing to merge")
    if method in MERGE_REFUSALS:
        raise UserError(f"{directory}: --method {method} {MERGE_REFUSALS[method]}; only LoRA merges into the "
                        f"weights. Load it with llmcli.finetune.load_finetuned instead")
    quantized = read_quantization_spec(Path(base) if base else directory)
    if quantized is not None:
        raise UserError(f"{directory}: its LoRA was trained on a quantized ({quantized.get('scheme')}) model, and "
                        f"folding it into integer weights would round the update away; merge it into the model "
                        f"before quantization: `llmcli merge {directory} --base FULL_PRECISION_DIR --out DIR`")
    for source in (directory, *([base] if base else [])):
        check_outside(source, out)
    model = load_finetuned(directory, base)
    lm = merge_lora(language_model(model))
    with atomic_output_dir(out, force) as tmp:
        save_model(lm, tmp)
        for source in (directory, Path(base) if base else directory):
            if copy_tokenizer_files(source, tmp):
                break
        if meta["task"] == "classify":  # the head and labels stay beside the merged weights
            save_adapter(model, FinetuneSpec("full", "classify"), meta["labels"], lm.config, out, tmp,
                         extra={"merged_from": {k: meta[k] for k in ("method", "lora_rank", "lora_alpha",
                                                                     "lora_targets")}})
    return {"out": str(out), "task": meta["task"], "family": lm.config.family}
