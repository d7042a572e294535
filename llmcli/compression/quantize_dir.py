"""`llmcli quantize` on a model directory: load it, measure, quantize (quantize.py), measure again, and write
the quantized directory with its quantization.json and before/after report.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from llmcli.compression.directories import open_source, write_compressed
from llmcli.compression.quantize import check_scheme, quantize_model
from llmcli.compression.snapshot import compare, snapshot
from llmcli.errors import UserError
from llmcli.model_dir import QUANTIZATION_FILE, check_outside, load_tokenizer
from llmcli.models.quantized import (DEFAULT_GROUP_SIZE, check_group_size, check_group_size_value, quantizable_layers,
                                     scheme_bits)
from llmcli.progress import SILENT, Progress
from llmcli.training.evaluation import corpus_batches


def quantize_model_dir(model_dir: str, out: str, scheme: str, group_size: int | None = None, method: str | None = None,
                       calibration_data: str | None = None, calibration_batches: int = 8, act_order: bool = False,
                       include_head: bool = False, data: str | None = None, seq_len: int | None = None,
                       device: str = "auto", speed: bool = True, force: bool = False,
                       progress: Progress = SILENT) -> dict:
    """`llmcli quantize`: load, measure, quantize, measure again, write the directory. Returns the report."""
    method = method or ("gptq" if calibration_data else "rtn")
    check_scheme(scheme, method)
    check_outside(model_dir, out)
    if scheme_bits(scheme) == 8 and group_size is not None:
        raise UserError(f"--scheme {scheme} keeps one scale per output channel; --group-size is for int4 only")
    group_size = group_size or DEFAULT_GROUP_SIZE
    if scheme_bits(scheme) == 4:
        check_group_size_value(group_size)
    if calibration_data and method != "gptq":
        raise UserError("--calibration-data is only used by --method gptq; drop it or use --method gptq")
    if calibration_batches < 1:
        raise UserError(f"--calibration-batches {calibration_batches} must be at least 1")
    if act_order and method != "gptq":
        raise UserError("--act-order only applies to --method gptq")

    model, corpus, target = open_source(model_dir, data, seq_len, device)
    check_group_size(model, quantizable_layers(model, include_head), scheme, group_size)
    calibration = None
    if method == "gptq":
        calibration = calibration_batches_of(model_dir, model, corpus, calibration_data, calibration_batches)
    before = snapshot(model, corpus.val, target, speed)
    spec, errors = quantize_model(model, scheme, group_size, method, include_head, calibration, act_order, progress)
    after = snapshot(model, corpus.val, target, speed)
    if calibration is not None:
        spec["calibration"] = {"data": calibration_data or data or "embedded corpus", "batches": len(calibration),
                               "tokens": sum(int(b["input_ids"].numel()) for b in calibration)}
    report = {"source": str(model_dir), "method": "quantize", "before": before, "after": after,
              "change": compare(before, after), "device": str(target), "seq_len": corpus.seq_len,
              "quantization": {**{k: v for k, v in spec.items() if k != "layers"}, "layers": len(spec["layers"]),
                               "mean_weight_rel_error": _mean(errors, "weight_rel_error"),
                               "mean_output_rel_error": _mean(errors, "output_rel_error"),
                               "layer_errors": errors}}
    write_compressed(model, Path(model_dir), out, report, force, extra_files={QUANTIZATION_FILE: spec})
    return report


def calibration_batches_of(model_dir: str, model: nn.Module, corpus, calibration_data: str | None,
                           count: int) -> list[dict]:
    """GPTQ's calibration inputs: the first `count` batches of the training split (never the held-out one)."""
    if calibration_data is not None:
        corpus = corpus_batches(Path(model_dir), model.config, load_tokenizer(model_dir), calibration_data,
                                corpus.seq_len, val_batches=1)
    return [corpus.train.batch(i) for i in range(count)]


def _mean(errors: dict, key: str) -> float | None:
    values = [e[key] for e in errors.values() if key in e]
    return sum(values) / len(values) if values else None
