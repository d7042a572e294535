"""What each of llmcli's speed measures buys on its own, side by side in one run (gpt2-small shapes, fp32, CPU):

1. decode, batch 1: matrices in their built order vs stored transposed (models.layout.store_matrices_transposed);
2. one AdamW step over gpt2-small's parameters: torch's multi-tensor (foreach) vs fused kernel;
3. one training step, batch 4 x 256: eager blocks vs torch.compile'd blocks (compile in the warm-up, not timed);
4. peak memory of the loss and its backward on gpt2-small's logits (batch 4 x 256 x 50,257): torch's
   F.cross_entropy on fp32 logits vs llmcli's chunked cross-entropy;
5. decode, batch 1, matrices transposed: eager blocks vs torch.compile'd blocks (compile in the warm-up);
6. where decode time goes: the share of profiled op time in the matrix products, and the weight bytes they
   stream per second (what bounds batch-1 decode on a CPU, on either side of a comparison).

Medians of --reps interleaved repetitions after a warm-up, with min..max. Appends to RESULTS.md.
Usage: python benchmarks/speed_parts.py [--reps 5] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, record  # noqa: E402
from speed import interleaved, spread  # noqa: E402


def ratio(times: dict, slow: str, fast: str) -> str:
    ratios = [a / b for a, b in zip(times[slow], times[fast])]
    return f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}..{max(ratios):.2f})"


def decode_profile(model, prompt, new_tokens: int, generate_ids) -> tuple[float, float]:
    """(share of profiled CPU op time in matrix products, weight bytes per second those products read)."""
    from torch.profiler import profile
    with torch.inference_mode(), profile() as prof:
        generate_ids(model, prompt, new_tokens, temperature=0.0)
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    matmul = ops.get("aten::addmm", 0) + ops.get("aten::mm", 0)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.dim() == 2
                       and not n.endswith(("pos_emb.weight",)))
    return matmul / sum(ops.values()), weight_bytes * new_tokens / (matmul / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from llmcli.generation import generate_ids
    from llmcli.model_dir import resolve_config
    from llmcli.models import build_model
    from llmcli.models.layout import store_matrices_transposed
    from llmcli.profiling.peak import PeakMemory
    from llmcli.runtime import compile_blocks, family_loss, token_cross_entropy
    from llmcli.training.optim import make_optimizer

    config, _ = resolve_config("gpt2-small")
    prompt = torch.randint(5, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    built, transposed = build_model(config, seed=0).eval(), store_matrices_transposed(build_model(config, seed=0).eval())
    decode = interleaved({name: torch.inference_mode()(lambda m=m: generate_ids(m, prompt, 64, temperature=0.0))
                          for name, m in (("built", built), ("transposed", transposed))}, args.reps)
    compiled = store_matrices_transposed(build_model(config, seed=0).eval())
    compile_blocks(compiled, torch.device("cpu"), print)
    compiled_decode = interleaved({name: torch.inference_mode()(lambda m=m: generate_ids(m, prompt, 64,
                                                                                         temperature=0.0))
                                   for name, m in (("eager", transposed), ("compiled", compiled))}, args.reps)
    matmul_share, weight_rate = decode_profile(transposed, prompt, 64, generate_ids)
    del built, transposed, compiled

    model = build_model(config, seed=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers = {"foreach": make_optimizer(model, 1e-4, 0.1, fused=False), "fused": make_optimizer(model, 1e-4, 0.1)}
    adamw = interleaved({name: opt.step for name, opt in optimizers.items()}, args.reps)
    del optimizers

    ids = torch.randint(0, config.vocab_size, (4, 257), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def step_of(compiled: bool):
        net = build_model(config, seed=0).train()
        if compiled:
            compile_blocks(net, torch.device("cpu"), print)
        opt = make_optimizer(net, 1e-4, 0.1)

        def step():
            opt.zero_grad(set_to_none=True)
            family_loss(net, batch).backward()
            opt.step()
        return step

    train = interleaved({"eager": step_of(False), "compiled": step_of(True)}, max(3, args.reps // 2))

    logits = torch.randn(4 * 256, config.vocab_size, requires_grad=True)
    labels = torch.randint(0, config.vocab_size, (4 * 256,))
    peaks = {}
    for name, loss in (("F.cross_entropy", lambda: F.cross_entropy(logits, labels)),
                       ("chunked", lambda: token_cross_entropy(logits[None], labels[None]))):
        with PeakMemory(torch.device("cpu")) as peak:
            (grad,) = torch.autograd.grad(loss(), logits)
            del grad
        peaks[name] = peak.peak

    lines = [header("Issue 16: what each speed measure buys (gpt2-small shapes, fp32, CPU)"),
             "Medians of interleaved repetitions after a warm-up (min..max); ratios per repetition.\n",
             "| measure | before | after | gain |", "|---|---:|---:|---:|",
             f"| decode tokens/s, batch 1, 64 tokens: built order -> matrices stored transposed | "
             f"{spread([64 / t for t in decode['built']])} | {spread([64 / t for t in decode['transposed']])} | "
             f"{ratio(decode, 'built', 'transposed')} |",
             f"| AdamW step over 124M parameters, ms: foreach -> fused | {spread([1e3 * t for t in adamw['foreach']])} |"
             f" {spread([1e3 * t for t in adamw['fused']])} | {ratio(adamw, 'foreach', 'fused')} |",
             f"| training step (batch 4 x 256), s: eager -> torch.compile'd blocks | {spread(train['eager'])} | "
             f"{spread(train['compiled'])} | {ratio(train, 'eager', 'compiled')} |",
             f"| loss + backward peak memory above the logits' 206 MB, MB: F.cross_entropy -> chunked | "
             f"{peaks['F.cross_entropy'] / 1e6:,.0f} | {peaks['chunked'] / 1e6:,.0f} | "
             f"{peaks['F.cross_entropy'] / peaks['chunked']:.2f}x less |",
             f"| decode tokens/s, batch 1, 64 tokens, matrices transposed: eager -> torch.compile'd blocks | "
             f"{spread([64 / t for t in compiled_decode['eager']])} | "
             f"{spread([64 / t for t in compiled_decode['compiled']])} | {ratio(compiled_decode, 'eager', 'compiled')} |",
             f"\nBatch-1 decode (eager, transposed): {100 * matmul_share:.0f}% of the profiled op time is in the matrix "
             f"products (aten::addmm, aten::mm), which stream the weights at {weight_rate / 1e9:.1f} GB/s.",
             f"\n`python benchmarks/speed_parts.py --reps {args.reps}`, {torch.get_num_threads()} threads"]
    record("\n".join(lines), args.no_record)


if __name__ == "__main__":
    main()
