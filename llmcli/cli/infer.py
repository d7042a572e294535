"""`llmcli generate`, `llmcli fill-mask`, `llmcli embed` and `llmcli attention`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from llmcli.cli.output import console, err_console, heatmap, log, print_json

DEVICE_HELP = "cpu, cuda, cuda:N, or auto: cuda if available."
PRECISION_HELP = ("auto: bf16 weights where bf16 is native (AVX-512 BF16 or AMX CPUs, CUDA), fp32 elsewhere; "
                  "or fp32, bf16.")


def inference_precision(precision: str, device: str) -> str:
    """The precision a generating command runs in; said once on stderr when auto picks bf16."""
    from llmcli.runtime import resolve_device, resolve_precision

    resolved = resolve_precision(precision, resolve_device(device))
    if precision == "auto" and resolved == "bf16":
        log("precision bf16 (auto: bf16 is native here; --precision fp32 for fp32 weights)")
    return resolved


def generate(
    model_dir: str = typer.Argument(..., help="GPT or T5 model directory (with tokenizer.json), or a Hugging Face "
                                              "checkpoint directory."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Text to continue (GPT) or transform (T5); "
                                                                      "repeat for several prompts, generated as one "
                                                                      "batch."),
    messages: Optional[Path] = typer.Option(None, "--messages", help="A conversation, a JSON list of {\"role\", "
                                                                     "\"content\"}: laid out by the model's chat "
                                                                     "template, the assistant's reply is generated."),
    template: Optional[Path] = typer.Option(None, "--template", help="A chat template (Jinja) to use instead of the "
                                                                     "model's own."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Text that ends a sequence (not included); "
                                                                  "repeatable. The model's end ids always do."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate per sequence, at most."),
    temperature: float = typer.Option(1.0, help="Sampling temperature; 0 is greedy decoding."),
    top_k: Optional[int] = typer.Option(None, help="Sample from the k most probable tokens only."),
    top_p: Optional[float] = typer.Option(None, help="Sample from the smallest set of tokens whose probability "
                                                     "reaches p (nucleus sampling)."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling: the same seed gives the same text."),
    num_samples: int = typer.Option(1, help="Sequences per prompt."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole context at every step "
                                                            "instead of using the KV cache (for comparison)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step as one graph (needs g++ on "
                                                          "the CPU; about a minute the first time, then cached by "
                                                          "torch); the first tokens include the compile time."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout: text, completion, tokens, "
                                                        "prompt_text and prompt_ids (what the model was fed), "
                                                        "tokens_per_s (a list for several sequences)."),
) -> None:
    """Generate text with a GPT or T5 model; a single sequence is printed as it is generated."""
    from llmcli.chat import chat_template_for, render_ids
    from llmcli.chat_template import read_messages
    from llmcli.errors import UserError
    from llmcli.generation import generate_text, load_for_inference
    from llmcli.runtime import compile_decode

    if (prompt is None) == (messages is None):
        raise UserError("pass either --prompt TEXT (text to continue) or --messages FILE.json (a conversation)")
    if template is not None and messages is None:
        raise UserError("--template lays out --messages; pass a conversation with --messages FILE.json")
    conversation = read_messages(messages) if messages is not None else None
    model, tokenizer = load_for_inference(model_dir, device, inference_precision(precision, device))
    if compile:
        compile_decode(model, next(model.parameters()).device, log)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   num_samples=num_samples, use_cache=not no_cache, stop=stop or ())
    if conversation is not None:
        text, ids = render_ids(chat_template_for(model_dir, model, tokenizer, template), tokenizer, conversation)
        prompt, options["prompt_ids"], options["echo_prompt"] = [text], [ids], False
    if not json_out and len(prompt) * num_samples == 1:
        results = generate_text(model, tokenizer, prompt, on_text=_write, **options)
        _write("\n")
    else:
        with _progress() as progress:
            task = progress.add_task("generating", total=max_new_tokens)
            results = generate_text(model, tokenizer, prompt, on_step=lambda: progress.advance(task), **options)
        if json_out:
            rows = [r.to_dict() for r in results]
            print_json(rows[0] if len(rows) == 1 else rows)
        else:
            for row, r in enumerate(results):
                label = f"prompt {row // num_samples + 1}" + (f", sample {r.sample + 1}" if num_samples > 1 else "")
                console.print(f"── {label} ──", style="dim", highlight=False, markup=False)
                console.print(r.completion if conversation is not None else r.text, highlight=False, markup=False)
    new_tokens = sum(r.new_tokens for r in results)
    seconds = results[0].time
    log(f"{new_tokens} new tokens in {seconds:.2f} s: {new_tokens / seconds:.1f} tokens/s "
        f"({len(results)} sequence{'s' if len(results) > 1 else ''}, KV cache {'off' if no_cache else 'on'})")


def _write(text: str) -> None:
    """Exactly the text, no markup or wrapping: what is streamed equals the JSON `text`."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _progress() -> Progress:
    """Decoding steps on stderr, on a terminal only: --json output and piped logs stay clean."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                    TimeRemainingColumn(), console=err_console, transient=True, disable=not err_console.is_terminal)


def fill_mask(
    model_dir: str = typer.Argument(..., help="BERT model directory (with tokenizer.json)."),
    text: str = typer.Argument(..., help="Text with one or more [MASK] tokens."),
    top_k: int = typer.Option(5, help="Fillers to show per mask."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout: position and candidates "
                                                        "(token, id, probability); a list for several masks."),
) -> None:
    """The most probable fillers of each [MASK], with their probabilities (BERT)."""
    from llmcli.generation import load_for_inference
    from llmcli.inspection import fill_mask as predict

    model, tokenizer = load_for_inference(model_dir, device)
    predictions = predict(model, tokenizer, text, top_k)
    if json_out:
        rows = [p.to_dict() for p in predictions]
        print_json(rows[0] if len(rows) == 1 else rows)
        return
    for n, prediction in enumerate(predictions, 1):
        title = f"mask {n} of {len(predictions)} (token {prediction.position})" if len(predictions) > 1 else None
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
        for column, justify in (("#", "right"), ("token", "left"), ("probability", "right"), ("", "left")):
            table.add_column(column, justify=justify, no_wrap=True)
        for rank, c in enumerate(prediction.candidates, 1):
            table.add_row(str(rank), Text(c.token), f"{c.probability:.4f}", "█" * round(20 * c.probability))
        console.print(table)


def embed(
    model_dir: str = typer.Argument(..., help="Model directory (with tokenizer.json): BERT, or the final hidden "
                                              "states of GPT and the T5 encoder."),
    texts: list[str] = typer.Argument(..., help="Texts to embed."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout: texts, dim, embeddings, similarity."),
) -> None:
    """Mean-pooled, L2-normalised sentence embeddings and their cosine similarities."""
    from llmcli.generation import load_for_inference
    from llmcli.inspection import cosine_similarity, embed as embed_texts

    model, tokenizer = load_for_inference(model_dir, device)
    embeddings = embed_texts(model, tokenizer, texts).cpu()
    similarity = cosine_similarity(embeddings)
    if json_out:
        print_json({"texts": texts, "dim": embeddings.shape[1], "embeddings": embeddings.tolist(),
                    "similarity": similarity.tolist()})
        return
    shown = 6
    vectors = Table(title=f"embeddings (dim {embeddings.shape[1]}, first {shown} values)", box=box.SIMPLE_HEAD,
                    pad_edge=False)
    vectors.add_column("#", justify="right")
    vectors.add_column("text", overflow="ellipsis", no_wrap=True, max_width=40)
    vectors.add_column("embedding", no_wrap=True)
    for i, (text, row) in enumerate(zip(texts, embeddings.tolist()), 1):
        values = " ".join(f"{v:+.3f}" for v in row[:shown])
        vectors.add_row(str(i), Text(text), values + (" …" if len(row) > shown else ""))
    console.print(vectors)
    matrix = Table(title="cosine similarity", box=box.SIMPLE_HEAD, pad_edge=False)
    matrix.add_column("")
    for i in range(len(texts)):
        matrix.add_column(str(i + 1), justify="right")
    for i, row in enumerate(similarity.tolist()):
        matrix.add_row(str(i + 1), *(Text(f"{v:.3f}", style=_similarity_style(v)) for v in row))
    console.print(matrix)


def _similarity_style(value: float) -> str:
    return "bold green" if value >= 0.8 else "green" if value >= 0.5 else "yellow" if value >= 0.2 else "dim"


def attention(
    model_dir: str = typer.Argument(..., help="Model directory (with tokenizer.json)."),
    text: str = typer.Option(..., "--text", help="The text whose attention is drawn (T5: the encoder input)."),
    layer: Optional[int] = typer.Option(None, help="Layer, from 0 (default: the last)."),
    head: Optional[int] = typer.Option(None, help="Head, from 0 (default: the mean over heads)."),
    kind: str = typer.Option("self", help="self (BERT, GPT, the T5 encoder), decoder-self or cross (T5)."),
    target: Optional[str] = typer.Option(None, help="T5 decoder text for decoder-self and cross "
                                                    "(default: the model's greedy output)."),
    png: Optional[Path] = typer.Option(None, help="Also draw the map into this PNG file (needs matplotlib: "
                                                  "the 'plot' extra of llmcli)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Attention probabilities of one layer as a heatmap: rows attend to columns."""
    from llmcli.generation import load_for_inference
    from llmcli.inspection import attention_map, save_attention_png

    model, tokenizer = load_for_inference(model_dir, device)
    amap = attention_map(model, tokenizer, text, layer=layer, head=head, kind=kind, target=target)
    title = f"{model.config.name}: {amap.describe()}"
    if png is not None:
        save_attention_png(amap, png, title)
    console.print(Text(title, style="bold"))
    console.print(heatmap(amap.weights.tolist(), amap.queries, amap.keys, color=console.color_system is not None),
                  soft_wrap=True)
    if png is not None:
        log(f"wrote {png}")


def experts(
    model_dir: str = typer.Argument(..., help="Model directory or checkpoint of a mixture of experts."),
    text: str = typer.Option(..., "--text", help="The text whose tokens are routed."),
    top: int = typer.Option(5, help="Tokens listed per expert: those it took most often."),
    layer: Optional[int] = typer.Option(None, help="The layer whose experts are listed (default: the last)."),
    png: Optional[Path] = typer.Option(None, help="Also draw layers by experts into this PNG file (needs the "
                                                  "'plot' extra)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """How a mixture of experts routes a text: each layer's share of tokens per expert (a heatmap), and the tokens
    each expert of one layer takes most."""
    from llmcli.charts import check_png_path
    from llmcli.errors import UserError
    from llmcli.generation import load_for_inference
    from llmcli.inspection import expert_routing, save_routing_png

    if png is not None:
        check_png_path(png)
    if top <= 0:
        raise UserError(f"--top must be positive, got {top}")
    model, tokenizer = load_for_inference(model_dir, device)
    routing = expert_routing(model, tokenizer, text, top)
    layers = len(routing.load)
    shown = layers - 1 if layer is None else layer
    if not 0 <= shown < layers:
        raise UserError(f"--layer {layer} is out of range: {model.config.name} has {layers} layers of experts; "
                        f"use --layer 0 to {layers - 1}")
    title = f"{model.config.name}: {len(routing.tokens)} tokens, top-{routing.experts_per_token} of " \
            f"{len(routing.load[0])} experts"
    if png is not None:
        save_routing_png(routing, png, title)
        log(f"wrote {png}")
    if json_out:
        print_json(routing.to_dict())
        return
    console.print(Text(title + " (share of routed tokens per layer)", style="bold"))
    console.print(heatmap(routing.load, [f"layer {i}" for i in range(layers)],
                          [str(e) for e in range(len(routing.load[0]))], color=console.color_system is not None,
                          legend="the layer's busiest expert"), soft_wrap=True)
    table = Table(title=f"layer {shown}: the tokens each expert took most", box=box.SIMPLE, title_justify="left")
    for column in ("expert", "share", "tokens (times)"):
        table.add_column(column, justify="left" if column == "tokens (times)" else "right")
    for e, (share, taken) in enumerate(zip(routing.load[shown], routing.top_tokens[shown])):
        table.add_row(str(e), f"{share:.3f}", ", ".join(f"{t!r} ({n})" for t, n in taken) or "-")
    console.print(table)
