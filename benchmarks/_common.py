"""Shared helpers for the benchmark scripts: machine description, timing, recording results."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    """The CPU with its features (which kernels could run), cores, torch and its threads."""
    import torch

    from llmcli.cpu import describe_cpu

    return f"{describe_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def header(title: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return f"## {title}\n\n{date}, commit {commit}, {machine()}, load average {load:.2f} at the end\n"


def timed(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def record(section: str, dry_run: bool = False) -> None:
    """Print a section and, unless dry_run (--no-record), append it to RESULTS.md."""
    print(section)
    if dry_run:
        return
    with open(RESULTS, "a") as f:
        f.write("\n" + section.rstrip() + "\n")


def record_table(title: str, intro: str, columns: list[str], rows: list[str], dry_run: bool = False) -> None:
    """A section: the header (date, commit, machine), a paragraph, and a markdown table of the rows."""
    aligns = ["---"] * 2 + ["---:"] * (len(columns) - 2)
    table = "\n".join(["| " + " | ".join(columns) + " |", "|" + "|".join(aligns) + "|", *rows])
    record(f"{header(title)}\n{intro}\n\n{table}\n", dry_run=dry_run)


def training_steps(model: str, batch_size: int, seq_len: int):
    """(config, {"llmcli": step, "transformers": step}): one forward + loss + backward + AdamW step each, on the
    same GPT-2-shaped weights and the same random window (the same make_optimizer for both)."""
    import tempfile

    import torch
    import transformers

    from llmcli import load_model
    from llmcli.interop.hf import convert_to_hf
    from llmcli.model_dir import build_model_dir, resolve_config
    from llmcli.runtime import family_loss
    from llmcli.training.optim import make_optimizer

    config, _ = resolve_config(model)
    with tempfile.TemporaryDirectory() as tmp:
        build_model_dir(config, Path(tmp) / "ours", seed=0)
        convert_to_hf(Path(tmp) / "ours", Path(tmp) / "hf")
        ours = load_model(Path(tmp) / "ours").train()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").train()
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def step_fn(model, loss_fn):
        optimizer = make_optimizer(model, 1e-4, 0.1)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            optimizer.step()
        return step

    return config, {
        "llmcli": step_fn(ours, lambda m: family_loss(m, batch)),
        # HF shifts labels itself, so it gets the unshifted window.
        "transformers": step_fn(theirs, lambda m: m(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss),
    }
