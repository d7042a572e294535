"""`llmcli scaling sweep`: train several models on one corpus with one token (or FLOP) budget each.

Every run is an ordinary `llmcli train` run directory under OUT; OUT/runs.jsonl gets one line per
finished run with N (non-embedding parameters, Kaplan et al. 2020), D (training tokens), C ≈ 6·N·D,
the wall time and the final validation loss. All runs share the first run's tokenizer, so their
losses are per token of the same vocabulary. A sweep re-run skips the runs it already finished; a sweep
stopped by Ctrl-C or killed records only finished runs, and the re-run redoes the unfinished one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

from llmcli.data import read_corpus
from llmcli.errors import Stopped, UserError
from llmcli.model_dir import output_lock, resolve_config
from llmcli.profiling.counts import count, tokens_for_compute, training_compute
from llmcli.progress import SILENT, Progress
from llmcli.runtime import DEFAULT_SEQ_LEN
from llmcli.scaling.fit import RUNS_FILE
from llmcli.training.loop import TrainArgs
from llmcli.training.pretrain import pretrain
from llmcli.training.run import TrainFlags


def dataset_id(data: str | None) -> str:
    """A short fingerprint of the corpus text: runs on different data must not be fitted together."""
    digest = hashlib.sha256("\0".join(read_corpus(data)).encode()).hexdigest()[:12]
    return f"{'default corpus' if data is None else Path(data).name}:{digest}"


def parse_budgets(text: str | None, flag: str) -> list[float]:
    if text is None:
        return []
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give numbers such as 2e5 or 1e5,4e5") from None
    if not values or any(not v > 0 or not math.isfinite(v) for v in values):
        raise UserError(f"{flag} {text!r}: every budget must be positive")
    return values


def plan_runs(models: list[str], tokens: list[float], compute: list[float], tokens_per_step: int) -> list[dict]:
    """One entry per (model, budget): its config, N and the whole number of steps the budget buys."""
    if bool(tokens) == bool(compute):
        raise UserError("give exactly one budget: --tokens D (tokens per model) or --compute C (FLOPs per model)")
    plans = []
    for ref in models:
        config, _ = resolve_config(ref)
        n = count(config).non_embedding_params
        for budget in tokens or compute:
            wanted = budget if tokens else tokens_for_compute(n, budget)
            steps = max(1, round(wanted / tokens_per_step))
            if wanted < tokens_per_step / 2:
                raise UserError(f"{config.name}: a budget of {budget:.3g} {'tokens' if tokens else 'FLOPs'} is "
                                f"{wanted:.0f} tokens, less than one step of {tokens_per_step}; raise the budget "
                                f"or lower --batch-size / --seq-len")
            plans.append({"ref": ref, "config": config, "n": n, "steps": steps, "budget": budget,
                          "budget_kind": "tokens" if tokens else "compute"})
    return plans


def sweep(models: list[str], out: str, tokens: str | None = None, compute: str | None = None,
          data: str | None = None, flags: TrainFlags = TrainFlags(), force: bool = False,
          log: Callable = print, progress: Progress = SILENT) -> list[dict]:
    """Train each model for its budget; returns the runs.jsonl rows (one per model and budget)."""
    if not models:
        raise UserError("--models is empty; give zoo names, TOML files or directories, e.g. gpt-nano,gpt-micro")
    args = TrainArgs(**flags.given_args())
    seq_len = args.seq_len or DEFAULT_SEQ_LEN
    flags = flags.replace(seq_len=seq_len, force=True)
    token_budgets, compute_budgets = parse_budgets(tokens, "--tokens"), parse_budgets(compute, "--compute")
    several_budgets = len(token_budgets or compute_budgets) > 1
    plans = plan_runs(models, token_budgets, compute_budgets, args.batch_size * seq_len * args.grad_accum)
    for plan in plans:
        if seq_len > plan["config"].max_seq_len:
            raise UserError(f"--seq-len {seq_len} is above {plan['config'].name}'s max_seq_len "
                            f"({plan['config'].max_seq_len}); use --seq-len {plan['config'].max_seq_len} or less")
    vocabularies = {(p["config"].vocab_size, p["config"].tokenizer) for p in plans}
    if len(vocabularies) > 1 and not force:
        raise UserError("the models use different vocabularies or tokenizers, so their losses are not per the same "
                        "token; sweep models with one vocab_size and tokenizer, or pass --force")

    out_dir = Path(out)
    with output_lock(out_dir):  # one sweep at a time in a directory
        runs_file = out_dir / RUNS_FILE
        if out_dir.exists() and any(out_dir.iterdir()) and not runs_file.is_file():
            raise UserError(f"{out_dir}: exists and is not a sweep directory (no {RUNS_FILE}); choose another --out")
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = [json.loads(line) for line in runs_file.read_text().splitlines() if line.strip()] \
            if runs_file.is_file() else []
        dataset = dataset_id(data)
        tokenizer_dir = None
        for index, plan in enumerate(plans, 1):
            config = plan["config"]
            run_name = f"{config.name}-{plan['budget']:.3g}" if several_budgets else config.name
            run_dir = out_dir / run_name
            steps_tokens = plan["steps"] * args.batch_size * seq_len * args.grad_accum
            done = next((r for r in rows if r["name"] == run_name and r["d"] == steps_tokens
                         and r["dataset"] == dataset and (run_dir / "model.safetensors").is_file()), None)
            if done is not None:
                log(f"[{index}/{len(plans)}] {run_name}: already done (loss {done['loss']:.4f})")
                tokenizer_dir = tokenizer_dir or run_dir
                continue
            log(f"[{index}/{len(plans)}] {run_name}: N {plan['n']:,}, D {steps_tokens:,} tokens "
                f"({plan['steps']} steps), C {training_compute(plan['n'], steps_tokens):.3g} FLOPs")
            start = time.perf_counter()
            summary = pretrain(plan["ref"], data, str(run_dir), flags.replace(steps=plan["steps"]), log=log,
                               progress=progress, tokenizer_dir=tokenizer_dir)
            if summary["stopped_early"]:  # Ctrl-C: the finished runs are in runs.jsonl, this one is not
                raise Stopped(f"{run_name} stopped at step {summary['step']} of {plan['steps']}; the {len(rows)} "
                              f"finished runs are in {runs_file}; run the same command again to redo {run_name} "
                              f"and go on")
            wall = time.perf_counter() - start
            tokenizer_dir = tokenizer_dir or run_dir
            row = {"name": run_name, "model": config.name, "family": config.family, "n": plan["n"],
                   "d": steps_tokens, "compute": training_compute(plan["n"], steps_tokens), "steps": plan["steps"],
                   "batch_size": args.batch_size, "seq_len": seq_len, "loss": summary["val_loss"],
                   "perplexity": summary["val_perplexity"], "wall_s": round(wall, 2), "dataset": dataset,
                   "device": summary["device"],
                   "run_dir": str(run_dir), plan["budget_kind"]: plan["budget"]}
            rows = [r for r in rows if r["name"] != run_name] + [row]
            _write_rows(runs_file, rows)
        return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)
