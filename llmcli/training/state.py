"""Training checkpoints: model, optimizer, scheduler, RNG and data position, written atomically.

Layout: checkpoints/step-N/{config.json, model.safetensors, optimizer.safetensors, state.json}.
A checkpoint is written under a temporary name and renamed when complete, so a run killed
mid-write leaves the previous one intact. Nothing is pickled: tensors go to safetensors,
everything else to JSON.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from llmcli.errors import UserError
from llmcli.model_dir import read_safetensors, save_model, write_json

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary, half-written ones are ignored)."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, scaler, extra: dict,
                    keep: int = 3) -> Path:
    folder = run_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step}"
    tmp = folder / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, tmp)
    tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    from safetensors.torch import save_file

    save_file(tensors, str(tmp / "optimizer.safetensors"))
    write_json(tmp / "state.json", {"step": step, "optimizer": optimizer_meta,
                                    "scheduler": scheduler.state_dict(),
                                    "scaler": scaler.state_dict() if scaler is not None else None, **extra})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(checkpoint: Path, model, optimizer, scheduler, scaler) -> dict:
    """Restore everything saved by save_checkpoint in place; returns state.json."""
    from llmcli.model_dir import WEIGHTS_FILE

    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{checkpoint}: unreadable checkpoint state ({e}); delete it to resume from an earlier one")
    model.load_state_dict(read_safetensors(checkpoint / WEIGHTS_FILE))  # copies into the live parameters
    tensors = read_safetensors(checkpoint / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return state


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
