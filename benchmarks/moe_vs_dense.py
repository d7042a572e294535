"""moe-micro against its dense twin gpt-micro: the same active parameters per token (two 256-wide experts of eight
in place of one 512-wide MLP), the same steps, batches, learning rate and seed, trained from scratch on the
built-in corpus and on ../shared/data/tinyshakespeare.txt. Records validation loss, training tokens/s and peak
resident memory of each run (its own process), the runs of a corpus interleaved seed by seed. Usage:
    python benchmarks/moe_vs_dense.py [--steps 400] [--seeds 2] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record_table  # noqa: E402

MODELS = ("gpt-micro", "moe-micro")
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def train(model: str, data: str | None, out: Path, steps: int, seed: int) -> dict:
    """One `llmcli train` in its own process: its summary figures and its peak resident memory."""
    command = [sys.executable, "-m", "llmcli", "train", model, "--out", str(out), "--steps", str(steps),
               "--seed", str(seed), "--precision", "fp32", "--force"] + (["--data", data] if data else [])
    log = out.with_suffix(".log")
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-2000:]}")
    from llmcli.runs import read_metrics, summarize

    row = summarize(out, read_metrics(out))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loads = [r["expert_load"] for r in records if "expert_load" in r]
    busiest = max(max(layer) for layer in loads[-1]) if loads else None
    return {"val_loss": row["best_val_loss"], "tokens_per_s": row["tokens_per_s"],
            "peak_rss": usage.ru_maxrss * 1024, "busiest_expert": busiest}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from llmcli.model_dir import resolve_config
    from llmcli.profiling.counts import count

    counts = {m: count(resolve_config(m)[0]) for m in MODELS}
    corpora = {"built-in (Python docs)": None}
    if SHAKESPEARE.is_file():
        corpora["tinyshakespeare"] = str(SHAKESPEARE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for corpus, data in corpora.items():
            results = {m: [] for m in MODELS}
            for seed in range(args.seeds):
                for model in MODELS:  # interleaved: machine noise hits both alike
                    results[model].append(train(model, data, Path(tmp) / f"{model}-{seed}", args.steps, seed))
                    print(corpus, model, seed, results[model][-1], file=sys.stderr, flush=True)
            for model in MODELS:
                runs = results[model]
                loss = [r["val_loss"] for r in runs]
                rate = [r["tokens_per_s"] for r in runs]
                busiest = runs[-1]["busiest_expert"]
                rows.append(
                    f"| {corpus} | {model} | {counts[model].params / 1e6:.2f}M | {counts[model].active_params / 1e6:.2f}M | "
                    f"{statistics.mean(loss):.4f} ({min(loss):.4f}-{max(loss):.4f}) | "
                    f"{statistics.median(rate):,.0f} ({min(rate):,.0f}-{max(rate):,.0f}) | "
                    f"{max(r['peak_rss'] for r in runs) / 2**20:,.0f} | "
                    f"{'-' if busiest is None else f'{busiest:.2f}'} |")
                print(rows[-1], file=sys.stderr, flush=True)
    record_table(
        "Mixture of experts against its dense twin: moe-micro vs gpt-micro, trained from scratch (CPU)",
        f"`llmcli train` for {args.steps} steps each (batch 16, seq 128, fp32, the default AdamW schedule, router "
        f"losses at their defaults: balance 0.01, z 0.001), seeds 0..{args.seeds - 1}, the two models interleaved "
        f"seed by seed in separate processes. moe-micro: 8 experts of width 256, top-2, in each of 4 blocks; "
        f"gpt-micro: one 512-wide MLP. Validation loss: the best of the run's evaluations on the held-out split, "
        f"mean (min-max) over seeds; tokens/s: training windows only, median (min-max); peak RSS: the run's "
        f"process, the larger over seeds. Busiest expert: the largest share of routed tokens any expert took in "
        f"any layer at the last logged step (even: 0.125).",
        ["corpus", "model", "params", "active", "val loss", "tokens/s", "peak RSS MB", "busiest expert"], rows,
        dry_run=args.no_record)


if __name__ == "__main__":
    main()
