"""`llmcli distill`."""

from __future__ import annotations

from typing import Optional

import typer

from llmcli.cli import training_flags as flags
from llmcli.cli.output import BarProgress, console, log, print_json


def distill(
    ctx: typer.Context,
    config: flags.Config = None,
    teacher: Optional[str] = typer.Option(None, help="Trained teacher model directory (with tokenizer.json)."),
    student: Optional[str] = typer.Option(None, help="Student: zoo name, TOML file or model directory of the same "
                                                     "family and tokenizer (default: the teacher at half depth)."),
    student_layers: Optional[int] = typer.Option(None, help="Student = the teacher's config with this many layers."),
    init_from_teacher: bool = typer.Option(False, "--init-from-teacher",
                                           help="Start the student from the teacher's embeddings, heads and "
                                                "evenly spaced layers (every other one at half depth)."),
    alpha: float = typer.Option(0.5, help="Weight of the soft-target loss; 1 - alpha goes to the family's own loss."),
    temperature: float = typer.Option(1.0, help="Softmax temperature of the soft targets (loss scaled by T²)."),
    baseline: bool = typer.Option(False, "--baseline", help="Also train the same student without the teacher "
                                                            "(into OUT/baseline) and report both."),
    data: Optional[str] = typer.Option(None, help="Corpus (default: the embedded one); every 10th document held out."),
    out: str = typer.Option(..., help="Run directory for the student."),
    steps: flags.Steps = None,
    batch_size: flags.BatchSize = None,
    seq_len: flags.SeqLen = None,
    lr: flags.Lr = None,
    warmup: flags.Warmup = None,
    weight_decay: flags.WeightDecay = None,
    precision: flags.Precision = None,
    grad_checkpointing: flags.GradCheckpointing = None,
    compile: flags.Compile = None,
    grad_accum: flags.GradAccum = None,
    seed: flags.Seed = None,
    save_every: flags.SaveEvery = None,
    eval_every: flags.EvalEvery = None,
    device: flags.Device = None,
    logger: flags.Logger = None,
    resume: flags.Resume = False,
    force: flags.Force = False,
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip the speed measurement in the report."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Distil a teacher into a smaller student: α·T²·KL(teacher‖student) + (1-α)·the family's loss."""
    from llmcli.cli.compression_report import render_comparison
    from llmcli.compression.distill import distill as run
    from llmcli.training.run import TrainFlags

    report = run(teacher, student, data, out, TrainFlags.from_params(ctx.params, ctx.info_name), alpha=alpha,
                 temperature=temperature, student_layers=student_layers, init_from_teacher=init_from_teacher,
                 baseline=baseline, speed=not no_speed, log=log, progress=BarProgress())
    if "summary" in report:
        log(f"stopped at step {report['summary']['step']}; continue with `llmcli distill --out {out} --resume`")
        return
    if json_out:
        print_json(report)
        return
    render_comparison(report, f"distill {report['teacher']} (teacher, before) -> {report['out']} (student, after)")
    console.print(f"student perplexity = {report['change']['perplexity_ratio']:.2f}× the teacher's", highlight=False)
    if "baseline" in report:
        console.print(f"same student without the teacher: perplexity {report['baseline']['perplexity']:.2f} "
                      f"({report['baseline']['out']})", highlight=False)
