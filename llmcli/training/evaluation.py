"""`llmcli eval`: the family objective's loss, perplexity and bits per byte on a corpus's held-out split.

Bits per byte divide the loss by the held-out text's UTF-8 bytes instead of its tokens,
bits_per_byte = loss / ln 2 x tokens / bytes, so that models with different tokenizers compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmcli.data import PretrainingData, document_stream, read_corpus, split_documents, text_bytes_per_token
from llmcli.errors import UserError
from llmcli.model_dir import load_model, load_tokenizer
from llmcli.runtime import bits_per_byte, default_seq_len, evaluate, resolve_device
from llmcli.tokenizer import special_ids
from llmcli.training.run import TRAINING_FILE, read_run

OBJECTIVES = {"gpt": "next-token (CLM)", "bert": "masked LM (15%)", "t5": "span corruption (15%, mean span 3)"}


@dataclass
class CorpusBatches:
    """A model directory's corpus as batches: `train` draws training batches, `val` is the fixed held-out set."""

    train: object  # PretrainingData
    val: list[dict]
    seq_len: int
    val_bytes_per_token: float  # UTF-8 bytes of the held-out documents over their tokens (separators included)


def run_seq_len(directory: Path, config) -> int:
    """The training run's --seq-len if the directory is a run, else the default (the context, at most 128)."""
    if (directory / TRAINING_FILE).is_file():
        return read_run(directory)["args"]["seq_len"]
    return default_seq_len(config)


def corpus_batches(directory: Path, config, tokenizer, data: str | None, seq_len: int | None,
                   val_batches: int = 8, batch_size: int = 8, seed: int = 0) -> CorpusBatches:
    """Tokenize a corpus (default: the embedded one) with the directory's tokenizer, split as training does."""
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise UserError(f"{directory}: tokenizer has {tokenizer.get_vocab_size()} tokens, the model only "
                        f"{config.vocab_size}; the directory mixes files from different models")
    seq_len = seq_len if seq_len is not None else run_seq_len(directory, config)
    if seq_len > config.max_seq_len or seq_len <= 0:
        raise UserError(f"--seq-len {seq_len} must be between 1 and max_seq_len ({config.max_seq_len})")
    train_docs, val_docs = split_documents(read_corpus(data))
    special = special_ids(tokenizer, config)
    train_tokens, val_tokens = (document_stream(tokenizer, docs, special) for docs in (train_docs, val_docs))
    dataset = PretrainingData(config.family, train_tokens, special, tokenizer.get_vocab_size(),
                              seq_len, batch_size, seed)
    return CorpusBatches(dataset, dataset.eval_batches(val_tokens, val_batches), seq_len,
                         text_bytes_per_token(val_docs, val_tokens))


def evaluate_model_dir(model_dir: str, data: str | None, seq_len: int | None, batches: int = 8,
                       device: str = "auto") -> dict:
    directory = Path(model_dir)
    model = load_model(directory)
    corpus = corpus_batches(directory, model.config, load_tokenizer(directory), data, seq_len, batches)
    target = resolve_device(device)
    result = evaluate(model.to(target), corpus.val, target)
    return {**result, "bits_per_byte": bits_per_byte(result["loss"], corpus.val_bytes_per_token),
            "bytes_per_token": corpus.val_bytes_per_token, "objective": OBJECTIVES[model.config.family],
            "seq_len": corpus.seq_len}
