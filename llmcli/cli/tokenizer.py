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
    from llmcli.config import load_config_json
    from llmcli.data import read_corpus
    from llmcli.errors import UserError
    from llmcli.model_dir import CONFIG_FILE, TOKENIZER_FILE, atomic_output_dir
    from llmcli.tokenizer import KINDS, encode_plain, save_tokenizer, train_tokenizer

    if kind not in KINDS:
        raise UserError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    if (out / TOKENIZER_FILE).exists() and not force:
        raise UserError(f"{out / TOKENIZER_FILE}: already exists; pass --force to replace it")
    if (out / CONFIG_FILE).is_file():
        model_vocab = load_config_json(out).vocab_size
        if vocab_size > model_vocab:
            raise UserError(f"{out}: the model's vocab_size is {model_vocab}, smaller than --vocab-size {vocab_size}; "
                            f"use --vocab-size {model_vocab} or less")
    docs = read_corpus(data)
    with err_console.status(f"training a {vocab_size}-entry {kind} tokenizer on {len(docs)} documents"):
        tokenizer = train_tokenizer(docs, kind, vocab_size)
        n_tokens = sum(map(len, encode_plain(tokenizer, docs)))
    if out.is_dir():
        save_tokenizer(tokenizer, out)  # beside the model files, which stay untouched
    else:
        with atomic_output_dir(out) as tmp:
            save_tokenizer(tokenizer, tmp)
    n_chars = sum(map(len, docs))
    summary = (f"trained {kind} tokenizer: vocab {tokenizer.get_vocab_size()}, {n_tokens:,} tokens in the corpus, "
               f"{n_chars / max(n_tokens, 1):.2f} chars/token -> {out / TOKENIZER_FILE}")
    err_console.print(summary, highlight=False, soft_wrap=True)  # one line, however narrow the terminal
