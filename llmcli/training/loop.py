"""The training loop shared by pre-training, fine-tuning and distillation.

One optimizer step = grad_accum micro-batches; batches are a pure function of (seed, step),
so the data position is the step number and resume is exact. Only rank 0 logs, draws the progress
bar and writes metrics. With `parallel` (under torchrun, see distributed.py) the model is wrapped for
DDP/FSDP/TP, each rank takes its rows of every batch, the logged loss is the mean over ranks, every rank
runs validation on the whole held-out set, and checkpoints are sharded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from llmcli.errors import UserError
from llmcli.training.optim import make_optimizer, make_scheduler
from llmcli.training.state import complete_checkpoints, load_checkpoint, save_checkpoint

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: five evaluations per run
    eval_batches: int = 8
    log_every: int = 10
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    if name not in PRECISIONS:
        raise UserError(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA (its gradient scaler is CUDA-only); use bf16 or fp32 on CPU")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def model_outputs(model, batch: dict[str, torch.Tensor]):
    """Call any family with the inputs its batch carries."""
    inputs = {k: v for k, v in batch.items()
              if k in ("attention_mask", "token_type_ids", "decoder_input_ids", "decoder_attention_mask")}
    return model(batch["input_ids"], **inputs)


def family_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over labelled positions (-100 = not scored): CLM, MLM or span targets."""
    logits = model_outputs(model, batch).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model, batches: list[dict], device: torch.device, precision: str = "fp32") -> dict:
    """Token-weighted validation loss and perplexity over a fixed set of batches."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"] != -100).sum())
        with autocast(device, precision):
            total += family_loss(model, batch).item() * n
        tokens += n
    model.train(was_training)
    if tokens == 0:
        raise UserError("validation split has no scored tokens; give more data")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": tokens}


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
    parallel: object = None  # a distributed.Parallel under torchrun; None for one process
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", 0)))
    step: int = 0
    stop_requested: bool = False
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        parallel = self.parallel
        self.device = parallel.use_device(self.args.device) if parallel else resolve_device(self.args.device)
        self.precision = resolve_precision(self.args.precision, self.device)
        self.model.to(self.device).train()
        for module in self.model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = self.args.grad_checkpointing
        self.autocast = self.precision
        if parallel:
            from llmcli.training.distributed import ShardedData

            self.model = parallel.wrap(self.model, self.precision)
            self.autocast = "fp32" if parallel.mixed_precision else self.precision  # FSDP casts by itself
            self.data = ShardedData(self.data, parallel.dp_rank, parallel.dp)
            self.rank = parallel.rank
        self.optimizer = make_optimizer(self.model, self.args.lr, self.args.weight_decay,
                                        foreach=not (parallel and parallel.tp > 1))
        warmup = self.args.warmup or max(1, self.args.steps // 20)
        self.scheduler = make_scheduler(self.optimizer, warmup, self.args.steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.is_main = self.rank == 0

    # ------------------------------------------------------------ checkpoints

    def resume(self) -> int:
        """Restore the newest complete checkpoint; returns its step (0 if there is none)."""
        checkpoints = complete_checkpoints(self.run_dir)
        if not checkpoints:
            raise UserError(f"{self.run_dir}: no checkpoint to resume from; drop --resume to start a new run")
        from llmcli.training import distributed

        if distributed.is_sharded_checkpoint(checkpoints[-1]):
            state = distributed.load_checkpoint(checkpoints[-1], self.model, self.optimizer, self.scheduler,
                                                self.scaler, self.parallel)
            ranks = self.parallel.dp if self.parallel else 1
            if state["global_batch"] != self.args.batch_size * ranks:
                raise UserError(f"{checkpoints[-1]} was trained on a global batch of {state['global_batch']} rows; "
                                f"keep --batch-size x data-parallel processes equal to it (now {self.args.batch_size}"
                                f" x {ranks}) so that resumed steps see the same batches")
        elif self.parallel:
            raise UserError(f"{checkpoints[-1]} was written by a single process; resume it without torchrun "
                            f"or --nproc")
        else:
            state = load_checkpoint(checkpoints[-1], self.model, self.optimizer, self.scheduler, self.scaler)
        self.step = state["step"]
        self._truncate_metrics()
        return self.step

    def save(self) -> Path | None:
        if self.parallel:  # every rank writes its shard
            from llmcli.training.distributed import save_checkpoint as save_sharded

            return save_sharded(self.parallel, self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
                                self.scaler, extra={"train_args": self.args.to_dict()})
        if not self.is_main:
            return None
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                               extra={"train_args": self.args.to_dict()})

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
                (self.scaler.scale(loss) if self.scaler else loss).backward()
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
        clip(self.model.parameters(), self.args.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return total

    def fit(self) -> dict:
        """Train to args.steps. The first Ctrl-C finishes the current step, saves and returns."""
        args = self.args
        eval_every = args.eval_every or max(1, args.steps // 5)
        tokens_per_step = self.data.tokens_per_batch * args.grad_accum
        previous = signal.signal(signal.SIGINT, self._request_stop) if _main_thread() else None
        start_step, window_start, window_steps = self.step, time.perf_counter(), 0
        result = {"stopped_early": False}
        try:
            with _Progress(self.is_main, args.steps, self.step) as bar:
                if self.step == 0:  # the untrained baseline, so the log shows what training bought
                    self._evaluate({})
                while self.step < args.steps:
                    loss = self.train_step()
                    window_steps += 1
                    record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
                    if self.step % args.log_every == 0 or self.step == args.steps:
                        elapsed = time.perf_counter() - window_start
                        record["tokens_per_s"] = window_steps * tokens_per_step / elapsed
                        window_start, window_steps = time.perf_counter(), 0
                        self._log(record)
                    if self.step % eval_every == 0 or self.step == args.steps:
                        self._evaluate(record)
                    bar.update(self.step, record)
                    if args.save_every and self.step % args.save_every == 0 and self.step < args.steps:
                        self.save()
                    if self.on_step:
                        self.on_step(self)
                    if self.parallel:  # all ranks stop at the same step
                        self.stop_requested = self.parallel.any(self.stop_requested)
                    if self.stop_requested:
                        result["stopped_early"] = True
                        break
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if not result["stopped_early"] and not any(r["step"] == self.step and "val_loss" in r for r in self.history):
            self._evaluate({})  # e.g. resuming a run that had already finished
        result["checkpoint"] = self.save()
        result.update(step=self.step, steps_run=self.step - start_step)
        return result

    def _evaluate(self, record: dict) -> None:
        metrics = self.eval_fn(self.model, self.val_batches, self.device, self.autocast)
        values = {f"val_{name}": value for name, value in metrics.items() if name != "tokens"}
        record.update(values)
        self._log({"step": self.step, **values})

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.is_main:
            _stderr("stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """After a resume, drop log lines from steps past the checkpoint (they will be redone)."""
        path = self.run_dir / "metrics.jsonl"
        if self.is_main and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in kept))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stderr(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message, highlight=False)


class _Progress:
    """A rich progress bar on stderr: step, loss, lr, tokens/s, validation perplexity, ETA."""

    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.enabled = enabled
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=Console(stderr=True))
            self.task = self.progress.add_task("train", total=total, completed=completed, info="")
            self.info: dict = {}

    def __enter__(self):
        if self.enabled:
            self.progress.start()
        return self

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self.info.update(record)
        parts = [f"loss {self.info['loss']:.3f}", f"lr {self.info['lr']:.1e}"]
        if "tokens_per_s" in self.info:
            parts.append(f"{self.info['tokens_per_s']:,.0f} tok/s")
        if "val_perplexity" in self.info:
            parts.append(f"val ppl {self.info['val_perplexity']:.1f}")
        if "val_accuracy" in self.info:
            parts.append(f"val acc {self.info['val_accuracy']:.3f}")
        self.progress.update(self.task, completed=step, info="  ".join(parts))

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()
