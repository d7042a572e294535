"""A compression command's directories: the full-precision model it starts from, and the compressed model
directory it writes (config.json, model.safetensors, tokenizer.json, and compression.json, the report).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmcli.errors import UserError
from llmcli.model_dir import (QUANTIZATION_FILE, atomic_output_dir, copy_tokenizer_files, load_model, load_tokenizer,
                              save_model, write_json)
from llmcli.runtime import resolve_device
from llmcli.training.evaluation import corpus_batches

REPORT_FILE = "compression.json"


def full_precision_dir(ref: str | Path, flag: str = "") -> Path:
    """A model directory to compress or distil from: it must exist and not be quantized already."""
    directory, where = Path(ref), f"{flag} {ref}".strip()
    if not directory.is_dir():
        raise UserError(f"{where}: not a model directory; train one with `llmcli train` or convert one")
    if (directory / QUANTIZATION_FILE).is_file():
        raise UserError(f"{where}: already quantized ({QUANTIZATION_FILE}); start from the full-precision model")
    return directory


def open_source(model_dir: str | Path, data: str | None, seq_len: int | None, device: str = "auto",
                val_batches: int = 8, batch_size: int = 8, seed: int = 0):
    """A compression command's input: (model, corpus batches, device). Refuses an already quantized model."""
    directory = full_precision_dir(model_dir)
    target = resolve_device(device)
    model = load_model(directory, device=str(target))
    corpus = corpus_batches(directory, model.config, load_tokenizer(directory), data, seq_len, val_batches,
                            batch_size, seed)
    return model, corpus, target


def write_compressed(model: torch.nn.Module, source: Path, out: str | Path, report: dict, force: bool = False,
                     extra_files: dict[str, object] | None = None) -> Path:
    """Write a compressed model directory atomically: weights, the source's tokenizer, the report."""
    out = Path(out)
    with atomic_output_dir(out, force) as tmp:
        save_model(model, tmp)
        copy_tokenizer_files(source, tmp)
        for name, data in (extra_files or {}).items():
            write_json(tmp / name, data)
        write_json(tmp / REPORT_FILE, report)
    return out
