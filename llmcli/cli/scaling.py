"""`llmcli scaling sweep | fit | plan`."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from llmcli.cli import training_flags as flags
from llmcli.cli.output import BarProgress, console, human, log, print_json
from llmcli.errors import UserError

app = typer.Typer(no_args_is_help=True, help="Scaling laws: sweep model sizes, fit L(N) or L(N, D), plan a budget.")


@app.command("sweep")
def sweep(
    models: str = typer.Option(..., help="Comma-separated zoo names, TOML files or directories, e.g. "
                                         "gpt-nano,gpt-micro,gpt-mini."),
    out: str = typer.Option(..., help="Sweep directory: one run directory per model and runs.jsonl."),
    tokens: Optional[str] = typer.Option(None, help="Training tokens per model (comma-separated for several "
                                                    "budgets, e.g. 2e5,6e5)."),
    compute: Optional[str] = typer.Option(None, help="Training FLOPs per model, C ≈ 6·N·D (comma-separated for "
                                                     "several budgets)."),
    data: Optional[str] = typer.Option(None, help="Corpus (default: the embedded one)."),
    batch_size: flags.BatchSize = None,
    seq_len: flags.SeqLen = None,
    lr: flags.Lr = None,
    seed: flags.Seed = None,
    device: flags.Device = None,
    precision: flags.Precision = None,
    force: bool = typer.Option(False, "--force", help="Allow models with different vocabularies in one sweep."),
    json_out: bool = typer.Option(False, "--json", help="Print the runs as JSON on stdout."),
) -> None:
    """Train each model on the same data with the same token or FLOP budget; record N, D, C, time and loss."""
    from llmcli.scaling.sweep import sweep as run
    from llmcli.training.run import TrainFlags

    flags = TrainFlags(batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed, device=device, precision=precision)
    rows = run([m.strip() for m in models.split(",") if m.strip()], out, tokens, compute, data, flags, force, log,
               BarProgress())
    if json_out:
        print_json(rows)
        return
    table = Table(title=f"scaling sweep -> {out}/runs.jsonl", title_justify="left")
    for column in ("run", "N (non-emb.)", "D tokens", "C FLOPs", "wall", "val loss", "perplexity"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in sorted(rows, key=lambda r: (r["n"], r["d"])):
        table.add_row(row["name"], human(row["n"]), human(row["d"]), f"{row['compute']:.3g}", f"{row['wall_s']:.0f} s",
                      f"{row['loss']:.4f}", f"{row['perplexity']:.2f}")
    console.print(table)
    log(f"fit it: llmcli scaling fit {out}")


@app.command("fit")
def fit(
    runs: str = typer.Argument(..., help="A sweep directory or a runs.jsonl file."),
    form: str = typer.Option("auto", help="N: L(N) = E + A·N^-α; N,D: + B·D^-β; auto: N,D if the runs vary both."),
    bootstrap: int = typer.Option(200, help="Bootstrap resamples for the 95% intervals (0: none)."),
    png: Optional[str] = typer.Option(None, help="Also draw the fit to this PNG (needs matplotlib)."),
    force: bool = typer.Option(False, "--force", help="Fit runs from different datasets together."),
    json_out: bool = typer.Option(False, "--json", help="Print the fit as JSON on stdout."),
) -> None:
    """Fit a scaling law to sweep runs, with bootstrap confidence intervals and a log-log chart."""
    from llmcli.scaling.chart import fit_chart_data, text_chart, write_png
    from llmcli.scaling.fit import fit_runs, read_runs

    if bootstrap < 0:
        raise UserError(f"--bootstrap {bootstrap} must be 0 (no intervals) or more")
    found = read_runs(runs, force)
    result = fit_runs(found, form, bootstrap)
    points, curve = fit_chart_data(result, found)
    if png:
        write_png(png, points, curve, f"L({result.form}) fit, {len(found)} runs")
    if json_out:
        print_json({**result.to_dict(), "png": png})
        return
    table = Table(title=f"L({result.form}) over {len(found)} runs (Huber on log loss, L-BFGS)", title_justify="left")
    for column in ("constant", "value", "95% interval"):
        table.add_column(column, justify="left" if column == "constant" else "right")
    for key, value in result.params.items():
        low_high = result.intervals.get(key)
        table.add_row(key, f"{value:.4g}", f"{low_high[0]:.4g} .. {low_high[1]:.4g}" if low_high else "-")
    console.print(table)
    console.print(f"rms error of log loss: {result.residual_rms:.4f}", highlight=False)
    for line in text_chart(points, curve):
        console.print(line, highlight=False, markup=False)
    caption = "o = runs, · = fit at the runs' median D" if result.form == "N,D" else "o = runs, · = fit"
    console.print(f"x: non-embedding parameters N (log), y: validation loss (log); {caption}", highlight=False)
    if png:
        log(f"chart written to {png}")


@app.command("plan")
def plan(
    compute: float = typer.Option(..., help="Training FLOP budget, e.g. 5.76e23 (C ≈ 6·N·D)."),
    fit_file: Optional[str] = typer.Option(None, "--fit", help="A sweep directory or runs.jsonl: plan under "
                                                                "your own L(N, D) fit as well."),
    family: str = typer.Option("gpt", help="Family of the nearest zoo entry."),
    measure: bool = typer.Option(True, "--measure/--no-measure", help="Time a training step of the nearest "
                                                                     "entry on this machine."),
    device: str = typer.Option("auto", help="Device for the timing step."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
) -> None:
    """Compute-optimal model and data size for a FLOP budget (Chinchilla, Kaplan, or your fit)."""
    from llmcli.scaling.fit import fit_runs, read_runs
    from llmcli.scaling.plan import plan as run

    fitted = fit_runs(read_runs(fit_file), "N,D", bootstrap=0) if fit_file else None
    result = run(compute, fitted, family, measure, device)
    if json_out:
        print_json(result)
        return
    table = Table(title=f"compute-optimal allocation of C = {compute:.3g} FLOPs", title_justify="left")
    for column in ("rule", "parameters N", "tokens D", "D / N", "2× compute: N", "2× compute: D"):
        table.add_column(column, justify="left" if column == "rule" else "right")
    names = {"chinchilla": "Chinchilla (Hoffmann 2022)", "kaplan": "Kaplan 2020", "fit": "your fit"}
    for key, rule in result["rules"].items():
        table.add_row(names[key], human(rule["params"]), human(rule["tokens"]), f"{rule['tokens_per_param']:.3g}",
                      f"{rule['doubling_params']:.2f}×", f"{rule['doubling_tokens']:.2f}×")
    console.print(table)
    near = result["nearest"]
    console.print(f"nearest zoo entry to the {names[near['rule']]} plan: [bold]{near['name']}[/bold] "
                  f"({human(near['params'])} parameters); training memory {human(near['train_memory_bytes'], 'B')} "
                  f"({near['train_memory_setting']})", highlight=False)
    time = near["time"]
    if "seconds" in time:
        bound = "at least " if time.get("lower_bound") else ""
        console.print(f"time for {human(near['tokens'])} tokens on this machine: {bound}{_duration(time['seconds'])} "
                      f"({time['basis']})", highlight=False)


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"
