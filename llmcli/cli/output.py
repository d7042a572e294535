"""One output layer for the whole CLI: tables to stdout, JSON to stdout, logs and errors to stderr."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def print_json(data: object) -> None:
    """Exactly one JSON document on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def log(message: str, markup: bool = False) -> None:
    """A line on stderr. markup=False keeps user text such as "[MASK]" literal."""
    err_console.print(message, highlight=False, markup=markup)


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; byte sizes in decimal units (GB = 1e9), as papers quote them."""
    for threshold, suffix in ((1e12, "T"), (1e9, "G" if unit == "B" else "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= threshold:
            return f"{n / threshold:.3g}{suffix}{unit}" if unit else f"{n / threshold:.4g}{suffix}"
    return f"{n:.0f}{unit}" if unit else f"{n:.0f}"


# figure name -> how the bar shows it (the training loop reports these; other work reports none)
_FIGURES = {"loss": "loss {:.3f}", "lr": "lr {:.1e}", "tokens_per_s": "{:,.0f} tok/s",
            "val_perplexity": "val ppl {:.1f}", "val_accuracy": "val acc {:.3f}"}


class BarProgress:
    """Renders the library's progress reports (llmcli.progress) as a rich bar on stderr: count, the latest
    figures, rate and ETA. Figures stay shown until a newer value comes."""

    def task(self, label: str, total: int | None, completed: int = 0, unit: str = "steps") -> _BarTask:
        return _BarTask(label, total, completed, unit)


class _BarTask:
    def __init__(self, label: str, total: int | None, completed: int, unit: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=err_console, transient=label != "train")
        self.unit, self.figures, self.completed = unit, {}, completed
        self.start, self.started_at = completed, time.perf_counter()
        self.task_id = self.bar.add_task(label, total=total, completed=completed, info="")
        self.bar.start()

    def __enter__(self) -> _BarTask:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, completed: int | None = None, **figures) -> None:
        self.completed = self.completed + 1 if completed is None else completed
        self.figures.update({k: v for k, v in figures.items() if k in _FIGURES})
        parts = [_FIGURES[k].format(v) for k, v in self.figures.items()]
        if "tokens_per_s" not in self.figures:
            elapsed = time.perf_counter() - self.started_at
            parts.append(f"{(self.completed - self.start) / max(elapsed, 1e-9):.1f} {self.unit}/s")
        self.bar.update(self.task_id, completed=self.completed, info="  ".join(parts))

    def close(self) -> None:
        self.bar.stop()


# Viridis (matplotlib's default colormap) at 0, 1/4, 1/2, 3/4 and 1: dark blue to yellow, readable in print.
VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
SHADES = " ░▒▓█"  # for terminals without colour
ROW_LABEL = 12  # characters of a query label
COLUMN_LABEL = 6  # characters of a key label, written top to bottom


def _viridis(x: float) -> str:
    x = min(max(x, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    f = x - i
    r, g, b = (round(a + (b - a) * f) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))
    return f"rgb({r},{g},{b})"


def _cell(value: float, color: bool) -> Text:
    if color:
        return Text("██", style=_viridis(value))
    return Text(SHADES[round(value * (len(SHADES) - 1))] * 2)


def _short(label: str, width: int) -> str:
    label = label.replace("\n", "\\n").replace("\t", "\\t")
    return label if len(label) <= width else label[:width - 1] + "…"


def heatmap(weights: list[list[float]], queries: list[str], keys: list[str], color: bool,
            legend: str = "the row's largest weight (each row sums to 1)") -> Text:
    """Rows (queries, layers) by columns (keys, experts), two characters a cell.

    Each row is scaled to its own largest weight: a query over 30 keys spreads thinner than the
    first query of a causal decoder (which can only attend to itself), and should still show where it looks.
    """
    rows = [_short(q, ROW_LABEL) for q in queries]
    cols = [_short(k, COLUMN_LABEL) for k in keys]
    indent = max(len(r) for r in rows) + 1
    out = Text()
    for line in range(max(len(c) for c in cols)):
        out.append(" " * indent + "".join((c[line] if line < len(c) else " ") + " " for c in cols) + "\n",
                   style="cyan")
    for label, row in zip(rows, weights):
        out.append(label.rjust(indent - 1) + " ", style="cyan")
        top = max(row) or 1.0
        for value in row:
            out.append_text(_cell(value / top, color))
        out.append("\n")
    out.append(" " * indent + "0 ")
    for step in range(8):
        out.append_text(_cell(step / 7, color))
    out.append(f" {legend}")
    return out
