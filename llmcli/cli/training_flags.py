"""The training flags shared by `train`, `finetune` and `distill`, declared once.

Each defaults to None so that a resumed run keeps its saved value unless the flag is given.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Steps = Annotated[Optional[int], typer.Option(help="Optimizer steps (default: 400).")]
BatchSize = Annotated[Optional[int], typer.Option(help="Sequences per micro-batch (default: 16).")]
SeqLen = Annotated[Optional[int], typer.Option(help="Tokens per sequence, longer examples truncated "
                                                    "(default: the context, at most 128).")]
Lr = Annotated[Optional[float], typer.Option(help="Peak learning rate (default: 2e-3).")]
Warmup = Annotated[Optional[int], typer.Option(help="Warm-up steps (default: 5% of steps).")]
WeightDecay = Annotated[Optional[float], typer.Option(help="AdamW weight decay on matrices (default: 0.1).")]
Precision = Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16 (default: bf16 on CUDA, else fp32).")]
GradCheckpointing = Annotated[Optional[bool], typer.Option("--grad-checkpointing/--no-grad-checkpointing",
                                                           help="Recompute activations in the backward pass.")]
GradAccum = Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step (default: 1).")]
Seed = Annotated[Optional[int], typer.Option(help="Seed for new weights, data order and dropout (default: 0).")]
SaveEvery = Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (default: only at the end).")]
EvalEvery = Annotated[Optional[int], typer.Option(help="Validate every N steps (default: 5 times per run).")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
Force = Annotated[bool, typer.Option("--force", help="Start over in an --out that holds a run.")]

NAMES = ("steps", "batch_size", "seq_len", "lr", "warmup", "weight_decay", "precision", "grad_checkpointing",
         "grad_accum", "seed", "save_every", "eval_every", "device")


def given(values: dict) -> dict:
    """The TrainArgs flags out of a command's arguments (None = not given)."""
    return {name: values[name] for name in NAMES}
