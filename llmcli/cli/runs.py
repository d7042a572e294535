"""`llmcli runs show`: the curves and summary of one or more run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from llmcli.cli.output import console, heatmap, human, log, print_json

app = typer.Typer(no_args_is_help=True, help="Look at training runs: loss curves and a summary table.")


@app.command("show")
def show(
    run_dirs: list[str] = typer.Argument(..., help="One or more run directories (written by train, finetune or "
                                                   "distill)."),
    log_x: bool = typer.Option(False, "--log-x", help="Steps on a log scale."),
    png: Optional[str] = typer.Option(None, help="Also draw the curves to this PNG file (needs the plot extra)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary table as JSON on stdout."),
) -> None:
    """Training and validation loss curves in the terminal, and per run: steps, tokens, time, tokens/s and the
    best validation loss."""
    from llmcli.charts import text_chart
    from llmcli.runs import read_metrics, run_series, summarize, write_curves_png

    runs = [(d, read_metrics(d)) for d in run_dirs]  # each metrics.jsonl read once
    rows = [summarize(d, records) for d, records in runs]
    if png:
        log(f"wrote {write_curves_png(png, runs, log_x)}")
    if json_out:
        print_json(rows)
        return
    console.print("loss by step" + (" (log scale)" if log_x else ""))
    for line in text_chart(run_series(runs), log_x=log_x):
        console.print(line, highlight=False, markup=False)
    table = Table(title="runs", title_justify="left", box=box.SIMPLE, pad_edge=False)
    for column in ("run", "steps", "tokens", "time", "tok/s", "loss", "best val", "val ppl", "bits/B"):
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=column != "run")

    def figure(value, form: str) -> str:
        return "-" if value is None else form.format(value)

    for r in rows:
        best = "-" if r["best_val_loss"] is None else f"{r['best_val_loss']:.4f} @{r['best_val_step']}"
        table.add_row(Path(r["run"]).name, str(r["steps"]), figure(r["tokens"], "{:,}"),
                      figure(r["train_time_s"], "{:.1f} s"), human(r["tokens_per_s"]) if r["tokens_per_s"] else "-",
                      figure(r["final_loss"], "{:.4f}"), best, figure(r["best_val_perplexity"], "{:.1f}"),
                      figure(r["best_val_bits_per_byte"], "{:.3f}"))
    console.print(table)
    for r in rows:
        if r["expert_load"]:
            load = r["expert_load"]
            console.print(f"{Path(r['run']).name}: expert load at its last logged step (share of routed tokens; "
                          f"even would be {1 / len(load[0]):.3f} each)")
            console.print(heatmap(load, [f"layer {i}" for i in range(len(load))], [str(e) for e in range(len(load[0]))],
                                  color=console.color_system is not None, legend="the layer's busiest expert"),
                          soft_wrap=True)


@app.command("diff")
def diff(
    run_a: str = typer.Argument(..., help="A run directory (with run.toml)."),
    run_b: str = typer.Argument(..., help="The run directory to compare it with."),
    json_out: bool = typer.Option(False, "--json", help="Print the differences as JSON on stdout."),
) -> None:
    """The flags that differ between two runs' run.toml, and both runs' final figures side by side."""
    from llmcli.runs import diff_runs

    result = diff_runs(run_a, run_b)
    if json_out:
        print_json(result)
        return
    flags = Table(title="flags that differ" if result["flags"] else "flags: identical", title_justify="left")
    for column in ("flag", run_a, run_b):
        flags.add_column(column)
    for key, (a, b) in result["flags"].items():
        flags.add_row(key, "-" if a is None else str(a), "-" if b is None else str(b))
    console.print(flags)
    figures = Table(title="figures", title_justify="left")
    for column in ("figure", run_a, run_b):
        figures.add_column(column, justify="left" if column == "figure" else "right")
    for key, (a, b) in result["figures"].items():
        figures.add_row(key, *("-" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in (a, b)))
    console.print(figures)
