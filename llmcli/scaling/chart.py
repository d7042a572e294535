"""Log-log charts of a fit: text for the terminal, PNG through matplotlib (the optional `plot` extra)."""

from __future__ import annotations

import statistics
from pathlib import Path

from llmcli import charts


def text_chart(points: list[tuple[float, float]], curve: list[tuple[float, float]], width: int = 60,
               height: int = 16) -> list[str]:
    """Points ('o') over a curve ('·') on log-log axes, as lines of text."""
    lines = charts.text_chart([("fit", "·", curve), ("runs", "o", points)], width, height, log_x=True, log_y=True)
    return lines[:-1]  # the legend: 'o' and '·' explain themselves beside the fit's table


def write_png(path: str | Path, points: list[tuple[float, float]], curve: list[tuple[float, float]],
              title: str, xlabel: str = "non-embedding parameters N", ylabel: str = "validation loss") -> Path:
    def draw(axes) -> None:
        axes.plot([x for x, _ in curve], [y for _, y in curve], "-", label="fit")
        axes.plot([x for x, _ in points], [y for _, y in points], "o", label="runs")
        axes.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
        axes.legend()
    return charts.write_png(path, draw)


def fit_chart_data(result, runs) -> tuple[list, list]:
    """The runs as (N, loss) points, and the fit as a curve of 60 points over their N at the runs' median D."""
    points = [(r.n, r.loss) for r in runs]
    d = statistics.median(r.d for r in runs)
    low, high = min(r.n for r in runs), max(r.n for r in runs)
    ns = [low * (high / low) ** (i / 59) for i in range(60)]
    return points, [(n, float(result.predict(n, d))) for n in ns]
