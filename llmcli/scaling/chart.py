"""Log-log charts of a fit: text for the terminal, PNG through matplotlib (the optional `plot` extra)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from llmcli.errors import UserError


def text_chart(points: list[tuple[float, float]], curve: list[tuple[float, float]], width: int = 60,
               height: int = 16) -> list[str]:
    """Points ('o') and a curve ('·') on log-log axes, as lines of text with the axis ranges labelled."""
    xs = [x for x, _ in points + curve]
    ys = [y for _, y in points + curve]
    lx0, lx1 = math.log10(min(xs)), math.log10(max(xs))
    ly0, ly1 = math.log10(min(ys)), math.log10(max(ys))
    lx1, ly1 = max(lx1, lx0 + 1e-9), max(ly1, ly0 + 1e-9)
    grid = [[" "] * width for _ in range(height)]

    def put(x: float, y: float, mark: str) -> None:
        col = round((math.log10(x) - lx0) / (lx1 - lx0) * (width - 1))
        row = height - 1 - round((math.log10(y) - ly0) / (ly1 - ly0) * (height - 1))
        if mark == "o" or grid[row][col] == " ":
            grid[row][col] = mark

    for x, y in curve:
        put(x, y, "·")
    for x, y in points:
        put(x, y, "o")
    label = max(len(f"{10**ly1:.3g}"), len(f"{10**ly0:.3g}"))
    lines = []
    for i, row in enumerate(grid):
        tick = f"{10**ly1:.3g}" if i == 0 else f"{10**ly0:.3g}" if i == height - 1 else ""
        lines.append(f"{tick:>{label}} |{''.join(row)}")
    lines.append(" " * label + " +" + "-" * width)
    left, right = f"{10**lx0:.3g}", f"{10**lx1:.3g}"
    lines.append(" " * (label + 2) + left + " " * max(1, width - len(left) - len(right)) + right)
    return lines


def write_png(path: str | Path, points: list[tuple[float, float]], curve: list[tuple[float, float]],
              title: str, xlabel: str = "non-embedding parameters N", ylabel: str = "validation loss") -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--png needs matplotlib: pip install 'llmcli[plot]'") from None
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([x for x, _ in curve], [y for _, y in curve], "-", label="fit")
    axes.plot([x for x, _ in points], [y for _, y in points], "o", label="runs")
    axes.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)
    return path


def fit_chart_data(result, runs) -> tuple[list, list]:
    """The runs as (N, loss) points, and the fit as a curve of 60 points over their N at the runs' median D."""
    points = [(r.n, r.loss) for r in runs]
    d = statistics.median(r.d for r in runs)
    low, high = min(r.n for r in runs), max(r.n for r in runs)
    ns = [low * (high / low) ** (i / 59) for i in range(60)]
    return points, [(n, float(result.predict(n, d))) for n in ns]
