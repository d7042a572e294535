"""`llmcli prune`."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from llmcli.cli import training_flags as flags
from llmcli.cli.output import BarProgress, console, log, print_json


def prune(
    model: str = typer.Argument(..., help="Trained model directory (with tokenizer.json)."),
    method: Optional[str] = typer.Option(None, help="magnitude (smallest |W|), wanda (|W|·input norm, per row), "
                                                    "heads (remove whole attention heads) or experts (remove a "
                                                    "mixture's least-used experts)."),
    sparsity: Optional[float] = typer.Option(None, help="Fraction of weights zeroed, or of heads or experts removed "
                                                        "per layer, in [0, 1) (default: 0.5)."),
    pattern: Optional[str] = typer.Option(None, help="N:M semi-structured sparsity, e.g. 2:4: keep N of every M "
                                                     "consecutive input weights (magnitude or wanda)."),
    scope: Optional[str] = typer.Option(None, help="Where the lowest scores are dropped: each output row, each "
                                                   "layer, or all layers together (global, magnitude only) "
                                                   "(default: row for wanda, layer for magnitude)."),
    calibration_batches: int = typer.Option(8, help="Training batches whose activations wanda, heads and experts "
                                                    "score with."),
    data: Optional[str] = typer.Option(None, help="Corpus for calibration, evaluation and recovery "
                                                  "(default: the embedded one)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence (default: the training run's)."),
    batch_size: int = typer.Option(8, help="Sequences per calibration, evaluation and recovery batch."),
    recover_steps: int = typer.Option(0, help="Fine-tune this many steps after pruning, pruned weights kept at 0."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate of the recovery (default: 2e-4)."),
    seed: flags.Seed = None,
    device: flags.Device = None,
    out: str = typer.Option(..., help="Model directory to write (with compression.json, the report)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip the speed measurement in the report."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Prune a model: unstructured (magnitude, Wanda), N:M (--pattern 2:4), whole attention heads or whole
    experts."""
    from llmcli.cli.compression_report import render_comparison
    from llmcli.compression.prune import resolve_spec
    from llmcli.compression.prune_dir import prune as run

    spec = resolve_spec(method, sparsity, pattern, scope, calibration_batches)
    report = run(model, out, spec, data=data, seq_len=seq_len, batch_size=batch_size, recover_steps=recover_steps,
                 lr=lr, seed=seed or 0, device=device or "auto", speed=not no_speed, force=force,
                 progress=BarProgress(), log=log)
    if json_out:
        print_json(report)
        return
    how = report["pattern"] or f"{report['sparsity']:g}" + (f" per {report['scope']}" if report["scope"] else "")
    render_comparison(report, f"prune {report['method']} {how}: {report['source']} -> {report['out']}")
    if report["recovery"]:
        recovery = report["recovery"]
        console.print(f"perplexity {report['pruned']['perplexity']:.2f} after pruning, "
                      f"{recovery['val_perplexity']:.2f} after {recovery['steps']} recovery steps", highlight=False)
    tables = {"heads": _heads_table, "experts": _experts_table}
    console.print(tables.get(report["method"], _sparsity_table)(report))


def _sparsity_table(report: dict) -> Table:
    table = Table(title=f"sparsity per layer (overall {report['overall_sparsity']:.2%})", title_justify="left")
    for column in ("layer", "shape", "zeros", "sparsity"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in report["layers"]:
        table.add_row(layer["name"], "×".join(map(str, layer["shape"])), f"{layer['zeros']:,}",
                      f"{layer['sparsity']:.2%}")
    return table


def _heads_table(report: dict) -> Table:
    n_heads = report["n_heads"]
    table = Table(title=f"heads per attention layer: {n_heads['before']} -> {n_heads['after']}", title_justify="left")
    for column in ("layer", "heads", "removed"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in report["heads"]:
        table.add_row(layer["name"], f"{layer['heads_before']} -> {layer['heads_after']}",
                      ", ".join(map(str, layer["removed_heads"])) or "-")
    return table


def _experts_table(report: dict) -> Table:
    n_experts = report["n_experts"]
    table = Table(title=f"experts per layer: {n_experts['before']} -> {n_experts['after']}; what each removed "
                        f"expert cost alone (calibration loss {report['calibration_loss']:.4f} with all)",
                  title_justify="left")
    for column in ("layer", "expert", "routed share", "loss increase"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in report["experts"]:
        for cost in layer["removed"]:
            table.add_row(layer["name"], str(cost["expert"]), f"{cost['routed_share']:.3f}",
                          f"{cost['loss_increase']:+.4f}")
    return table
