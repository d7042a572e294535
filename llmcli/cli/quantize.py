"""`llmcli quantize`."""

from __future__ import annotations

from typing import Optional

import typer

from llmcli.cli.output import BarProgress, log, print_json


def quantize(
    model_dir: str = typer.Argument(..., help="Trained model directory (with tokenizer.json)."),
    scheme: str = typer.Option(..., help="int8 (per output channel), int4 (groups of --group-size) or int8-dynamic "
                                         "(int8 weights, activations quantized on the fly)."),
    out: str = typer.Option(..., help="Model directory to write."),
    group_size: Optional[int] = typer.Option(None, help="int4: input features per scale, 32, 64 or 128 "
                                                        "(default: 128)."),
    method: Optional[str] = typer.Option(None, help="rtn (round to nearest) or gptq (calibrated; default when "
                                                    "--calibration-data is given)."),
    calibration_data: Optional[str] = typer.Option(None, help="GPTQ calibration corpus; its training split is used "
                                                              "(default: the --data corpus)."),
    calibration_batches: int = typer.Option(8, help="GPTQ calibration batches (8 sequences each)."),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: quantize columns by decreasing input energy."),
    include_head: bool = typer.Option(False, "--include-head", help="Quantize the LM head (and BERT's pooler and "
                                                                     "MLM dense) too; embeddings stay full precision."),
    data: Optional[str] = typer.Option(None, help="Corpus whose held-out split scores before and after "
                                                  "(default: embedded)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence (default: the training run's)."),
    device: str = typer.Option("auto", help="cpu, cuda or cuda:N (default: cuda if available)."),
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip the decode-speed measurement."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Quantize the linear layers to int8 or int4 (round to nearest or GPTQ) and report size, perplexity, speed."""
    from llmcli.cli.compression_report import render_comparison
    from llmcli.compression.quantize_dir import quantize_model_dir

    report = quantize_model_dir(model_dir, out, scheme, group_size, method, calibration_data, calibration_batches,
                                act_order, include_head, data, seq_len, device, speed=not no_speed, force=force,
                                progress=BarProgress())
    if json_out:
        print_json(report)
        return
    spec = report["quantization"]
    group = f", groups of {spec['group_size']}" if spec["group_size"] else ", per output channel"
    render_comparison(report, f"quantize {spec['scheme']} ({spec['method']}{group}, {spec['layers']} layers)")
    errors = f"mean relative weight error {spec['mean_weight_rel_error']:.2%}"
    if spec["mean_output_rel_error"] is not None:
        errors += f", output error on calibration inputs {spec['mean_output_rel_error']:.2%}"
    log(f"{errors} -> {out}")
