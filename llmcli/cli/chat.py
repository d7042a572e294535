"""`llmcli chat`: a conversation with an instruct model in the terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from llmcli.cli.infer import DEVICE_HELP, PRECISION_HELP, inference_precision
from llmcli.cli.output import err_console, log

COMMANDS = "/reset starts over, /exit or Ctrl-D ends"


def chat(
    model_dir: str = typer.Argument(..., help="An instruct model: an llmcli directory or a Hugging Face checkpoint "
                                              "directory, with its chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message that opens the conversation."),
    template: Optional[Path] = typer.Option(None, "--template", help="A chat template (Jinja) to use instead of the "
                                                                     "model's own."),
    max_new_tokens: int = typer.Option(256, help="Tokens per reply, at most."),
    temperature: float = typer.Option(0.7, help="Sampling temperature; 0 is greedy decoding."),
    top_p: Optional[float] = typer.Option(0.9, help="Nucleus sampling: the smallest set of tokens reaching p."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Text that ends a reply; repeatable."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step as one graph (needs g++ on "
                                                          "the CPU; the first reply waits about a minute for it, "
                                                          "then torch caches it)."),
) -> None:
    """Chat with an instruct model: replies stream as they are generated; the history is kept (the oldest turns
    go when it no longer fits the context)."""
    from llmcli.chat import ChatSession, chat_template_for
    from llmcli.errors import UserError
    from llmcli.generation import check_sampling, load_for_inference
    from llmcli.runtime import compile_decode

    check_sampling(max_new_tokens, temperature, None, top_p, 1)
    model, tokenizer = load_for_inference(model_dir, device, inference_precision(precision, device))
    if compile:
        compile_decode(model, next(model.parameters()).device, log)
    session = ChatSession(model, tokenizer, chat_template_for(model_dir, model, tokenizer, template),
                          system=system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          seed=seed, stop=stop or ())
    log(f"chatting with {model.config.name} ({COMMANDS})")
    while True:
        try:
            text = input("> ")
        except EOFError:  # Ctrl-D
            sys.stdout.write("\n")
            return
        command = text.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            log("(a new conversation)")
            continue
        if not command:
            continue
        try:
            _, dropped = session.send(text, on_text=_write)
        except UserError as e:  # this turn is refused; the conversation goes on
            err_console.print(f"error: {e}", highlight=False, markup=False)
            continue
        _write("\n")
        if dropped:
            log(f"(the oldest {dropped} turns no longer fit {model.config.name}'s context and were left out)")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
