"""What every compression command reports: size, held-out quality and speed, before and after.

Also where compressed models are written: a model directory (config.json, model.safetensors,
tokenizer.json) plus `compression.json`, the report itself, so the numbers travel with the model.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import torch

from llmcli.model_dir import TOKENIZER_FILE, atomic_output_dir, save_model, write_json

REPORT_FILE = "compression.json"
SPEED_NEW_TOKENS = 32


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of everything the model stores (parameters and persistent buffers), as written to disk."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the transformer's linear layers (quantized ones included), embeddings and heads excluded."""
    total = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if hasattr(module, "stored_bytes"):
            total += module.stored_bytes()
        elif isinstance(module, torch.nn.Linear):
            total += sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return total


def logical_parameters(model: torch.nn.Module) -> int:
    """Weights the model computes with: a quantized layer counts its in × out weights, not its packed bytes."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if hasattr(module, "stored_bytes"):
            total += module.in_features * module.out_features
    return total


@torch.no_grad()
def tokens_per_s(model: torch.nn.Module, device: torch.device, reps: int = 3) -> dict:
    """Decode speed with the KV cache (GPT, T5: batch 1, 32 new tokens) or forward speed (BERT: batch 1, 128 tokens)."""
    from llmcli.generation import generate_ids

    config = model.config
    prompt = torch.randint(config.vocab_size, (1, min(8, config.max_seq_len // 2)), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    if config.family == "bert":
        length = min(128, config.max_seq_len)
        ids = torch.randint(config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
        run, tokens, what = (lambda: model(ids)), length, "forward"
    else:
        new = min(SPEED_NEW_TOKENS, config.max_seq_len - prompt.shape[1])
        run, tokens, what = (lambda: generate_ids(model, prompt, new, temperature=0.0)), new, "decode"
    run()  # warm-up
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(tokens / (time.perf_counter() - start))
    return {"mode": what, "tokens_per_s": statistics.mean(samples), "samples": samples}


def snapshot(model: torch.nn.Module, val_batches: list[dict], device: torch.device, speed: bool = True) -> dict:
    """Size, held-out loss/perplexity and (optionally) speed of one model."""
    from llmcli.training.loop import evaluate

    model.eval()
    quality = evaluate(model, val_batches, device)
    result = {"params": logical_parameters(model), "state_bytes": state_bytes(model),
              "linear_bytes": linear_weight_bytes(model), "loss": quality["loss"],
              "perplexity": quality["perplexity"], "eval_tokens": quality["tokens"]}
    if speed:
        result["speed"] = tokens_per_s(model, device)
    return result


def compare(before: dict, after: dict) -> dict:
    """The ratios a reader wants: how much smaller, how much worse, how much faster."""
    change = {"size_ratio": before["state_bytes"] / after["state_bytes"],
              "linear_size_ratio": before["linear_bytes"] / after["linear_bytes"] if after["linear_bytes"] else None,
              "perplexity_change": after["perplexity"] / before["perplexity"] - 1}
    if "speed" in before and "speed" in after:
        change["speed_ratio"] = after["speed"]["tokens_per_s"] / before["speed"]["tokens_per_s"]
    return change


def write_compressed(model: torch.nn.Module, source: Path, out: str | Path, report: dict, force: bool = False,
                     extra_files: dict[str, object] | None = None) -> Path:
    """Write a compressed model directory atomically: weights, the source's tokenizer, the report."""
    out = Path(out)
    with atomic_output_dir(out, force) as tmp:
        save_model(model, tmp)
        if (source / TOKENIZER_FILE).is_file():
            shutil.copy2(source / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        for name, data in (extra_files or {}).items():
            write_json(tmp / name, data)
        write_json(tmp / REPORT_FILE, report)
    return out


def full_precision_dir(ref: str | Path, flag: str = "") -> Path:
    """A model directory to compress or distil from: it must exist and not be quantized already."""
    from llmcli.errors import UserError
    from llmcli.model_dir import QUANTIZATION_FILE

    directory, where = Path(ref), f"{flag} {ref}".strip()
    if not directory.is_dir():
        raise UserError(f"{where}: not a model directory; train one with `llmcli train` or convert one")
    if (directory / QUANTIZATION_FILE).is_file():
        raise UserError(f"{where}: already quantized ({QUANTIZATION_FILE}); start from the full-precision model")
    return directory


def open_source(model_dir: str | Path, data: str | None, seq_len: int | None, device: str = "auto",
                val_batches: int = 8, batch_size: int = 8, seed: int = 0):
    """A compression command's input: (model, corpus batches, device). Refuses an already quantized model."""
    from llmcli.model_dir import load_model, load_tokenizer
    from llmcli.training.evaluation import corpus_batches
    from llmcli.training.loop import resolve_device

    directory = full_precision_dir(model_dir)
    target = resolve_device(device)
    model = load_model(directory, device=str(target))
    corpus = corpus_batches(directory, model.config, load_tokenizer(directory), data, seq_len, val_batches,
                            batch_size, seed)
    return model, corpus, target
