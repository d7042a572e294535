"""Training checkpoints: model, optimizer, scheduler, loss scaler, RNG and data position, written atomically.

Layout: checkpoints/step-N/ holding state.json (step, scheduler, scaler, the run's flags, the layout that
wrote it), rng-R.safetensors (the RNG state of rank R: one file for a single process) and the tensors, in
one of two back ends:
- single process: config.json, model.safetensors and optimizer.safetensors (the optimizer's tensors; its
  scalars and param groups go into state.json);
- several processes (DDP, FSDP, TP under torchrun): torch.distributed.checkpoint, each rank writing its shard
  (DCP's .metadata marks it). It reshards on load, so it resumes on any number of ranks or in one process.

A checkpoint is written under a temporary name and renamed when complete (by rank 0 once every rank has
finished), so a run killed mid-write leaves the previous one intact; the last KEEP are kept. Nothing is
pickled: tensors go to safetensors (or DCP's files), everything else to JSON.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from llmcli.errors import UserError
from llmcli.model_dir import WEIGHTS_FILE, read_safetensors, reporting_disk_full, save_model, write_json

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index file: marks a sharded checkpoint
KEEP = 3
_STEP_DIR = re.compile(r"^step-(\d+)$")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary, half-written ones are ignored)."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / DCP_METADATA).is_file()


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, scaler, extra: dict,
                    parallel=None) -> Path:
    """Write checkpoints/step-N. With `parallel` (a distributed.Parallel) every rank must call it."""
    folder = run_dir / CHECKPOINTS
    final, tmp = folder / f"step-{step}", folder / f".step-{step}.tmp"
    main = parallel is None or parallel.is_main
    last = complete_checkpoints(run_dir)
    kept = f"the last complete checkpoint {last[-1]} is kept" if last else "no checkpoint was written yet"
    with reporting_disk_full(final, f"{kept}; continue with --resume"):
        try:
            _write_checkpoint(folder, tmp, step, model, optimizer, scheduler, scaler, extra, parallel)
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    if main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(run_dir)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    if parallel is not None:
        parallel.barrier()
    return final


def _write_checkpoint(folder: Path, tmp: Path, step: int, model, optimizer, scheduler, scaler, extra: dict,
                      parallel) -> None:
    main = parallel is None or parallel.is_main
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    state = {"step": step, "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None}
    if parallel is None:
        save_model(model, tmp)
        tensors, state["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        save_file(_rng_state(_device_of(model)), str(tmp / _rng_file(0)))
        state.update(world=1, strategy=None, tp=1)
    else:
        parallel.barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
        save_file(_rng_state(parallel.device), str(tmp / _rng_file(parallel.rank)))
        parallel.barrier()
        state.update(world=parallel.world, strategy=parallel.strategy, tp=parallel.tp)
    state["global_batch"] = extra["train_args"]["batch_size"] * (parallel.dp if parallel else 1)
    if main:
        write_json(tmp / STATE_FILE, {**state, **extra})


def load_checkpoint(checkpoint: Path, model, optimizer, scheduler, scaler, parallel=None) -> dict:
    """Restore everything save_checkpoint wrote, in place; returns state.json.

    A sharded checkpoint loads in any number of processes (DCP reshards); a single-process one only in
    a single process.
    """
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{checkpoint}: unreadable checkpoint state ({e}); delete it to resume from an earlier "
                        f"one") from None
    if is_sharded(checkpoint):
        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        with warnings.catch_warnings():  # without a process group DCP loads in this process, as meant here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(loaded, checkpoint_id=str(checkpoint))
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    elif parallel is not None:
        raise UserError(f"{checkpoint} was written by a single process; resume it without torchrun or --nproc")
    else:
        model.load_state_dict(read_safetensors(checkpoint / WEIGHTS_FILE))  # copies into the live parameters
        tensors = read_safetensors(checkpoint / OPTIMIZER_FILE)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = checkpoint / _rng_file(parallel.rank if parallel else 0)
    device = parallel.device if parallel else _device_of(model)
    if rng.is_file():
        _set_rng_state(read_safetensors(rng), device)
    elif not is_sharded(checkpoint) and "rng.cpu" in tensors:  # written before rng-R.safetensors existed
        legacy = {"rng.cpu": tensors["rng.cpu"], "rng.cuda": tensors.get(f"rng.cuda.{device.index or 0}")}
        _set_rng_state({k: v for k, v in legacy.items() if v is not None}, device)
    return state


def _rng_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The CPU generator, and the CUDA generator of this process's device."""
    state = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng.cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


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
