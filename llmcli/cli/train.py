"""`llmcli train` and `llmcli eval`."""

from __future__ import annotations

from typing import Optional

import typer

from llmcli.cli.output import console, log, print_json


def train(
    model: str = typer.Argument(..., help="Zoo name, TOML file or model directory to train."),
    data: Optional[str] = typer.Option(None, help="A .txt file, a folder of them, or JSONL with a 'text' field. "
                                                  "Default: the embedded Python documentation corpus."),
    out: Optional[str] = typer.Option(None, help="Run directory (default runs/NAME)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps [default: 400]."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per micro-batch [default: 16]."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence [default: the context, at most 128]."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [default: 2e-3]."),
    warmup: Optional[int] = typer.Option(None, help="Warm-up steps [default: 5% of steps]."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay on matrices [default: 0.1]."),
    precision: Optional[str] = typer.Option(None, help="fp32, bf16 or fp16 [default: bf16 on CUDA, else fp32]."),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                                      help="Recompute activations in the backward pass."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step [default: 1]."),
    seed: Optional[int] = typer.Option(None, help="Seed for weights, data order and dropout [default: 0]."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps [default: only at the end]."),
    eval_every: Optional[int] = typer.Option(None, help="Validate every N steps [default: 5 times per run]."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N [default: cuda if available]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in an --out that holds a run."),
) -> None:
    """Pre-train a model (GPT: next token, BERT: masked LM, T5: span corruption) and sample from it."""
    from llmcli.training.pretrain import pretrain

    given = dict(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup,
                 weight_decay=weight_decay, precision=precision, grad_checkpointing=grad_checkpointing,
                 grad_accum=grad_accum, seed=seed, save_every=save_every, eval_every=eval_every, device=device)
    summary = pretrain(model, data, out, given, resume=resume, force=force, log=log)
    if summary["stopped_early"]:
        log(f"stopped at step {summary['step']}; checkpoint {summary['checkpoint']}; "
            f"continue with `llmcli train {model} --out {summary['run_dir']} --resume`")
        return
    log(f"done: {summary['step']} steps, validation loss {summary['val_loss']:.4f}, "
        f"perplexity {summary['val_perplexity']:.2f} -> {summary['run_dir']}")
    if summary["family"] == "gpt":
        from llmcli.generation import complete
        from llmcli.model_dir import load_model, load_tokenizer

        prompt = "The"
        text = complete(load_model(summary["run_dir"]), load_tokenizer(summary["run_dir"]), prompt,
                        max_new_tokens=60, temperature=0.8, top_k=40, seed=0)
        log("[bold]sample[/bold] (temperature 0.8, top-k 40):", markup=True)
        log(prompt + text)


def evaluate(
    model_dir: str = typer.Argument(..., help="Model directory (with tokenizer.json)."),
    data: Optional[str] = typer.Option(None, help="Corpus whose held-out split is scored [default: embedded]."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence [default: the training run's]."),
    batches: int = typer.Option(8, help="Number of validation batches."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Validation loss and perplexity of the family's own objective on the held-out split."""
    from llmcli.training.evaluation import evaluate_model_dir

    result = evaluate_model_dir(model_dir, data, seq_len, batches)
    if json_out:
        print_json(result)
    else:
        console.print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
                      f"({result['tokens']:,} tokens, {result['objective']})", highlight=False)
