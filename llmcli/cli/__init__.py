"""The Typer app. Commands only parse, call the library and render; torch is imported lazily."""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from llmcli.cli import bench as bench_cmd
from llmcli.cli import build as build_cmd
from llmcli.cli import chat as chat_cmd
from llmcli.cli import convert as convert_cmd
from llmcli.cli import distill as distill_cmd
from llmcli.cli import finetune as finetune_cmd
from llmcli.cli import memory as memory_cmd
from llmcli.cli import infer as infer_cmd
from llmcli.cli import prune as prune_cmd
from llmcli.cli import quantize as quantize_cmd
from llmcli.cli import runs as runs_cmd
from llmcli.cli import scaling as scaling_cmd
from llmcli.cli import tokenizer as tokenizer_cmd
from llmcli.cli import train as train_cmd
from llmcli.cli import zoo as zoo_cmd
from llmcli.errors import Stopped, UserError


class _Group(TyperGroup):
    """Turns UserError into exit code 2 and a one-line message (a traceback with LLMCLI_DEBUG=1), and Ctrl-C
    into exit code 130 and one line: every output is written to a temporary name and swapped in whole, so an
    interrupted command leaves each output as it was or complete."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, Stopped, KeyboardInterrupt) as e:
            if os.environ.get("LLMCLI_DEBUG") == "1":
                raise
            if isinstance(e, UserError):
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2) from None
            typer.echo(f"stopped: {e}" if isinstance(e, Stopped) else
                       "stopped (Ctrl-C): every output is as it was before this command, or complete", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(cls=_Group, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="A model zoo and benchmarking lab for BERT, GPT and T5.")
app.add_typer(zoo_cmd.app, name="zoo")
app.add_typer(convert_cmd.app, name="convert")
app.add_typer(tokenizer_cmd.app, name="tokenizer")
app.add_typer(scaling_cmd.app, name="scaling")
app.add_typer(runs_cmd.app, name="runs")
app.command("build")(build_cmd.build)
app.command("train")(train_cmd.train)
app.command("eval")(train_cmd.evaluate)
app.command("memory-estimate")(memory_cmd.memory_estimate)
app.command("generate")(infer_cmd.generate)
app.command("chat")(chat_cmd.chat)
app.command("fill-mask")(infer_cmd.fill_mask)
app.command("embed")(infer_cmd.embed)
app.command("attention")(infer_cmd.attention)
app.command("experts")(infer_cmd.experts)
app.command("bench")(bench_cmd.bench)
app.command("finetune")(finetune_cmd.finetune)
app.command("merge")(finetune_cmd.merge)
app.command("prune")(prune_cmd.prune)
app.command("quantize")(quantize_cmd.quantize)
app.command("distill")(distill_cmd.distill)


def main() -> None:
    try:
        app(prog_name="llmcli")
    except SystemExit as done:
        if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:  # one of torchrun's processes
            # torch 2.13's gloo teardown at interpreter exit aborts about 1 run in 6 ("terminate called", SIGABRT),
            # after the work is done and saved: such a process leaves without it
            code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
            if isinstance(done.code, str):
                print(done.code, file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise
