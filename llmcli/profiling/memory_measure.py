"""Measure what the estimate predicts: the peak memory of the real step, in a child process.

Train: one step of llmcli's own Trainer.train_step (forward, loss, backward, clipping, optimizer step) with
the chosen precision and checkpointing, after the optimizer states exist (one step on zero gradients
creates them), as in a running loop. Infer: prefill plus `new_tokens` decode steps of generate_ids with the
KV cache (GPT, T5), or one forward (BERT).

"Measured" is peak.py's measurement (CUDA: max_memory_allocated; CPU: peak anonymous resident memory) above
the memory in use before the model is built. On CPU the baseline is taken after a warm-up run of a
one-layer miniature of the same architecture, so lazy imports, kernels' code, thread pools and malloc
arenas are already resident; then the model is built, and the peak is reset before the measured step.
The child runs with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB, so freed tensors go back to the OS
at once and RSS follows live tensors as max_memory_allocated does on CUDA (the default dynamic threshold
keeps freed blocks of up to 32 MiB in the heap, which added about 10% to gpt2-small's peak).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmcli.config import ModelConfig, config_from_dict
from llmcli.errors import UserError
from llmcli.finetune.lora import add_lora
from llmcli.generation import generate_ids
from llmcli.models import build_model
from llmcli.profiling.memory import MemoryEstimate
from llmcli.profiling.peak import memory_in_use, peak_memory, reset_peak
from llmcli.runtime import machine_memory, resolve_device, resolve_precision, torch_dtype
from llmcli.training.loop import Trainer, TrainArgs
from llmcli.training.optim import make_optimizer

MMAP_THRESHOLD = 128 * 1024


def check_measurable(estimate: MemoryEstimate, device: str) -> None:
    """Refuse, before anything is allocated, what cannot be measured here or would not fit."""
    inputs = estimate.inputs
    unsupported = [(inputs["dtype"] in ("int8", "int4"), f"--dtype {inputs['dtype']} (no quantized kernels yet)"),
                   (inputs["lora_rank"] > 0 and inputs["dtype"] != "fp32",
                    f"--lora-rank with --dtype {inputs['dtype']} (the estimate assumes a base stored in --dtype; "
                    f"llmcli finetune keeps it in fp32): measure LoRA with --dtype fp32"),
                   (inputs["gpus"] > 1, "--gpus above 1 (the measurement runs on one device)"),
                   (inputs["optimizer"] == "adamw8bit", "--optimizer adamw8bit (needs bitsandbytes)")]
    for refused, what in unsupported:
        if refused:
            raise UserError(f"--measure cannot run {what}; drop --measure to get the estimate alone")
    torch_device = resolve_device(device)
    if inputs["mode"] == "train":
        resolve_precision(inputs["dtype"], torch_device)
    have = machine_memory(torch_device)
    if estimate.total_bytes > have:
        raise UserError(f"{inputs['model']}: the estimate ({estimate.total_bytes / 1e9:.3g} GB) exceeds this "
                        f"{torch_device.type} device's memory ({have / 1e9:.3g} GB); not measuring. Lower "
                        f"--batch-size or --seq-len, or try --grad-checkpointing")


def measure_memory(config: ModelConfig, estimate: MemoryEstimate, device: str) -> dict:
    """Run the step the estimate describes in a child process; returns measured_bytes and seconds."""
    check_measurable(estimate, device)
    spec = {"config": config.to_dict(), "inputs": estimate.inputs, "device": device}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run([sys.executable, "-m", "llmcli.profiling.memory_measure"], input=json.dumps(spec),
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        if proc.returncode == 2:
            raise UserError(lines[-1].removeprefix("error: "))
        raise RuntimeError(f"the measuring process failed (exit {proc.returncode}): {lines[-1]}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------- the child


def _miniature(config: ModelConfig) -> ModelConfig:
    """One layer of the same architecture at toy width: the warm-up runs the same code paths."""
    return dataclasses.replace(config, vocab_size=128, d_model=32, n_heads=2, d_head=16, d_ff=64, n_layers=1,
                               n_kv_heads=2 if config.n_kv_heads == config.n_heads else 1,
                               n_decoder_layers=1 if config.family == "t5" else None, relative_buckets=8,
                               relative_max_distance=16, max_seq_len=32, name=f"{config.name}-warmup")


class _RandomBatches:
    """Random tokens shaped like the family's training batches (data.py): GPT, BERT with a mask, T5."""

    def __init__(self, config: ModelConfig, batch: int, seq_len: int, target_len: int | None) -> None:
        self.config, self.shape, self.target_len = config, (batch, seq_len), target_len or seq_len
        self.tokens_per_batch = batch * seq_len

    def batch(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        ids = lambda *shape: torch.randint(self.config.vocab_size, shape, generator=generator)  # noqa: E731
        batch, seq_len = self.shape
        if self.config.family == "t5":
            return {"input_ids": ids(batch, seq_len), "labels": ids(batch, self.target_len),
                    "decoder_input_ids": ids(batch, self.target_len)}
        data = {"input_ids": ids(batch, seq_len), "labels": ids(batch, seq_len)}
        if self.config.family == "bert":
            data["attention_mask"] = torch.ones(batch, seq_len, dtype=torch.long)
        return data


def _optimizer(name: str, model, lr: float = 1e-4, weight_decay: float = 0.1):
    if name == "adamw":
        return make_optimizer(model, lr, weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":  # the same decay groups as make_optimizer
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, foreach=True)
    return torch.optim.Adafactor(params, lr=lr)


def _trainer(config: ModelConfig, inputs: dict, device: str, run_dir: str):
    """llmcli's Trainer on random batches, with the optimizer's states created by a step on zero gradients."""
    args = TrainArgs(steps=1, batch_size=inputs["batch_size"], seq_len=inputs["seq_len"], precision=inputs["dtype"],
                     grad_checkpointing=inputs["grad_checkpointing"], device=device, grad_clip=1.0)
    data = _RandomBatches(config, inputs["batch_size"], inputs["seq_len"], inputs.get("target_len"))
    model = build_model(config, seed=0)
    if inputs["lora_rank"]:  # the frozen base with LoRA A/B on the targets, as `llmcli finetune --method lora`
        model.requires_grad_(False)
        add_lora(model, inputs["lora_rank"], 16.0, 0.0, inputs["lora_targets"])
    trainer = Trainer(model, data, [], args, run_dir=Path(run_dir))
    if inputs["optimizer"] != "adamw":
        trainer.optimizer = _optimizer(inputs["optimizer"], trainer.model)
    _set_attention(trainer.model, inputs["attention"])
    for p in trainer.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return trainer


def _generator(config: ModelConfig, inputs: dict, device):
    """A model in the inference dtype (built directly in it, no fp32 copy) and the generation to run."""
    dtype = torch_dtype(inputs["dtype"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(config, seed=0).eval()
    finally:
        torch.set_default_dtype(previous)
    _set_attention(model, inputs["attention"])
    batch, seq_len, new = inputs["batch_size"], inputs["seq_len"], inputs["new_tokens"]
    ids = lambda n: torch.randint(config.vocab_size, (batch, n), device=device)  # noqa: E731

    def run() -> None:
        if config.family == "bert":
            with torch.no_grad():
                model(ids(seq_len), attention_mask=torch.ones(batch, seq_len, dtype=torch.long, device=device))
        elif config.family == "t5":
            generate_ids(model, ids(seq_len), new, temperature=0)
        else:
            generate_ids(model, ids(seq_len - new), new, temperature=0)

    return run


def _set_attention(model, attention: str) -> None:
    for module in model.modules():
        if hasattr(module, "record_weights"):
            module.record_weights = attention == "eager"


def _run(spec: dict) -> dict:
    config = config_from_dict(spec["config"], "<measure>")
    inputs = spec["inputs"]
    device = resolve_device(spec["device"])
    with tempfile.TemporaryDirectory() as run_dir:  # the Trainer wants one; nothing is written
        if inputs["mode"] == "train":
            warm_inputs = dict(inputs, batch_size=1, seq_len=8, target_len=8)
            _trainer(_miniature(config), warm_inputs, spec["device"], run_dir).train_step()
        else:
            warm_new = min(inputs["new_tokens"], 2)
            _generator(_miniature(config), dict(inputs, batch_size=1, seq_len=warm_new + 4, new_tokens=warm_new),
                       device)()
        gc.collect()
        baseline = memory_in_use(device)
        if inputs["mode"] == "train":
            step = _trainer(config, inputs, spec["device"], run_dir).train_step
        else:
            step = _generator(config, inputs, device)
        reset_peak(device)
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        peak = peak_memory(device)
    # A model of a few kB is below the CPU method's resolution (library pages mapped while it ran): not below 0.
    return {"measured_bytes": max(0, peak - baseline), "baseline_bytes": baseline, "seconds": round(seconds, 2),
            "device": str(device), "torch": torch.__version__}


def main() -> None:
    try:
        result = _run(json.loads(sys.stdin.read()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
