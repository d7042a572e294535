"""Training tokens/s of llmcli vs Hugging Face transformers on the same GPT-2 config and weights.

One step = forward, loss, backward, AdamW step. The two are interleaved repetition by
repetition so that machine noise hits both alike. Usage:
    python benchmarks/train_throughput.py [--model gpt2-small] [--batch-size 4] [--seq-len 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from _common import header, mean_std, record, timed, training_steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps-per-rep", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import transformers

    _, runners = training_steps(args.model, args.batch_size, args.seq_len)
    for run in runners.values():  # warm-up
        run()
    tokens = args.batch_size * args.seq_len
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.reps):
        for name, run in runners.items():
            samples[name].append(tokens / timed(run, args.steps_per_rep))
        print({k: round(v[-1]) for k, v in samples.items()}, file=sys.stderr)

    (ours_mean, ours_std), (hf_mean, hf_std) = mean_std(samples["llmcli"]), mean_std(samples["transformers"])
    table = "\n".join([
        header(f"Training throughput: {args.model}, batch {args.batch_size}, seq {args.seq_len}, fp32, CPU"),
        f"forward + backward + AdamW step, {args.reps} interleaved repetitions of {args.steps_per_rep} steps "
        f"after a warm-up; `python benchmarks/train_throughput.py`\n",
        "| implementation | tokens/s | ± std |",
        "|---|---:|---:|",
        f"| llmcli | {ours_mean:,.0f} | {ours_std:,.0f} |",
        f"| transformers {transformers.__version__} | {hf_mean:,.0f} | {hf_std:,.0f} |",
        f"| ratio llmcli / transformers | {ours_mean / hf_mean:.2f}× | |",
    ])
    record(table, dry_run=args.no_record)


if __name__ == "__main__":
    main()
