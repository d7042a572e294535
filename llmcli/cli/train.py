"""`llmcli train` and `llmcli eval`."""

from __future__ import annotations

from typing import Optional

import typer

from llmcli.cli import training_flags as flags
from llmcli.cli.output import BarProgress, console, log, print_json


def train(
    ctx: typer.Context,
    config: flags.Config = None,
    model: str = typer.Argument(..., help="Zoo name, TOML file or model directory to train."),
    data: Optional[str] = typer.Option(None, help="A .txt file, a folder of them, or JSONL with a 'text' field. "
                                                  "Default: the embedded Python documentation corpus."),
    out: Optional[str] = typer.Option(None, help="Run directory (default runs/NAME)."),
    steps: flags.Steps = None,
    batch_size: flags.BatchSize = None,
    seq_len: flags.SeqLen = None,
    lr: flags.Lr = None,
    warmup: flags.Warmup = None,
    weight_decay: flags.WeightDecay = None,
    router_aux_weight: flags.RouterAuxWeight = None,
    router_z_weight: flags.RouterZWeight = None,
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
) -> None:
    """Pre-train a model (GPT: next token, BERT: masked LM, T5: span corruption) and sample from it."""
    if nproc is not None:
        flags.launch(ctx, nproc, model, out)
    from llmcli.training.distributed import is_main_process, rank_errors
    from llmcli.training.pretrain import pretrain
    from llmcli.training.run import TrainFlags

    with rank_errors():
        summary = pretrain(model, data, out, TrainFlags.from_params(ctx.params, ctx.info_name), log=log, progress=BarProgress())
    if not is_main_process():
        return
    if summary["stopped_early"]:
        log(f"stopped at step {summary['step']}; checkpoint {summary['checkpoint']}; "
            f"continue with `llmcli train {model} --out {summary['run_dir']} --resume`")
        return
    log(f"done: {summary['step']} steps, validation loss {summary['val_loss']:.4f}, "
        f"perplexity {summary['val_perplexity']:.2f}, {summary['val_bits_per_byte']:.3f} bits/byte "
        f"-> {summary['run_dir']}")
    if summary["family"] == "gpt":
        from llmcli.generation import complete
        from llmcli.model_dir import load_model, load_tokenizer

        prompt = "The"
        trained = load_model(summary["run_dir"])
        new_tokens = min(60, trained.config.max_seq_len // 2)  # a short context still has room for a sample
        text = complete(trained, load_tokenizer(summary["run_dir"]), prompt, max_new_tokens=new_tokens,
                        temperature=0.8, top_k=40, seed=0)
        log("[bold]sample[/bold] (temperature 0.8, top-k 40):", markup=True)
        log(prompt + text)


def evaluate(
    model_dir: str = typer.Argument(..., help="Model directory (with tokenizer.json)."),
    data: Optional[str] = typer.Option(None, help="Corpus whose held-out split is scored (default: embedded)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence (default: the training run's)."),
    batches: int = typer.Option(8, help="Number of validation batches."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Validation loss, perplexity and bits per byte of the family's own objective on the held-out split."""
    from llmcli.training.evaluation import evaluate_model_dir

    result = evaluate_model_dir(model_dir, data, seq_len, batches)
    if json_out:
        print_json(result)
    else:
        console.print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
                      f"bits/byte {result['bits_per_byte']:.3f}  ({result['tokens']:,} tokens, "
                      f"{result['bytes_per_token']:.2f} bytes/token, {result['objective']})", highlight=False)
