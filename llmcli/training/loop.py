"""The training loop shared by pre-training, fine-tuning and distillation.

One optimizer step = grad_accum micro-batches; batches are a pure function of (seed, step),
so the data position is the step number and resume is exact. Only rank 0 logs, reports progress (to
the `progress` it is given: the CLI draws it) and writes metrics. With `parallel` (under torchrun, see
distributed.py) the model is wrapped for DDP/FSDP/TP, each rank takes its rows of every batch, the logged
loss is the mean over ranks, every rank runs validation on the whole held-out set, and checkpoints are
sharded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llmcli.errors import UserError
from llmcli.models.blocks import expert_loads, router_losses
from llmcli.progress import SILENT, Progress
from llmcli.runtime import (autocast, bits_per_byte, compile_blocks, evaluate, family_loss, resolve_device,
                            resolve_precision)
from llmcli.training.checkpoint import complete_checkpoints, is_sharded, load_checkpoint, save_checkpoint
from llmcli.training.distributed import ShardedData
from llmcli.training.loggers import METRICS_FILE, open_loggers
from llmcli.training.optim import make_optimizer, make_scheduler


@dataclass
class TrainArgs:
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 0  # 0: the model's context, at most 128
    lr: float = 2e-3
    warmup: int = 0  # 0: 5% of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "auto"  # bf16 on CUDA where supported, else fp32
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the blocks
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: five evaluations per run
    eval_batches: int = 8
    log_every: int = 10
    device: str = "auto"
    logger: list[str] = field(default_factory=lambda: ["jsonl"])  # metrics.jsonl always; also csv, tensorboard
    router_aux_weight: float = 0.01  # a mixture of experts: Switch load-balancing loss weight (Fedus et al. 2021)
    router_z_weight: float = 0.001  # and ST-MoE router z-loss weight (Zoph et al. 2022)

    def to_dict(self) -> dict:
        return asdict(self)


class TrainingDiverged(UserError):
    pass


@dataclass
class Trainer:
    """Runs TrainArgs.steps optimizer steps of `model` on `data`, checkpointing into run_dir."""

    model: torch.nn.Module
    data: object  # anything with .batch(index) -> dict and .tokens_per_batch
    val_batches: list[dict]
    args: TrainArgs
    run_dir: Path
    loss_fn: Callable = family_loss
    eval_fn: Callable = evaluate  # (model, val_batches, device, precision) -> {"loss", ...}; fine-tuning adds accuracy
    on_step: Callable | None = None  # called after every step with the trainer (tests, callbacks)
    progress: Progress = SILENT  # told the step and its figures after every step (rank 0 only)
    log: Callable[[str], None] = lambda message: None  # one-line notices (rank 0 only)
    parallel: object = None  # a distributed.Parallel under torchrun; None for one process
    val_bytes_per_token: float | None = None  # of the held-out text: validation then logs bits per byte too
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", 0)))
    step: int = 0
    stop_requested: bool = False
    history: list[dict] = field(default_factory=list)
    grad_norm: float = float("nan")  # the last step's gradient norm, before clipping

    def __post_init__(self) -> None:
        parallel = self.parallel
        self.device = parallel.use_device(self.args.device) if parallel else resolve_device(self.args.device)
        self.precision = resolve_precision(self.args.precision, self.device)
        self.model.to(self.device).train()
        for module in self.model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = self.args.grad_checkpointing
        self.autocast = self.precision
        self.compiled = False
        self.router_record: dict = {}  # a mixture of experts' router losses and expert load, for the log
        if self.args.compile:
            if parallel:
                raise UserError("--compile with several processes is not supported yet; drop --compile or --nproc")
            self.compiled = compile_blocks(self.model, self.device, self.log)
        if parallel:
            self.model = parallel.wrap(self.model, self.precision)
            self.autocast = "fp32" if parallel.mixed_precision else self.precision  # FSDP casts by itself
            self.data = ShardedData(self.data, parallel.dp_rank, parallel.dp)
            self.rank = parallel.rank
        self.optimizer = make_optimizer(self.model, self.args.lr, self.args.weight_decay,
                                        foreach=not (parallel and parallel.tp > 1), fused=parallel is None)
        warmup = self.args.warmup or max(1, self.args.steps // 20)
        self.scheduler = make_scheduler(self.optimizer, warmup, self.args.steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.is_main = self.rank == 0
        self.loggers: list = []  # opened by fit (training.loggers)

    # ------------------------------------------------------------ checkpoints

    def resume(self) -> int:
        """Restore the newest complete checkpoint; returns its step (0 if there is none)."""
        checkpoints = complete_checkpoints(self.run_dir)
        if not checkpoints:
            raise UserError(f"{self.run_dir}: no checkpoint to resume from; drop --resume to start a new run")
        state = load_checkpoint(checkpoints[-1], self.model, self.optimizer, self.scheduler, self.scaler,
                                self.parallel)
        ranks = self.parallel.dp if self.parallel else 1
        if is_sharded(checkpoints[-1]) and state["global_batch"] != self.args.batch_size * ranks:
            raise UserError(f"{checkpoints[-1]} was trained on a global batch of {state['global_batch']} rows; "
                            f"keep --batch-size x data-parallel processes equal to it (now {self.args.batch_size}"
                            f" x {ranks}) so that resumed steps see the same batches")
        self.step = state["step"]
        self._truncate_metrics()
        return self.step

    def save(self) -> Path | None:
        """A checkpoint of this step (under torchrun every rank writes its shard)."""
        if not self.parallel and not self.is_main:
            return None
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                               extra={"train_args": self.args.to_dict()}, parallel=self.parallel)

    # ------------------------------------------------------------ the loop

    def train_step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(self.args.grad_accum):
            batch = self.data.batch(self.step * self.args.grad_accum + micro)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            final_micro = micro == self.args.grad_accum - 1
            with self.parallel.no_sync(self.model, final_micro) if self.parallel else contextlib.nullcontext():
                with autocast(self.device, self.autocast):
                    loss = self.loss_fn(self.model, batch) / self.args.grad_accum
                    objective = loss + self._router_objective() / self.args.grad_accum
                (self.scaler.scale(objective) if self.scaler else objective).backward()
            total += loss.item()
        if self.parallel:  # every rank logs, and stops on, the same figure
            total = self.parallel.mean(total)
        if not math.isfinite(total):
            last = complete_checkpoints(self.run_dir)
            keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss became {total} at step {self.step + 1}; stopped, {keep}; "
                                   f"lower --lr, or use --precision fp32")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.parallel.clip_grad_norm_ if self.parallel else torch.nn.utils.clip_grad_norm_
        self.grad_norm = float(clip(self.model.parameters(), self.args.grad_clip))  # before clipping
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return total

    def _router_objective(self) -> torch.Tensor | float:
        """A mixture of experts' weighted load-balancing and z losses of the forward just run (0 without experts);
        their values and each layer's expert load are kept for the log."""
        routed = router_losses(self.model)
        if routed is None:
            return 0.0
        balance, z = routed
        self.router_record = {"router_balance_loss": balance.item(), "router_z_loss": z.item(),
                              "expert_load": [[round(share, 4) for share in layer] for layer in expert_loads(self.model)]}
        return self.args.router_aux_weight * balance + self.args.router_z_weight * z

    def fit(self) -> dict:
        """Train to args.steps. The first Ctrl-C finishes the current step, saves and returns."""
        args = self.args
        eval_every = args.eval_every or max(1, args.steps // 5)
        tokens_per_step = self.data.tokens_per_batch * args.grad_accum
        previous = signal.signal(signal.SIGINT, self._request_stop) if _main_thread() else None
        start_step, window_start, window_steps = self.step, time.perf_counter(), 0
        result = {"stopped_early": False}
        self.loggers = open_loggers(args.logger, self.run_dir, self.step) if self.is_main else []
        try:
            progress = self.progress if self.is_main else SILENT
            with progress.task("train", args.steps, self.step) as bar:
                if self.step == 0:  # the untrained baseline, so the log shows what training bought
                    self._evaluate({})
                while self.step < args.steps:
                    step_start = time.perf_counter()
                    loss = self.train_step()
                    window_steps += 1
                    if self.compiled and self.step == start_step + 1:  # compile time is not a training rate
                        self.log(f"first step {time.perf_counter() - step_start:.1f} s (compiling the blocks); "
                                 f"tokens/s count from the next")
                        window_start, window_steps = time.perf_counter(), 0
                    record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                              "grad_norm": self.grad_norm, "tokens": self.step * tokens_per_step,
                              **self.router_record}
                    if self.step % args.log_every == 0 or self.step == args.steps:
                        elapsed = time.perf_counter() - window_start
                        if window_steps:  # none right after the compiling step
                            record["tokens_per_s"] = window_steps * tokens_per_step / elapsed
                        window_start, window_steps = time.perf_counter(), 0
                        self._log(record)
                    if self.step % eval_every == 0 or self.step == args.steps:
                        self._evaluate(record)
                    bar.update(self.step, **record)
                    if args.save_every and self.step % args.save_every == 0 and self.step < args.steps:
                        self.save()
                    if self.on_step:
                        self.on_step(self)
                    if self.parallel:  # all ranks stop at the same step
                        self.stop_requested = self.parallel.any(self.stop_requested)
                    if self.stop_requested:
                        result["stopped_early"] = True
                        break
            if not result["stopped_early"] and not any(r["step"] == self.step and "val_loss" in r
                                                       for r in self.history):
                self._evaluate({})  # e.g. resuming a run that had already finished
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            for logger in self.loggers:
                logger.close()
        result["checkpoint"] = self.save()
        result.update(step=self.step, steps_run=self.step - start_step)
        return result

    def _evaluate(self, record: dict) -> None:
        metrics = self.eval_fn(self.model, self.val_batches, self.device, self.autocast)
        values = {f"val_{name}": value for name, value in metrics.items() if name != "tokens"}
        if self.val_bytes_per_token and "loss" in metrics:
            values["val_bits_per_byte"] = bits_per_byte(metrics["loss"], self.val_bytes_per_token)
        record.update(values)
        self._log({"step": self.step, **values})

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.is_main:
            self.log("stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            for logger in self.loggers:
                logger.log(record)

    def _truncate_metrics(self) -> None:
        """After a resume, drop log lines from steps past the checkpoint (they will be redone)."""
        path = self.run_dir / METRICS_FILE
        if self.is_main and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in kept))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
