"""`llmcli convert from-hf` and `llmcli convert to-hf`: Hugging Face checkpoints in and out."""

from __future__ import annotations

from pathlib import Path

import typer

from llmcli.cli.output import log

app = typer.Typer(no_args_is_help=True, help="Convert to and from Hugging Face transformers checkpoints.")


@app.command("from-hf")
def from_hf(src: Path = typer.Argument(..., help="Hugging Face checkpoint directory (config.json + safetensors)."),
            out: Path = typer.Argument(..., help="llmcli model directory to write."),
            force: bool = typer.Option(False, "--force", help="Replace OUT if it exists.")) -> None:
    """Convert a GPT-2, BERT, T5, Llama, Mistral or Qwen2 checkpoint into an llmcli model directory."""
    from llmcli.interop.hf import convert_from_hf

    config = convert_from_hf(src, out, force=force)
    log(f"converted {src} -> {out} (llmcli {config.family}, {config.n_layers} layers, d_model {config.d_model})")


@app.command("to-hf")
def to_hf(src: Path = typer.Argument(..., help="llmcli model directory."),
          out: Path = typer.Argument(..., help="Hugging Face checkpoint directory to write."),
          force: bool = typer.Option(False, "--force", help="Replace OUT if it exists.")) -> None:
    """Write an llmcli model as a checkpoint that transformers' from_pretrained loads."""
    from llmcli.interop.hf import convert_to_hf

    architecture = convert_to_hf(src, out, force=force)
    log(f"converted {src} -> {out} (Hugging Face {architecture})")
