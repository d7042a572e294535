"""`llmcli tokenizer train`: a GPT, BERT or T5 style tokenizer trained on a corpus, as tokenizer.json."""

from __future__ import annotations

from pathlib import Path

import typer

from llmcli.cli.output import err_console

app = typer.Typer(no_args_is_help=True, help="Train tokenizers (byte-level BPE, WordPiece, Unigram).")


@app.command("train")
def train(data: Path = typer.Option(None, "--data", help="A .txt file, a folder of .txt files or a .jsonl file "
                                                         "with a 'text' field; default: Python's own docs."),
          vocab_size: int = typer.Option(..., "--vocab-size", help="Entries in the vocabulary, specials included."),
          kind: str = typer.Option("bpe", "--kind", help="bpe (GPT), wordpiece (BERT) or unigram (T5)."),
          out: Path = typer.Option(..., "--out", help="Directory to write tokenizer.json into (a model directory "
                                                      "or a new one)."),
          force: bool = typer.Option(False, "--force", help="Replace an existing tokenizer.json.")) -> None:
    """Train a tokenizer and write DIR/tokenizer.json."""
    from llmcli.model_dir import train_tokenizer_dir

    with err_console.status(f"training a {vocab_size}-entry {kind} tokenizer"):
        r = train_tokenizer_dir(data, vocab_size, kind, out, force)
    summary = (f"trained {r['kind']} tokenizer: vocab {r['vocab_size']}, {r['tokens']:,} tokens in the corpus "
               f"({r['documents']} documents), {r['chars'] / max(r['tokens'], 1):.2f} chars/token -> {r['path']}")
    err_console.print(summary, highlight=False, soft_wrap=True)  # one line, however narrow the terminal
