"""`llmcli build`: a freshly initialised model directory."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from llmcli.cli.output import human, log


def build(name: str = typer.Argument(..., help="Zoo name or TOML file."),
          out: Path = typer.Option(..., "--out", help="Model directory to write."),
          seed: int = typer.Option(0, help="Random seed for the initial weights."),
          force: bool = typer.Option(False, "--force", help="Replace --out if it exists.")) -> None:
    """Build a model with fresh weights and write config.json + model.safetensors."""
    from llmcli.config import resolve_config
    from llmcli.errors import UserError
    from llmcli.model_dir import build_model_dir
    from llmcli.profiling.counts import count

    config, _ = resolve_config(name)
    params = count(config).params_with_heads
    need, have = 2 * 4 * params, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:  # fp32 weights, plus the copy safetensors writes
        raise UserError(f"{config.name}: building needs about {human(need, 'B')} of memory, this machine has "
                        f"{human(have, 'B')}; try `llmcli memory-estimate {config.name}` or a smaller model")
    build_model_dir(config, out, seed=seed, force=force)
    log(f"built {config.name} ({human(params)} parameters, seed {seed}) -> {out}")
