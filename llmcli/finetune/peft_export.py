"""LoRA in PEFT's format (adapter_config.json + adapter_model.safetensors) for GPT-2, BERT, T5 and the
Llama layout (Llama, Mistral, Qwen2).

Module names come from the Hugging Face interop tables (llmcli.interop.hf), so the export fits the
checkpoint `llmcli convert to-hf` writes of the base (GPT2LMHeadModel, BertForMaskedLM,
T5ForConditionalGeneration, LlamaForCausalLM, ...): `PeftModel.from_pretrained(that_model, OUT/peft)`.

GPT-2 fuses q, k and v into one Conv1D, c_attn. Its LoRA is one A holding the A's of the adapted
projections stacked along the rank, and one B that maps each slice of the rank into its projection's
block of the fused output (zero elsewhere, and zero rows for an unadapted projection), so that
B A = [B_q A_q; 0; B_v A_v]. Every module is exported at the largest rank this needs (the others
zero-padded, which changes nothing), with lora_alpha scaled so that lora_alpha / r stays alpha / rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from llmcli.errors import UserError
from llmcli.finetune.lora import LoRALinear
from llmcli.interop.hf import check_expressible, spec_for
from llmcli.model_dir import atomic_output_dir, write_json
from llmcli.models.base import LanguageModel

PEFT_DIR = "peft"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
TASK_TYPES = {"gpt": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": None}  # PEFT has no masked-LM task type


def peft_blocker(model: torch.nn.Module, task: str) -> str | None:
    """Why this model cannot be exported in PEFT's format, or None if it can."""
    if task == "classify" and model.config.family != "t5":
        return "the class head has no counterpart in the Hugging Face model that `convert to-hf` writes"
    if not isinstance(model, LanguageModel):
        return "only a LoRA on the language model itself exports"
    try:
        check_expressible(spec_for(model.config), model.config, model.config.name)
    except UserError as e:
        return str(e)
    return None


def _fused_groups(model: LanguageModel) -> dict[str, list[tuple[LoRALinear | None, int]]]:
    """HF module name -> its llmcli parts in output order: (the LoRA layer or None, out_features)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    groups, covered = {}, set()
    for rule in spec_for(model.config).rules(model.config):
        if not rule.hf.endswith(".weight"):
            continue
        names = [name.removesuffix(".weight") for name in rule.ours]
        if any(name in layers for name in names):
            groups[rule.hf.removesuffix(".weight")] = [(layers.get(n), model.get_submodule(n).out_features)
                                                       for n in names]
            covered.update(n for n in names if n in layers)
    if covered != set(layers):  # a LoRA layer the table does not name: never drop weights silently
        raise RuntimeError(f"no Hugging Face name for {sorted(set(layers) - covered)}")
    return groups


def export_peft(model: LanguageModel, base_path: str | Path, out: Path) -> Path:
    """Write out/ (atomically) as a PEFT LoRA adapter of the model's Hugging Face counterpart."""
    groups = _fused_groups(model)
    if not groups:
        raise UserError("the model has no LoRA layers to export")
    layers = [layer for parts in groups.values() for layer, _ in parts if layer is not None]
    scaling, dropout = layers[0].scaling, layers[0].dropout.p
    rank = max(sum(layer.rank for layer, _ in parts if layer is not None) for parts in groups.values())
    tensors = {}
    for hf_name, parts in groups.items():
        present = next(layer for layer, _ in parts if layer is not None)
        a = torch.zeros(rank, present.in_features)
        b = torch.zeros(sum(size for _, size in parts), rank)
        slot = row = 0
        for layer, size in parts:
            if layer is not None:
                a[slot:slot + layer.rank] = layer.lora_A.detach().float().cpu()
                b[row:row + size, slot:slot + layer.rank] = layer.lora_B.detach().float().cpu()
                slot += layer.rank
            row += size
        tensors[f"base_model.model.{hf_name}.lora_A.weight"] = a
        tensors[f"base_model.model.{hf_name}.lora_B.weight"] = b
    spec = spec_for(model.config)
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES[model.config.family],
        "base_model_name_or_path": str(base_path), "r": rank, "lora_alpha": scaling * rank,
        "lora_dropout": dropout, "target_modules": sorted(groups), "bias": "none",
        "fan_in_fan_out": any(rule.conv1d for rule in spec.rules(model.config)),  # GPT-2's Conv1D is (in, out)
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    with atomic_output_dir(out, force=True) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / PEFT_CONFIG, config)
    return out
