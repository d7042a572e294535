"""The figures every compression command reports, before and after: size, held-out quality and speed.

The report is written beside the compressed model as compression.json (directories.py), so the numbers
travel with the model.
"""

from __future__ import annotations

import statistics
import time

import torch

from llmcli.generation import generate_ids
from llmcli.models import gemv
from llmcli.models.layout import block_linears
from llmcli.runtime import evaluate

SPEED_NEW_TOKENS = 32


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of everything the model stores (parameters and persistent buffers), as written to disk."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the blocks' linear layers (quantized ones included), embeddings and heads excluded."""
    return sum(state_bytes(layer) for layer in block_linears(model).values())


def logical_parameters(model: torch.nn.Module) -> int:
    """Weights the model computes with: a quantized layer counts its in × out weights, not its packed bytes."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if hasattr(module, "stored_bytes"):
            total += module.in_features * module.out_features
    return total


@torch.no_grad()
def tokens_per_s(model: torch.nn.Module, device: torch.device, reps: int = 3) -> dict:
    """Decode speed with the KV cache (GPT, T5: batch 1, 32 new tokens) or forward speed (BERT: batch 1, 128 tokens).
    On CPU, quantized layers are first held as generation holds them (the decode kernels' tiles, in place: their
    state dict stays row-major), so that the figure is the one `generate` gets."""
    config = model.config
    if device.type == "cpu":
        gemv.tile_integer_layers(model)
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
