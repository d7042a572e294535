"""`llmcli convert from-hf`, `to-hf` and `to-gguf`: Hugging Face checkpoints in and out, GGUF out."""

from __future__ import annotations

from pathlib import Path

import typer

from llmcli.cli.output import log

app = typer.Typer(no_args_is_help=True, help="Convert to and from Hugging Face transformers checkpoints.")


@app.command("from-hf")
def from_hf(src: Path = typer.Argument(..., help="Hugging Face checkpoint directory (config.json + safetensors)."),
            out: Path = typer.Argument(..., help="llmcli model directory to write."),
            force: bool = typer.Option(False, "--force", help="Replace OUT if it exists.")) -> None:
    """Convert a Hugging Face checkpoint (GPT-2, BERT, T5 and the Llama-style and Gemma decoders) into an llmcli
    model directory."""
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


@app.command("to-gguf")
def to_gguf(src: str = typer.Argument(..., help="llmcli model directory (or a zoo name: random weights)."),
            out: Path = typer.Argument(..., help="The .gguf file to write."),
            gguf_type: str = typer.Option("f16", "--type", help="f32, f16, bf16, q8_0 or q4_0 (blocks of 32)."),
            force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
            json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """Write a GPT-2 or Llama-style model as a GGUF file for llama.cpp."""
    from llmcli.cli.output import print_json
    from llmcli.interop.to_gguf import convert_to_gguf

    written = convert_to_gguf(src, out, gguf_type, force=force)
    if json_out:
        print_json(written)
    log(f"wrote {out} (llama.cpp {written['architecture']}, {gguf_type}, {written['bytes'] / 1e6:,.1f} MB)")
