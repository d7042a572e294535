"""The before/after table every compression command prints."""

from __future__ import annotations

from rich.table import Table

from llmcli.cli.output import console, human


def render_comparison(report: dict, title: str) -> None:
    before, after, change = report["before"], report["after"], report["change"]
    table = Table(title=title, title_justify="left")
    for column in ("", "before", "after", "change"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("size on disk", human(before["state_bytes"], "B"), human(after["state_bytes"], "B"),
                  f"{change['size_ratio']:.2f}× smaller")
    if change.get("linear_size_ratio"):
        table.add_row("linear weights", human(before["linear_bytes"], "B"), human(after["linear_bytes"], "B"),
                      f"{change['linear_size_ratio']:.2f}× smaller")
    table.add_row("held-out loss", f"{before['loss']:.4f}", f"{after['loss']:.4f}",
                  f"{after['loss'] - before['loss']:+.4f}")
    table.add_row("perplexity", f"{before['perplexity']:.2f}", f"{after['perplexity']:.2f}",
                  f"{change['perplexity_change']:+.1%}")
    if "speed_ratio" in change:
        mode = before["speed"]["mode"]
        table.add_row(f"{mode} tokens/s", f"{before['speed']['tokens_per_s']:.1f}",
                      f"{after['speed']['tokens_per_s']:.1f}", f"{change['speed_ratio']:.2f}×")
    console.print(table)
