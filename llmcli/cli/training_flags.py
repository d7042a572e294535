"""The training flags shared by `train`, `finetune` and `distill`, declared once.

Each defaults to None so that a resumed run keeps its saved value unless the flag is given. The
parallel flags (--nproc, --strategy, --tp, --cpu-offload) describe one launch and are not saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmcli.cli.output import log

Steps = Annotated[Optional[int], typer.Option(help="Optimizer steps (default: 400).")]
BatchSize = Annotated[Optional[int], typer.Option(help="Sequences per micro-batch (default: 16).")]
SeqLen = Annotated[Optional[int], typer.Option(help="Tokens per sequence, longer examples truncated "
                                                    "(default: the context, at most 128).")]
Lr = Annotated[Optional[float], typer.Option(help="Peak learning rate (default: 2e-3).")]
Warmup = Annotated[Optional[int], typer.Option(help="Warm-up steps (default: 5% of steps).")]
WeightDecay = Annotated[Optional[float], typer.Option(help="AdamW weight decay on matrices (default: 0.1).")]
RouterAuxWeight = Annotated[Optional[float], typer.Option(
    help="Mixture of experts: weight of the Switch load-balancing loss (default: 0.01; 0 turns it off).")]
RouterZWeight = Annotated[Optional[float], typer.Option(
    help="Mixture of experts: weight of the ST-MoE router z-loss (default: 0.001).")]
Precision = Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16 (default: bf16 on CUDA, else fp32).")]
GradCheckpointing = Annotated[Optional[bool], typer.Option("--grad-checkpointing/--no-grad-checkpointing",
                                                           help="Recompute activations in the backward pass.")]
Compile = Annotated[Optional[bool], typer.Option("--compile/--no-compile",
                                                help="torch.compile the transformer blocks (inductor; needs g++ "
                                                     "on the CPU). The first step includes the compile time.")]
GradAccum = Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step (default: 1).")]
Seed = Annotated[Optional[int], typer.Option(help="Seed for new weights, data order and dropout (default: 0).")]
SaveEvery = Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (default: only at the end).")]
EvalEvery = Annotated[Optional[int], typer.Option(help="Validate every N steps (default: 5 times per run).")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")]


def _replay(ctx: typer.Context, param, value: str | None) -> str | None:
    """--config run.toml: its flags become the defaults, so flags given on the command line win."""
    if value is not None:
        from llmcli.training.replay import read_run_config

        ctx.default_map = read_run_config(value, ctx.info_name, {p.name for p in ctx.command.params})
    return value


Config = Annotated[Optional[str], typer.Option(is_eager=True, callback=_replay,
                                               help="Replay a run: its run.toml (or run directory) gives every "
                                                    "flag not given on the command line.")]
Logger = Annotated[Optional[list[str]], typer.Option(help="Also log to csv (metrics.csv) or tensorboard (needs the "
                                                         "tensorboard extra); repeat for both. metrics.jsonl is "
                                                         "always written.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
Force = Annotated[bool, typer.Option("--force", help="Start over in an --out that holds a run.")]
Nproc = Annotated[Optional[int], typer.Option(help="Run N processes on this machine under torchrun (one per GPU, "
                                                   "or CPU processes with gloo); --batch-size is per process.")]
Strategy = Annotated[Optional[str], typer.Option(help="With several processes: ddp (a replica per process) or "
                                                      "fsdp (weights, gradients and optimizer states sharded) "
                                                      "(default: ddp).")]
Tp = Annotated[Optional[int], typer.Option("--tp", help="Tensor-parallel degree: split attention heads and "
                                                        "feed-forward units over N processes (default: 1).")]
CpuOffload = Annotated[bool, typer.Option("--cpu-offload", help="With --strategy fsdp on CUDA: keep the shards "
                                                                "and optimizer states in CPU memory.")]


def launch(ctx: typer.Context, nproc: int, model_ref: str, run_dir: str | None) -> None:
    """--nproc N: run this same command, without --nproc, as N processes under torchrun; exit with its code.

    The command line is rebuilt from the parsed parameters, so it is the same however llmcli was called.
    """
    from llmcli.model_dir import resolve_config
    from llmcli.training.distributed import launch as run

    config, _ = resolve_config(model_ref)
    params = ctx.params
    code = run(nproc, [ctx.info_name, *_command_line(ctx, skip=("nproc",))], params.get("strategy"),
               params.get("tp"), params.get("cpu_offload"), config, Path(run_dir or Path("runs") / config.name),
               log=log)
    raise typer.Exit(code)


def _command_line(ctx, skip: tuple[str, ...]) -> list[str]:
    arguments, options = [], []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in skip or value is None:
            continue
        if param.param_type_name == "argument":
            arguments.append(str(value))
        elif getattr(param, "is_flag", False):
            name = param.opts[0] if value else next(iter(param.secondary_opts), None)
            if name and value != param.default:
                options.append(name)
        elif isinstance(value, (list, tuple)):  # a repeatable option: once per value
            options += [part for item in value for part in (param.opts[0], str(item))]
        else:
            options += [param.opts[0], str(value)]
    return arguments + options
