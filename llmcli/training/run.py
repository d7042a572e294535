"""What pre-training, fine-tuning and distillation do alike before and after the loop: the flags as given,
the run directory, the resolved TrainArgs, the data path of a resumed run, the processes under torchrun,
and the final validation figures.

A run directory holds training.json ({"model", "data", "args", ...}: what a resume needs), metrics.jsonl
and checkpoints/, beside the model files.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Mapping

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.runtime import default_seq_len, resolve_device, resolve_precision
from llmcli.training import distributed
from llmcli.training.loggers import check_loggers
from llmcli.training.loop import TrainArgs
from llmcli.training.replay import resolved_flags, write_run_config

TRAINING_FILE = "training.json"
_ARG_NAMES = tuple(f.name for f in fields(TrainArgs))


@dataclass(frozen=True)
class TrainFlags:
    """The flags of a training command as given; None = not given, so a new run takes TrainArgs' default and
    a resumed run its saved value. strategy, tp and cpu_offload describe one launch under torchrun and are
    not saved with the run."""

    steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    grad_accum: int | None = None
    precision: str | None = None
    grad_checkpointing: bool | None = None
    compile: bool | None = None
    seed: int | None = None
    save_every: int | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    log_every: int | None = None
    device: str | None = None
    logger: list[str] | None = None
    router_aux_weight: float | None = None
    router_z_weight: float | None = None
    resume: bool = False
    force: bool = False
    strategy: str | None = None
    tp: int | None = None
    cpu_offload: bool | None = None
    command: str | None = None  # the CLI command and all its parameters, for run.toml (training.replay)
    params: Mapping | None = None

    @classmethod
    def from_params(cls, params: Mapping, command: str | None = None) -> TrainFlags:
        """The flags among a command's parsed parameters (typer's ctx.params); the others are the command's own."""
        names = {f.name for f in fields(cls)} - {"command", "params"}
        given = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()
                 if k in names and v is not None and v != ()}  # a repeatable option not given is ()
        return cls(**given, command=command,
                   params=dict(params) if command else None)

    def write_run_config(self, run_dir: Path, args: TrainArgs, data: str | None) -> None:
        """run.toml, when the run was started by a CLI command."""
        if self.command is not None:
            write_run_config(run_dir, self.command, resolved_flags(self.params, args.to_dict(), data))

    def replace(self, **changes) -> TrainFlags:
        return dataclasses.replace(self, **changes)

    def given_args(self) -> dict:
        return {name: getattr(self, name) for name in _ARG_NAMES if getattr(self, name) is not None}

    def train_args(self, saved: dict | None, config: ModelConfig) -> TrainArgs:
        """Defaults, overridden by a resumed run's saved flags, overridden by the flags given now; checked."""
        values = TrainArgs().to_dict()
        values.update({k: v for k, v in (saved or {}).items() if k in _ARG_NAMES})
        values.update(self.given_args())
        args = TrainArgs(**values)
        args.seq_len = args.seq_len or default_seq_len(config)
        check_args(args, config)
        return args


def check_args(args: TrainArgs, config: ModelConfig) -> None:
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("save_every", "eval_every", "warmup"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    check_loggers(args.logger)
    resolve_precision(args.precision, resolve_device(args.device))  # refused before the run directory is touched
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    for name in ("router_aux_weight", "router_z_weight"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.seq_len > config.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} is above {config.name}'s max_seq_len ({config.max_seq_len}); "
                        f"use --seq-len {config.max_seq_len} or less")


def read_run(run_dir: Path) -> dict:
    """training.json of a run to resume."""
    path = run_dir / TRAINING_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no run to resume (no {TRAINING_FILE}); drop --resume to start one")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); start a new run with --force") from None


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> dict | None:
    """The saved training.json of a run being resumed; refuses a new run over an old one without --force.
    Reads only: the old run stays until start_run_dir, after every other check has passed."""
    if resume:
        return read_run(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it, "
                        f"--force to start over, or choose another --out")
    return None


def start_run_dir(run_dir: Path) -> None:
    """An empty run directory for a new run (an old one, allowed by --force, is removed)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def resolve_data(data: str | None, saved: dict | None) -> str | None:
    """The corpus as an absolute path (a resume may start from elsewhere); a resumed run keeps its own."""
    data = str(Path(data).resolve()) if data is not None else None
    if saved is None:
        return data
    if data is not None and data != saved.get("data"):
        raise UserError(f"--data {data} differs from the resumed run's ({saved.get('data')}); resume with the "
                        f"same data")
    return saved.get("data")


def final_validation(history: list[dict]) -> dict:
    """The last logged validation record ({} if the run logged none)."""
    return next((r for r in reversed(history) if "val_loss" in r), {})


def in_processes(flags: TrainFlags, run: Callable):
    """run(parallel): parallel is None for one process, else this rank's distributed.Parallel under torchrun."""
    parallel = distributed.start(flags.strategy, flags.tp, flags.cpu_offload)
    result = run(parallel)
    distributed.stop(parallel)
    return result


def rank_log(parallel, log: Callable) -> Callable:
    """`log` on rank 0, nothing elsewhere."""
    return log if parallel is None or parallel.is_main else (lambda *args, **kwargs: None)
