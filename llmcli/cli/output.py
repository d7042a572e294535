"""One output layer for the whole CLI: tables to stdout, JSON to stdout, logs and errors to stderr."""

from __future__ import annotations

import json
import sys

from rich.console import Console

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
