"""`llmcli prune` on a model directory: load it, measure, prune (prune.py), optionally recover with a short
training run that keeps the pruned weights at zero, measure again, and write the pruned directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from llmcli.compression.directories import open_source, write_compressed
from llmcli.compression.prune import (PruneSpec, apply_masks, calibration_loss, check_pattern_fits, choose_experts,
                                      choose_heads, expert_cost, expert_usage, experts_to_remove, head_importance,
                                      heads_to_remove, layer_sparsity, mixtures, prune_experts, prune_heads,
                                      prune_weights)
from llmcli.compression.snapshot import compare, snapshot
from llmcli.errors import UserError
from llmcli.model_dir import check_outside
from llmcli.models.layout import block_linears
from llmcli.progress import SILENT, Progress
from llmcli.training.loop import Trainer, TrainArgs
from llmcli.training.run import final_validation

RECOVERY_LR = 2e-4  # a tenth of pre-training's default peak: recovery nudges, it does not re-train


def recover(model: nn.Module, masks: dict[str, torch.Tensor], corpus, steps: int, lr: float, seed: int,
            device: torch.device, progress: Progress = SILENT, log: Callable = print) -> dict:
    """A short training run with the family's objective that keeps the pruned weights at zero.

    Gradients of pruned weights are masked, so AdamW never moves them (zero moments, and decoupled
    decay of a zero is zero); the zeros are also re-applied after every step as a guard.
    """
    linears = block_linears(model)
    handles = [linears[name].weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype))
               for name, keep in masks.items()]
    args = TrainArgs(steps=steps, lr=lr, batch_size=corpus.train.batch_size, seq_len=corpus.seq_len, seed=seed,
                     device=str(device), eval_batches=len(corpus.val), log_every=max(1, steps // 10))
    try:
        with tempfile.TemporaryDirectory() as run_dir:  # checkpoints of a few steps are not worth keeping
            trainer = Trainer(model, corpus.train, corpus.val, args, Path(run_dir), progress=progress, log=log,
                              on_step=lambda t: apply_masks(linears, masks))
            trainer.fit()
    finally:
        for handle in handles:
            handle.remove()
    model.eval()
    final = final_validation(trainer.history)
    return {"steps": steps, "lr": lr, "val_loss": final["val_loss"], "val_perplexity": final["val_perplexity"]}


def _prune_experts(model, batches, target, removed: int, progress: Progress, log: Callable) -> dict:
    """Remove the least-used experts of every mixture; each removed expert's routed share and cost, measured alone
    before any is removed."""
    before = model.config.n_experts
    log(f"removing {removed} of {before} experts in each layer (round(sparsity·{before})), the least used on "
        f"{len(batches)} calibration batches")
    with progress.task("expert usage", len(batches), unit="batches") as task:
        usage = expert_usage(model, batches, target, task.update)
    drop = choose_experts(usage, removed)
    base = calibration_loss(model, batches, target)
    layers, rows = mixtures(model), []
    with progress.task("expert cost", removed * len(drop), unit="experts") as task:
        for name, experts in drop.items():
            costs = []
            for e in experts:
                costs.append({"expert": e, "routed_share": float(usage[name][e]),
                              "loss_increase": expert_cost(model, layers[name], e, batches, target) - base})
                task.update()
            rows.append({"name": name, "removed": costs})
    prune_experts(model, drop)
    return {"experts": rows, "calibration_loss": base,
            "n_experts": {"before": before, "after": model.config.n_experts}}


def prune(model_dir: str | Path, out: str | Path, spec: PruneSpec, data: str | None = None,
          seq_len: int | None = None, batch_size: int = 8, recover_steps: int = 0, lr: float | None = None,
          seed: int = 0, device: str = "auto", speed: bool = True, force: bool = False,
          progress: Progress = SILENT, log: Callable = print) -> dict:
    """Prune a model directory into `out`; returns the report (also written there as compression.json)."""
    source, out = Path(model_dir), Path(out)
    if recover_steps < 0:
        raise UserError(f"--recover-steps must be >= 0, got {recover_steps}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    check_outside(source, out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; choose another --out or pass --force to replace it")
    model, corpus, target = open_source(source, data, seq_len, device, batch_size=batch_size, seed=seed)
    if spec.method == "heads":  # refuse before the slow part
        removed = heads_to_remove(model, spec.sparsity)
    elif spec.method == "experts":
        removed = experts_to_remove(model, spec.sparsity)
    elif spec.pattern:
        check_pattern_fits(block_linears(model), spec.pattern)
    before = snapshot(model, corpus.val, target, speed)
    uses_data = spec.method != "magnitude"
    batches = [corpus.train.batch(i) for i in range(spec.calibration_batches)] if uses_data else []
    report = {"method": spec.method, **{k: v for k, v in spec.to_dict().items() if k != "method"},
              "calibration_batches": spec.calibration_batches if uses_data else 0, "source": str(source)}
    masks: dict[str, torch.Tensor] = {}
    if spec.method == "heads":
        config = model.config
        group_size = config.n_heads // config.n_kv_heads
        log(f"removing {removed * group_size} of {config.n_heads} heads in each attention layer "
            f"(round({spec.sparsity:g}·{config.n_kv_heads}) = {removed}"
            f"{f' kv groups of {group_size}' if group_size > 1 else ''})")
        with progress.task("head importance", len(batches), unit="batches") as task:
            importance = head_importance(model, batches, target, task.update)
        heads_before = (config.n_heads, config.n_kv_heads)
        report["heads"] = prune_heads(model, choose_heads(model, importance, removed))
        report.update(n_heads={"before": heads_before[0], "after": config.n_heads},
                      n_kv_heads={"before": heads_before[1], "after": config.n_kv_heads},
                      heads_removed_per_layer=heads_before[0] - config.n_heads)
    elif spec.method == "experts":
        report.update(_prune_experts(model, batches, target, removed, progress, log))
    else:
        masks = prune_weights(model, spec, batches, target, progress)
        log("zeros are stored densely: the file stays the same size and dense kernels run no faster")
        report["layers"], report["overall_sparsity"] = layer_sparsity(block_linears(model))
    report["recovery"] = None
    if recover_steps:
        report["pruned"] = {k: v for k, v in snapshot(model, corpus.val, target, speed=False).items()
                            if k in ("loss", "perplexity")}
        report["recovery"] = recover(model, masks, corpus, recover_steps, lr or RECOVERY_LR, seed, target,
                                     progress, log)
        if masks:
            report["layers"], report["overall_sparsity"] = layer_sparsity(block_linears(model))
    after = snapshot(model, corpus.val, target, speed)
    report.update(before=before, after=after, change=compare(before, after), out=str(out))
    write_compressed(model, source, out, report, force)
    return report
