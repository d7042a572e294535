"""memory-estimate vs the measured CPU peak for inference on the decoder families of 2025-26, at a short and a long
context: prefill plus 16 decoded tokens with the KV cache, fp32, each real step in a child process
(llmcli/profiling/memory_measure.py). The zoo entries are built with random weights: memory does not depend on
their values. Usage:
    python benchmarks/memory_families.py [--models llama-3.2-1b,qwen3-0.6b] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import record_table  # noqa: E402

MODELS = ("llama-3.2-1b", "qwen3-0.6b", "olmo-2-1b", "gemma-3-1b", "gemma-2-2b", "granite-3.3-2b", "smollm3-3b",
          "phi-3-mini")
CONTEXTS = ((1, 128), (8, 512))  # (batch, positions): short and long
NEW_TOKENS = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmcli.model_dir import resolve_config
    from llmcli.profiling.memory import estimate_memory
    from llmcli.profiling.memory_measure import measure_memory

    models = args.models.split(",")
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True)) as progress:
        task = progress.add_task("memory-estimate", total=len(models) * len(CONTEXTS))
        for name in models:
            config, _ = resolve_config(name)
            for batch, positions in CONTEXTS:
                progress.update(task, description=f"{name} {batch} x {positions}")
                estimate = estimate_memory(config, "infer", batch, positions, "fp32", device="cpu",
                                           new_tokens=NEW_TOKENS)
                start = time.perf_counter()
                cells = [name, config.hf_architecture or config.family, f"{batch} x {positions}",
                         f"{estimate.total_bytes / 1e6:,.0f} MB"]
                try:
                    measured = measure_memory(config, estimate, "cpu")["measured_bytes"]
                    cells += [f"{measured / 1e6:,.0f} MB", f"{(estimate.total_bytes - measured) / measured:+.1%}"]
                except RuntimeError as e:  # the measuring child died, e.g. killed for memory
                    cells += [f"not measured ({str(e).split(': ')[0].removeprefix('the ')})", "-"]
                rows.append("| " + " | ".join([*cells, f"{time.perf_counter() - start:.0f} s"]) + " |")
                print(rows[-1], file=sys.stderr, flush=True)
                progress.advance(task)
    record_table("memory-estimate vs measured: the decoder families (CPU, fp32 inference)",
                 f"Prefill of positions - {NEW_TOKENS} tokens, then {NEW_TOKENS} decoded with the KV cache, "
                 f"`--device cpu`, random weights. Measured: peak anonymous RSS of a child process above its baseline "
                 f"after a warm-up. Goal: within ±20%.",
                 ["model", "architecture", "batch x positions", "estimate", "measured", "error", "run time"], rows,
                 dry_run=args.no_record)

if __name__ == "__main__":
    main()
