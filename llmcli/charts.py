"""Charts: lines of text for the terminal, PNG files through matplotlib (the optional `plot` extra).

A series is (label, mark, points); later series are drawn over earlier ones. PNGs are written to a
temporary name and renamed, so a chart file is never half written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from llmcli.errors import UserError

Series = tuple[str, str, list[tuple[float, float]]]


def text_chart(series: list[Series], width: int = 60, height: int = 16, log_x: bool = False,
               log_y: bool = False) -> list[str]:
    """The series on one pair of axes (log or linear), with the axis ranges labelled and a legend when there
    is more than one series."""
    points = [p for _, _, pts in series for p in pts if (not log_x or p[0] > 0) and (not log_y or p[1] > 0)]
    if not points:
        return ["(nothing to draw)"]
    fx = math.log10 if log_x else float
    fy = math.log10 if log_y else float
    x0, x1 = min(fx(x) for x, _ in points), max(fx(x) for x, _ in points)
    y0, y1 = min(fy(y) for _, y in points), max(fy(y) for _, y in points)
    x1, y1 = max(x1, x0 + 1e-9), max(y1, y0 + 1e-9)
    grid = [[" "] * width for _ in range(height)]
    for _, mark, pts in series:
        for x, y in pts:
            if (log_x and x <= 0) or (log_y and y <= 0):
                continue
            col = round((fx(x) - x0) / (x1 - x0) * (width - 1))
            row = height - 1 - round((fy(y) - y0) / (y1 - y0) * (height - 1))
            grid[row][col] = mark
    top, bottom = (10**y1, 10**y0) if log_y else (y1, y0)
    left, right = (10**x0, 10**x1) if log_x else (x0, x1)
    label = max(len(f"{top:.3g}"), len(f"{bottom:.3g}"))
    lines = []
    for i, row in enumerate(grid):
        tick = f"{top:.3g}" if i == 0 else f"{bottom:.3g}" if i == height - 1 else ""
        lines.append(f"{tick:>{label}} |{''.join(row)}")
    lines.append(" " * label + " +" + "-" * width)
    left_text, right_text = f"{left:.3g}", f"{right:.3g}"
    lines.append(" " * (label + 2) + left_text + " " * max(1, width - len(left_text) - len(right_text)) + right_text)
    if len(series) > 1:  # the legend, two series a line
        entries = [f"{mark} {name}" for name, mark, _ in series]
        lines += [" " * (label + 2) + "   ".join(entries[i:i + 2]) for i in range(0, len(entries), 2)]
    return lines


def check_png_path(path: str | Path) -> Path:
    """A PNG can be written at `path`: checked before any long work, so a typo costs nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--png {path} is a directory; give a file name such as {path / 'chart.png'}")
    if not path.parent.is_dir():
        raise UserError(f"--png {path}: folder {path.parent} does not exist; create it or choose another path")
    return path


def write_png(path: str | Path, draw: Callable, size: tuple[float, float] = (6, 4)) -> Path:
    """draw(axes) fills one matplotlib figure, saved to `path` through a temporary file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--png needs matplotlib: pip install 'llmcli[plot]'") from None
    path = check_png_path(path)
    figure, axes = plt.subplots(figsize=size)
    try:
        draw(axes)
        figure.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        figure.savefig(tmp, dpi=120)
    finally:
        plt.close(figure)
    tmp.replace(path)
    return path
