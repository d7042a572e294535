"""`llmcli build`: a freshly initialised model directory."""

from __future__ import annotations

from pathlib import Path

import typer

from llmcli.cli.output import human, log


def build(name: str = typer.Argument(..., help="Zoo name or TOML file."),
          out: Path = typer.Option(..., "--out", help="Model directory to write."),
          seed: int = typer.Option(0, help="Random seed for the initial weights."),
          force: bool = typer.Option(False, "--force", help="Replace --out if it exists.")) -> None:
    """Build a model with fresh weights and write config.json + model.safetensors."""
    from llmcli.model_dir import build_model_dir, resolve_config

    config, _ = resolve_config(name)
    params = build_model_dir(config, out, seed=seed, force=force)
    log(f"built {config.name} ({human(params)} parameters, seed {seed}) -> {out}")
