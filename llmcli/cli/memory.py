"""`llmcli memory-estimate`: will it fit? The bytes of one training step or of generation, and --measure."""

from __future__ import annotations

from typing import Optional

import typer
from rich import box
from rich.table import Table

from llmcli.cli.output import console, err_console, human, log, print_json

_WHAT = {
    "weights": "the parameters",
    "gradients": "trained parameters",
    "optimizer": "states, fp32",
    "master_weights": "fp32 trained weights",
    "activations": "saved for backward",
    "logits": "logits and grads",
    "kv_cache": "keys and values",
    "step_temporaries": "optimizer step",
    "gathered_weights": "ZeRO-3: 2 blocks",
    "kept_attention_weights": "eager probabilities",
}
_WHAT_INFER = {"activations": "one layer's tensors", "logits": "prefill logits"}


def memory_estimate(
    model: str = typer.Argument(..., help="Zoo name, TOML file or model directory."),
    mode: str = typer.Option("train", help="train (one optimizer step) or infer (prefill, then decode)."),
    batch_size: int = typer.Option(1, help="Sequences per device."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence; infer: prompt plus new tokens "
                                                     "(default: the model's context)."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16 (train: mixed precision), int8 or int4 "
                                           "(infer, or train with --lora-rank)."),
    optimizer: str = typer.Option("adamw", help="adamw, sgd (with momentum), adafactor or adamw8bit."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute each block in backward."),
    lora_rank: int = typer.Option(0, help="Train LoRA adapters of this rank on q_proj and v_proj; base frozen."),
    zero_stage: int = typer.Option(0, help="ZeRO stage across --gpus: 1 optimizer, 2 + gradients, "
                                           "3 + weights (FSDP)."),
    gpus: int = typer.Option(1, help="Data-parallel devices; figures are per device."),
    attention: str = typer.Option("sdpa", help="sdpa (fused kernels where they apply) or eager (keeps the "
                                               "attention probabilities)."),
    new_tokens: int = typer.Option(16, help="infer: tokens generated after the prompt."),
    group_size: int = typer.Option(128, help="--dtype int4: input features per scale, as `llmcli quantize "
                                             "--group-size` (32, 64 or 128)."),
    device: str = typer.Option("auto", help="cpu or cuda: whose kernels are counted and where --measure runs "
                                            "(auto: cuda if available)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    measure: bool = typer.Option(False, "--measure", help="Also run the real step and report its measured peak."),
    png: Optional[str] = typer.Option(None, help="Also draw the breakdown as stacked bars, one per phase, beside "
                                                 "the measured peak (needs the plot extra)."),
) -> None:
    """Estimate memory from the config alone: weights, gradients, optimizer, activations, logits, KV cache."""
    from llmcli.charts import check_png_path
    from llmcli.profiling.memory import estimate_memory_of, write_memory_png

    if png:
        check_png_path(png)
    config, estimate, device = estimate_memory_of(
        model, mode, device, batch_size=batch_size, seq_len=seq_len, dtype=dtype, optimizer=optimizer,
        grad_checkpointing=grad_checkpointing, lora_rank=lora_rank, zero_stage=zero_stage, gpus=gpus,
        attention=attention, new_tokens=new_tokens, group_size=group_size)
    result = estimate.to_dict()
    if measure:
        result.update(_measure(config, estimate, device))
    if png:
        log(f"wrote {write_memory_png(png, result)}")
    if json_out:
        print_json(result)
        return
    _render(result)


def _measure(config, estimate, device: str) -> dict:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from llmcli.profiling.memory_measure import measure_memory

    step = "one training step" if estimate.inputs["mode"] == "train" else "prefill and decode"
    with Progress(SpinnerColumn(), TextColumn(f"measuring {step} of {config.name} on {device}"),
                  TimeElapsedColumn(), console=err_console, transient=True) as progress:
        progress.add_task("measure", total=None)
        measured = measure_memory(config, estimate, device)
    got = measured["measured_bytes"]
    error = round((estimate.total_bytes - got) / got, 4) if got else None  # 0: below what the method resolves
    return {"measured_bytes": got, "relative_error": error, "measurement": measured}


def _render(r: dict) -> None:
    inputs, phase = r["inputs"], r["phases"][r["peak_phase"]]
    title = (f"{inputs['model']} {inputs['mode']}: batch {inputs['batch_size']}, seq {inputs['seq_len']}, "
             f"{inputs['dtype']}, {inputs['device']}")
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for column in ("component", "bytes", "B/param", "of peak"):
        table.add_column(column, justify="left" if column == "component" else "right", no_wrap=True)
    table.add_column("what", overflow="fold")
    per_param = r["bytes_per_param"]
    for name, nbytes in r["breakdown"].items():
        if not nbytes:
            continue
        live = name in phase
        convention = f"{per_param[name]:g}" if name in per_param else _convention(name, r)
        share = f"{nbytes / r['total_bytes']:.1%}" if live else "-"
        what = _WHAT_INFER.get(name, _WHAT[name]) if inputs["mode"] == "infer" else _WHAT[name]
        table.add_row(name, human(nbytes, "B"), convention, share, what, style=None if live else "dim")
    for name, nbytes in phase.items():  # parts of the peak that are not components
        if name not in r["breakdown"] and name != "total" and nbytes:
            table.add_row(name, human(nbytes, "B"), "", f"{nbytes / r['total_bytes']:.1%}", _WHAT.get(name, ""))
    peak_name = r["peak_phase"].replace("_", "/" if r["peak_phase"] == "forward_backward" else " ")
    table.add_row(f"peak ({peak_name})", human(r["total_bytes"], "B"), "", "100%", "", style="bold")
    console.print(table)
    lines = [f"params {r['params']:,} (trainable {r['trainable_params']:,}); convention, bytes per parameter: "
             + ", ".join(f"{k} {v:g}" for k, v in per_param.items() if v),
             "phases: " + ", ".join(f"{k.replace('_', ' ')} {human(v['total'], 'B')}" for k, v in r["phases"].items())
             + "; dim rows are not resident at the peak"]
    for stack, nbytes in r["activations_per_layer"].items():
        lines.append(f"activations per {stack} layer {human(nbytes, 'B')} ({r['attention_kernel']} attention); "
                     f"Korthikanti et al. 2022: {human(r['reference_per_layer'][stack], 'B')}")
    if r["sharding"]:
        s = r["sharding"]
        lines.append(f"ZeRO stage {s['zero_stage']} over {s['gpus']} devices shards {', '.join(s['sharded']) or 'nothing'}"
                     f"; figures are per device ({s['source']})")
    lines += r["notes"]
    lines += [f"source ({topic}): {text}" for topic, text in r["sources"].items()]
    if "measured_bytes" in r:
        lines.append(f"[bold]measured peak {human(r['measured_bytes'], 'B')}[/bold] on {r['measurement']['device']} "
                     f"({r['measurement']['seconds']} s): " + (f"the estimate is {r['relative_error']:+.1%} off"
                                                               if r["relative_error"] is not None else
                                                               "too small to measure on this device"))
    for line in lines:
        console.print(line, highlight=False)


def _convention(name: str, r: dict) -> str:
    if name == "kv_cache" and r["kv_bytes_per_token"]:
        return f"{r['kv_bytes_per_token']:,}/token"
    if name == "logits" and r["breakdown"]["logits"]:
        return f"{2 * (4 if r['inputs']['dtype'] == 'fp32' else 2)}/logit" if r["inputs"]["mode"] == "train" else ""
    return ""
