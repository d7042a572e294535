"""`llmcli eval`: the family objective's loss and perplexity on a corpus's held-out split."""

from __future__ import annotations

import json
from pathlib import Path

from llmcli.errors import UserError

OBJECTIVES = {"gpt": "next-token (CLM)", "bert": "masked LM (15%)", "t5": "span corruption (15%, mean span 3)"}


def evaluate_model_dir(model_dir: str, data: str | None, seq_len: int | None, batches: int = 8,
                       device: str = "auto") -> dict:
    from llmcli.data import PretrainingData, document_stream, read_corpus, split_documents
    from llmcli.model_dir import load_model, load_tokenizer
    from llmcli.tokenizer import special_ids
    from llmcli.training.loop import evaluate, resolve_device

    directory = Path(model_dir)
    model = load_model(directory)
    config = model.config
    tokenizer = load_tokenizer(directory)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise UserError(f"{directory}: tokenizer has {tokenizer.get_vocab_size()} tokens, the model only "
                        f"{config.vocab_size}; the directory mixes files from different models")
    training = directory / "training.json"
    if seq_len is None:
        seq_len = json.loads(training.read_text())["args"]["seq_len"] if training.is_file() else min(128, config.max_seq_len)
    if seq_len > config.max_seq_len or seq_len <= 0:
        raise UserError(f"--seq-len {seq_len} must be between 1 and max_seq_len ({config.max_seq_len})")
    _, val_docs = split_documents(read_corpus(data))
    special = special_ids(tokenizer)
    val_tokens = document_stream(tokenizer, val_docs)
    dataset = PretrainingData(config.family, val_tokens, special, tokenizer.get_vocab_size(), seq_len, 8, 0)
    target = resolve_device(device)
    result = evaluate(model.to(target), dataset.eval_batches(val_tokens, batches), target)
    return {**result, "objective": OBJECTIVES[config.family], "seq_len": seq_len}
