"""Greedy decode speed at batch 1: llmcli with and without the KV cache, and transformers' generate.

Both libraries run the same random gpt2-small weights (built by llmcli, converted with
convert_to_hf). Repetitions are interleaved (ours cached, transformers, ours uncached, again ...)
after a warm-up, so that load from other jobs on the machine hits all three alike; the
llmcli/transformers ratio is also given per repetition, from runs seconds apart.
Achieved bandwidth = weight bytes read per generated token x tokens/s, beside the machine's
copy bandwidth. On a CPU shared with other jobs, --threads 1 avoids waits at every parallel
region for a thread that the scheduler has put off the CPU (the small-op latency line shows them).
Usage:
    python benchmarks/generate_decode.py [--model gpt2-small] [--prompt-tokens 16] [--new-tokens 256] [--reps 3]
                                         [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, mean_std, record  # noqa: E402

COPY_BYTES = 512 * 2**20  # large enough that no cache level holds it


def copy_bandwidth(repeats: int = 5) -> tuple[float, float]:
    """Bytes read + written per second by dst.copy_(src) of 512 MiB: mean and std over repeats."""
    src = torch.ones(COPY_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        rates.append(2 * COPY_BYTES / (time.perf_counter() - start))
    return mean_std(rates)


def small_op_latency(repeats: int = 200) -> float:
    """Seconds per torch.tanh of 3,072 floats (a GPT-2 MLP activation at batch 1): microseconds on an idle
    CPU, milliseconds when a thread of the pool waits for a core held by another job."""
    x = torch.randn(3072)
    torch.tanh(x)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.tanh(x)
    return (time.perf_counter() - start) / repeats


def weight_bytes_per_token(model) -> int:
    """Every parameter is read once per decoding step, except the position table (one row of it).

    The tied token embedding counts in full: it is the LM head's matrix.
    """
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if not name.endswith("pos_emb.weight"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-record", action="store_true", help="print the table, do not append it to RESULTS.md")
    args = parser.parse_args()

    import transformers

    from llmcli import load_model
    from llmcli.generation import generate_ids
    from llmcli.interop.hf import convert_to_hf
    from llmcli.model_dir import build_model_dir, resolve_config

    transformers.logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    latency_before = small_op_latency()
    config, _ = resolve_config(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        build_model_dir(config, Path(tmp) / "ours", seed=0)
        convert_to_hf(Path(tmp) / "ours", Path(tmp) / "hf")
        ours = load_model(Path(tmp) / "ours")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", attn_implementation="sdpa")
        theirs.eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    # Plain greedy decoding of exactly n tokens: no end-of-sequence stop, no penalties.
    greedy = transformers.GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=0,
                                           repetition_penalty=1.0, eos_token_id=None, pad_token_id=0, use_cache=True)

    def hf_generate(new_tokens: int = n) -> torch.Tensor:
        greedy.max_new_tokens = new_tokens
        out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy)
        return out[:, prompt.shape[1]:]

    runners = {
        "llmcli, KV cache": lambda k=n: generate_ids(ours, prompt, k, temperature=0),
        "transformers generate (KV cache, sdpa)": hf_generate,
        "llmcli, no cache": lambda k=n: generate_ids(ours, prompt, k, temperature=0, use_cache=False),
    }
    for run in runners.values():  # warm-up: allocator, thread pool, lazy initialisation
        run(16)
    same_tokens = torch.equal(runners["llmcli, KV cache"](), hf_generate())
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(args.reps):
        for name, run in runners.items():
            start = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - start
            assert out.shape[1] == n, f"{name} generated {out.shape[1]} tokens, not {n}"
            samples[name].append(n / seconds)
            print(f"rep {rep + 1}/{args.reps}  {name:40s} {n / seconds:8.2f} tokens/s", file=sys.stderr)
    copy_mean, copy_std = copy_bandwidth()
    latency_after = small_op_latency()

    per_token = weight_bytes_per_token(ours)
    stats = {name: mean_std(rates) for name, rates in samples.items()}
    cached, peer, uncached = (stats[name][0] for name in runners)
    ours_name, peer_name, _ = runners
    paired = [a / b for a, b in zip(samples[ours_name], samples[peer_name])]  # run back to back
    lines = [
        "| implementation | tokens/s (mean ± std) | ms/token | weight bandwidth GB/s | samples tokens/s |",
        "|---|---|---|---|---|",
    ]
    for name, (mean, std) in stats.items():
        rates = ", ".join(f"{r:.2f}" for r in samples[name])
        bandwidth = per_token * mean / 1e9
        lines.append(f"| {name} | {mean:.2f} ± {std:.2f} | {1000 / mean:.1f} | {bandwidth:.2f} | {rates} |")
    title = f"Decode: {config.name}, batch 1, {n} new tokens (CPU, fp32)"
    section = "\n".join([
        header(title),
        f"Prompt {args.prompt_tokens} random tokens, greedy, {args.reps} interleaved repetitions after a warm-up; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, transformers {transformers.__version__}; "
        f"load average {load_before:.2f} before; small-op latency (tanh of 3,072 floats) "
        f"{latency_before * 1e6:.0f} µs before, {latency_after * 1e6:.0f} µs after.",
        "",
        *lines,
        "",
        f"- KV cache vs no cache: **{cached / uncached:.1f}x** (goal: at least 4x)",
        f"- llmcli vs transformers: **{cached / peer:.2f}x** (goal: at least 1x); per repetition: "
        f"{', '.join(f'{r:.2f}x' for r in paired)}",
        f"- weights read per token: {per_token / 1e6:.1f} MB (fp32, every parameter but the position table; "
        f"the KV cache adds at most "
        f"{2 * config.n_layers * config.d_model * (args.prompt_tokens + n) * 4 / 1e6:.1f} MB at the last step)",
        f"- machine copy bandwidth (512 MiB `dst.copy_(src)`, read + written): {copy_mean / 1e9:.2f} ± "
        f"{copy_std / 1e9:.2f} GB/s; llmcli with the cache reaches "
        f"{per_token * cached / copy_mean:.0%} of it",
        f"- llmcli and transformers chose the same {n} greedy tokens: {'yes' if same_tokens else 'no'}",
    ])
    record(section, dry_run=args.no_record)


if __name__ == "__main__":
    main()
