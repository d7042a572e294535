"""A finished (or running) run directory as figures: its metrics.jsonl curves and a summary of each run.

metrics.jsonl holds one JSON object per line: training records {"step", "loss", "lr", "grad_norm", "tokens",
"tokens_per_s"; a mixture of experts also "router_balance_loss", "router_z_loss" and "expert_load", per layer the
share of the step's routed tokens each expert took} every log_every steps, and validation records {"step", "val_loss", "val_perplexity", ...}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmcli.charts import write_png
from llmcli.errors import UserError
from llmcli.training.loggers import METRICS_FILE
from llmcli.training.replay import read_run_config
from llmcli.training.run import TRAINING_FILE


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order; a bad line is named by its number."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory; give a run directory written by llmcli train, finetune "
                        f"or distill")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {METRICS_FILE}; is this a run directory (written by llmcli train, "
                        f"finetune or distill)?")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}, line {number}: a record needs an integer \"step\"")
        records.append(record)
    return records


def curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of the training loss and the validation loss, exactly as logged."""
    return {"loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
            "val_loss": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]}


def summarize(run_dir: str | Path, records: list[dict]) -> dict:
    """One row of `llmcli runs show`: steps, tokens, training time, rate and the best validation figures.

    Training time is the logged windows' tokens over their tokens/s (evaluation and the compiling step are
    not in it)."""
    run_dir = Path(run_dir)
    training = [r for r in records if "loss" in r]
    validation = [r for r in records if "val_loss" in r]
    row = {"run": str(run_dir), "model": None, "steps": max((r["step"] for r in records), default=0),
           "tokens": training[-1].get("tokens") if training else None, "train_time_s": None, "tokens_per_s": None,
           "final_loss": training[-1]["loss"] if training else None, "best_val_loss": None, "best_val_step": None,
           "best_val_perplexity": None, "best_val_bits_per_byte": None,
           "expert_load": next((r["expert_load"] for r in reversed(training) if "expert_load" in r), None)}
    try:
        row["model"] = json.loads((run_dir / TRAINING_FILE).read_text()).get("model")
    except (OSError, json.JSONDecodeError):
        pass
    timed, seconds, previous_tokens = 0, 0.0, 0
    for r in training:
        if "tokens" in r and r.get("tokens_per_s"):
            timed += r["tokens"] - previous_tokens
            seconds += (r["tokens"] - previous_tokens) / r["tokens_per_s"]
        previous_tokens = r.get("tokens", previous_tokens)
    if seconds:
        row["train_time_s"], row["tokens_per_s"] = seconds, timed / seconds
    if validation:
        best = min(validation, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf)
        row.update(best_val_loss=best["val_loss"], best_val_step=best["step"],
                   best_val_perplexity=best.get("val_perplexity"), best_val_bits_per_byte=best.get("val_bits_per_byte"))
    return row


def run_series(runs: list[tuple[str, list[dict]]]) -> list[tuple[str, str, list[tuple[int, float]]]]:
    """Chart series (label, mark, points) of every run's training and validation loss: one run draws training
    as '·' and validation as 'o'; several runs draw run i as the i-th letter, lower case for training and
    upper case for validation."""
    series = []
    for i, (run_dir, records) in enumerate(runs):
        points = curves(records)
        train_mark, val_mark = ("·", "o") if len(runs) == 1 else (chr(97 + i % 26), chr(65 + i % 26))
        name = "" if len(runs) == 1 else f"{Path(run_dir).name} "
        series += [(f"{name}training loss", train_mark, points["loss"]),
                   (f"{name}validation loss", val_mark, points["val_loss"])]
    return series


def write_curves_png(path: str | Path, runs: list[tuple[str, list[dict]]], log_x: bool = False) -> Path:
    """The runs' loss curves as a PNG: training as a line, validation as points joined by a dashed line."""
    def draw(axes) -> None:
        for run_dir, records in runs:
            points = {k: [(x, y) for x, y in v if x > 0 or not log_x] for k, v in curves(records).items()}
            name = Path(run_dir).name
            line, = axes.plot(*zip(*points["loss"]), "-", lw=1, label=f"{name} training") if points["loss"] \
                else axes.plot([], [])
            if points["val_loss"]:
                axes.plot(*zip(*points["val_loss"]), "o--", color=line.get_color(), label=f"{name} validation")
        axes.set(xlabel="step", ylabel="loss", xscale="log" if log_x else "linear", title="loss curves")
        axes.grid(alpha=0.3)
        axes.legend()
    return write_png(path, draw)


FIGURES = ("steps", "tokens", "final_loss", "best_val_loss", "best_val_perplexity", "best_val_bits_per_byte",
           "train_time_s", "tokens_per_s")


def diff_runs(a: str | Path, b: str | Path) -> dict:
    """What differs between two runs: the flags of their run.toml files, and their final figures (all of them)."""
    flags_a, flags_b = read_run_config(a), read_run_config(b)
    flags = {k: [flags_a.get(k), flags_b.get(k)] for k in dict.fromkeys([*flags_a, *flags_b])
             if flags_a.get(k) != flags_b.get(k)}
    row_a, row_b = summarize(a, read_metrics(a)), summarize(b, read_metrics(b))
    return {"runs": [str(a), str(b)], "flags": flags, "figures": {k: [row_a[k], row_b[k]] for k in FIGURES}}
