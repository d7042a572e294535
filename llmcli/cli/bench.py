"""`llmcli bench`: throughput matrix, optionally beside Hugging Face transformers."""

from __future__ import annotations

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from llmcli.cli.output import console, human, log, print_json


def _ints(text: str, flag: str) -> list[int]:
    from llmcli.errors import UserError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated whole numbers, e.g. 1,8") from None


def bench(
    model: str = typer.Argument(..., help="Zoo name, TOML file or model directory."),
    mode: str = typer.Option("train,prefill,decode", help="Comma-separated: train, prefill, decode."),
    batch_size: str = typer.Option("1,8", help="Comma-separated batch sizes."),
    seq_len: str = typer.Option(None, help="Comma-separated sequence lengths (decode: new tokens) "
                                           "(default: 128,512, those that fit the model's context)."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16 (train: mixed precision)."),
    device: str = typer.Option("auto", help="cpu, cuda or cuda:N."),
    reps: int = typer.Option(5, help="Timed repetitions per case (the median is reported, with the spread)."),
    warmup: int = typer.Option(2, help="Warm-up steps per case."),
    threads: str = typer.Option(None, help="CPU threads, comma-separated to sweep, e.g. 1,2 (default: torch's)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile llmcli's blocks (train, prefill) and its "
                                                          "decode step as one graph, compiled during the warm-up "
                                                          "steps, which are not timed."),
    compare: str = typer.Option(None, help="Run the same weights through a peer, interleaved: transformers, or "
                                           "llama.cpp (its llama-bench on PATH; batch-1 prefill and decode, the "
                                           "model exported to GGUF at the matching type)."),
    png: str = typer.Option(None, help="Also draw tokens/s by case, llmcli beside the peer, to this PNG file."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout (every sample kept)."),
) -> None:
    """Throughput of training, prefill and decode, llama-bench style: median ± std over repetitions."""
    from llmcli.charts import check_png_path
    from llmcli.cpu import describe_cpu
    from llmcli.profiling.bench import run_bench, write_bench_png

    if png:
        check_png_path(png)  # before the benchmark, not after it

    def progress(result) -> None:
        log(f"{result.mode} t{result.threads} b{result.batch_size} s{result.seq_len}: {result.tokens_per_s:,.0f} tok/s"
            + (f" ({result.peer['implementation']} {result.peer['tokens_per_s']:,.0f})" if result.peer else ""))

    seq_lens = _ints(seq_len, "--seq-len") if seq_len else None
    results, peaks = run_bench(model, mode.split(","), _ints(batch_size, "--batch-size"), seq_lens,
                               dtype, device, reps, warmup, compare, on_result=progress,
                               threads=_ints(threads, "--threads") if threads else None, compile=compile, log=log)
    if png:
        log(f"wrote {write_bench_png(png, results, f'llmcli bench {model} ({dtype})')}")
    if json_out:
        print_json([{**r.to_dict(), "machine": peaks} for r in results])
        return
    log(f"machine: matmul {peaks['matmul_flops'] / 1e9:,.0f} GFLOP/s ({peaks['matmul_dtype']}), "
        f"read {peaks['read_bytes_per_s'] / 1e9:,.1f} GB/s, copy {peaks['copy_bytes_per_s'] / 1e9:,.1f} GB/s, "
        f"{peaks['device']} (measured {peaks['measured']['timestamp'][:10]}, cached)"
        + (f"; {describe_cpu()}; decode: {results[0].provenance['decode_kernels']}"
           + (", torch.compile" if results[0].provenance["compiled"] else "")
           if peaks["device"] == "cpu" and results else ""))
    table = Table(box=box.MARKDOWN, title=f"llmcli bench {model} ({dtype}, {results[0].device if results else device})")
    columns = ["mode", "threads", "batch", "seq", "tokens/s", "ms/step", "TTFT ms", "peak mem", "FLOP util",
               "GB/s (of read)"]
    if any(r.mfu is not None for r in results):
        columns.append("MFU")
    if compare:
        columns += [f"{compare} tok/s", "speedup", "peer mem"]
    for column in columns:
        table.add_column(column, justify="left" if column == "mode" else "right", no_wrap=True)
    for r in results:
        row = [r.mode, str(r.threads), str(r.batch_size), str(r.seq_len),
               f"{r.tokens_per_s:,.1f} ± {r.tokens_per_s_std:,.1f}", f"{r.ms_per_step:,.1f}",
               f"{1000 * r.ttft_s:,.1f}" if r.ttft_s is not None else "-", human(r.peak_memory_bytes, "B"),
               f"{100 * r.flops_utilization:.1f}%",
               f"{r.bandwidth_bytes_per_s / 1e9:.1f} ({r.bandwidth_utilization:.0%})" if r.bandwidth_bytes_per_s
               else "-"]
        if "MFU" in columns:
            row.append(f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-")
        if compare:
            peer = r.peer
            row += [f"{peer['tokens_per_s']:,.1f} ± {peer['tokens_per_s_std']:,.1f}", f"{peer['speedup']:.2f}×",
                    human(peer["peak_memory_bytes"], "B")] if peer else ["-", "-", "-"]
        table.add_row(*row)
    wide = Console(width=max(console.width, 200))  # a markdown table must not wrap, even in a pipe
    wide.print(table)
