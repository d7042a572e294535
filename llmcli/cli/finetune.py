"""`llmcli finetune` and `llmcli merge`."""

from __future__ import annotations

from typing import Optional

import typer

from llmcli.cli import training_flags as flags
from llmcli.cli.output import BarProgress, log, print_json


def finetune(
    ctx: typer.Context,
    config: flags.Config = None,
    model: Optional[str] = typer.Argument(None, help="Trained model directory to start from (with tokenizer.json); "
                                                     "not needed with --resume."),
    method: Optional[str] = typer.Option(None, help="full, lora, adapter (Houlsby bottlenecks) or prompt "
                                                    "(prompt tuning)."),
    task: Optional[str] = typer.Option(None, help="lm (plain text, the family objective), instruct (JSONL: "
                                                  "instruction, input, output) or classify (JSONL: text, label)."),
    data: Optional[str] = typer.Option(None, help="Training data; every 10th example is held out for validation."),
    out: str = typer.Option(..., help="Run directory: the adapter, checkpoints and metrics go here."),
    lora_rank: Optional[int] = typer.Option(None, help="LoRA rank r (default: 8)."),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA alpha; updates are scaled by alpha / r (default: 16)."),
    lora_dropout: Optional[float] = typer.Option(None, help="Dropout on the LoRA input (default: 0)."),
    lora_targets: Optional[str] = typer.Option(None, help="Projections to adapt, comma-separated, of q,k,v,o,up,gate,"
                                                          "down (default: q,v)."),
    adapter_size: Optional[int] = typer.Option(None, help="Adapter bottleneck width (default: 64)."),
    prompt_tokens: Optional[int] = typer.Option(None, help="Virtual tokens learned by prompt tuning (default: 20)."),
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
    nproc: flags.Nproc = None,
    strategy: flags.Strategy = None,
    tp: flags.Tp = None,
    cpu_offload: flags.CpuOffload = False,
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Fine-tune a model: full, LoRA, adapters or prompt tuning, on text, instructions or labelled texts."""
    if nproc is not None:
        flags.launch(ctx, nproc, model if model is not None and not resume else out, out)
    from llmcli.training.distributed import is_main_process, rank_errors
    from llmcli.training.finetune import finetune as run
    from llmcli.training.run import TrainFlags

    settings = dict(method=method, task=task, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    lora_targets=lora_targets, adapter_size=adapter_size, prompt_tokens=prompt_tokens)
    with rank_errors():
        summary = run(model, data, out, TrainFlags.from_params(ctx.params, ctx.info_name), settings, log=log,
                      progress=BarProgress())
    if not is_main_process():
        return
    if json_out:
        print_json(summary)
    if summary["stopped_early"]:
        log(f"stopped at step {summary['step']}; continue with `llmcli finetune --out {out} --resume`")
        return
    metrics = [f"validation loss {summary['val_loss']:.4f}"]
    if summary.get("val_accuracy") is not None:
        metrics.append(f"accuracy {summary['val_accuracy']:.3f}")
    elif summary.get("val_perplexity") is not None:
        metrics.append(f"perplexity {summary['val_perplexity']:.2f}")
    log(f"done: {summary['step']} steps, {', '.join(metrics)} -> {summary['run_dir']}")
    if summary["peft"]:
        log(f"PEFT export (for the peft library, on `llmcli convert to-hf` of the base): {summary['peft']}")
    elif summary["peft_skipped"]:
        log(f"no PEFT export: {summary['peft_skipped']}")


def merge(
    model: str = typer.Argument(..., help="A `llmcli finetune --method lora` output."),
    out: str = typer.Option(..., help="Model directory to write."),
    base: Optional[str] = typer.Option(None, help="The base model directory (default: the one in MODEL)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Fold a LoRA adapter into the weights (W + alpha/r · B A): a plain model directory."""
    from llmcli.finetune import merge as run

    summary = run(model, out, base=base, force=force)
    head = " (with its class head in adapter/)" if summary["task"] == "classify" and summary["family"] != "t5" else ""
    log(f"merged {model} -> {out}{head}")
