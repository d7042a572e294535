"""`llmcli zoo list` and `llmcli zoo show`."""

from __future__ import annotations

import typer
from rich import box
from rich.table import Table

from llmcli.cli.output import console, human, print_json

app = typer.Typer(no_args_is_help=True, help="Browse the model registry.")


def _row(config) -> dict:
    from llmcli.profiling.counts import count

    counts = count(config)
    return {"name": config.name, "family": config.family, "n_layers": config.n_layers,
            "d_model": config.d_model, "n_heads": config.n_heads, **counts.to_dict(),
            "published_params": config.published_params,
            "published_active_params": config.published_active_params, "source": config.source}


@app.command("list")
def list_models(family: str = typer.Option(None, help="Only this family: bert, gpt or t5."),
                json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """List the zoo with exact parameter counts, FLOPs per token and fp16 weight size."""
    from llmcli.config import FAMILIES, load_toml, zoo_entries
    from llmcli.errors import UserError

    if family is not None and family not in FAMILIES:
        raise UserError(f"--family {family!r} is not one of {', '.join(FAMILIES)}")
    configs = [load_toml(path) for path in zoo_entries().values()]
    configs = [c for c in configs if family in (None, c.family)]
    rows = sorted((_row(c) for c in configs), key=lambda r: (r["family"], r["params"]))
    if json_out:
        print_json(rows)
        return
    table = Table(title="llmcli zoo", box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False,
                  caption="L layers, H heads; active: what one token uses (a mixture of experts: its top-k experts); "
                          "FLOP/tok: forward pass at the full context, from the active parameters (PaLM, Chowdhery "
                          "et al. 2022)")
    for column in ("name", "family", "L", "d_model", "H", "params", "active", "published", "FLOP/tok", "fp16 size"):
        table.add_column(column, justify="left" if column in ("name", "family") else "right", no_wrap=True)
    for r in rows:
        published = human(r["published_params"]) if r["published_params"] else "-"
        if r["published_active_params"]:
            published += f" ({human(r['published_active_params'])})"
        active = human(r["active_params"]) if r["active_params"] != r["params"] else "-"
        table.add_row(r["name"], r["family"], str(r["n_layers"]), str(r["d_model"]), str(r["n_heads"]),
                      human(r["params"]), active, published, human(r["flops_per_token"]),
                      human(r["fp16_weight_bytes"], "B"))
    console.print(table)


@app.command("show")
def show(name: str = typer.Argument(..., help="Zoo name, TOML file or model directory."),
         json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """Show one model's full resolved config and its counts."""
    from llmcli.model_dir import resolve_config
    from llmcli.profiling.counts import count

    config, _ = resolve_config(name)
    data = {**config.to_dict(), **count(config).to_dict()}
    if json_out:
        print_json(data)
        return
    table = Table(title=config.name, show_header=False)
    table.add_column("key")
    table.add_column("value")
    for key, value in data.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000 else str(value)
        table.add_row(key, shown)
    console.print(table)
