"""Where a training step's time goes: torch.profiler over llmcli and transformers on the same GPT-2 weights.

One step = forward, loss, backward, AdamW step (the same make_optimizer for both). Operators are
grouped (matmuls, attention, elementwise, norms, loss, optimizer, other) by self CPU time, so
the two implementations can be compared category by category, and the matmul share gives
what a faster implementation could still win. Usage:
    python benchmarks/profile_train_step.py [--model gpt2-small] [--batch-size 4] [--seq-len 256] [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, record, training_steps  # noqa: E402

CATEGORIES = [  # first match wins; names are aten operator names
    ("matmul (linear layers, LM head)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention (SDPA kernels)", ("scaled_dot_product", "_flash_attention", "_efficient_attention",
                                  "aten::_softmax", "aten::_softmax_backward")),
    ("optimizer (AdamW)", ("_foreach", "aten::_fused_adamw", "aten::lerp", "aten::addcdiv", "aten::addcmul")),
    ("loss (log-softmax, NLL)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("norms (LayerNorm)", ("layer_norm",)),
    ("activation (GELU)", ("gelu", "aten::tanh", "aten::pow")),
    ("copies, views, adds", ("aten::copy_", "aten::add", "aten::clone", "aten::contiguous", "aten::cat",
                             "aten::fill_", "aten::zero_", "aten::mul", "aten::sum", "aten::embedding", "aten::index")),
]


def categorise(name: str) -> str:
    for category, keys in CATEGORIES:
        if any(key in name for key in keys):
            return category
    return "other"


def profile(step, steps: int) -> tuple[dict[str, float], float]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        totals[categorise(event.key)] = totals.get(categorise(event.key), 0.0) + event.self_cpu_time_total
    return {k: v / steps / 1e3 for k, v in totals.items()}, sum(totals.values()) / steps / 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import transformers

    from llmcli.profiling.bench import machine_peaks
    from llmcli.profiling.counts import count, flops_per_token

    config, steps = training_steps(args.model, args.batch_size, args.seq_len)
    results = {name: profile(step, args.steps) for name, step in steps.items()}
    peak = machine_peaks(torch.device("cpu"))["matmul_flops"]
    tokens = args.batch_size * args.seq_len
    counts = count(config)
    model_flops = tokens * flops_per_token(config, counts, "train", args.seq_len)  # PaLM: 6N + 12·L·H·Q·T
    # the matmul category: every linear layer and the tied LM head, forward (2) + backward (4) FLOPs per weight
    linear_flops = 6 * tokens * (counts.non_embedding_params + config.vocab_size * config.d_model)
    categories = [c for c, _ in CATEGORIES] + ["other"]
    lines = [header(f"Training step profile: {args.model}, batch {args.batch_size}, seq {args.seq_len}, fp32, CPU"),
             f"torch.profiler self CPU time per step (mean of {args.steps} steps after a warm-up), forward + "
             f"backward + AdamW; transformers {transformers.__version__}. Measured matmul peak "
             f"{peak / 1e9:.0f} GFLOP/s (1024² fp32).\n",
             "| category | llmcli ms | share | transformers ms | share |", "|---|---:|---:|---:|---:|"]
    for category in categories:
        cells = []
        for name in ("llmcli", "transformers"):
            parts, total = results[name]
            cells += [f"{parts.get(category, 0.0):.0f}", f"{parts.get(category, 0.0) / total:.0%}"]
        lines.append(f"| {category} | {' | '.join(cells)} |")
    lines.append(f"| **total** | {results['llmcli'][1]:.0f} | | {results['transformers'][1]:.0f} | |")
    for name in ("llmcli", "transformers"):
        parts, total = results[name]
        matmul = parts.get(CATEGORIES[0][0], 0.0)
        lines.append(f"\n- {name}: model FLOPs {model_flops / (total / 1e3) / 1e9:.0f} GFLOP/s over the whole step "
                     f"({model_flops / (total / 1e3) / peak:.0%} of the matmul peak); the linear layers' "
                     f"{linear_flops / 1e9:.0f} GFLOP ran at {linear_flops / (matmul / 1e3) / 1e9:.0f} GFLOP/s "
                     f"({linear_flops / (matmul / 1e3) / peak:.0%} of the peak)")
    lines.append(f"\n`python benchmarks/profile_train_step.py --model {args.model} --batch-size {args.batch_size} "
                 f"--seq-len {args.seq_len}`")
    record("\n".join(lines), args.no_record)


if __name__ == "__main__":
    main()
