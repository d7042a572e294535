"""What the compiled decode step's settings buy, in one process: the step as `llmcli generate --compile` runs it
(exported and compiled once, on the CPU ahead of time by AOTInductor with the model's weights as its constants, called
without torch.compile's guards; q/k/v and gate/up one kernel call each) against the same graph compiled in the
process by inductor with its C++ wrapper (weights frozen, handed in as inputs at each step: the shipped step before),
called through torch.compile (its guards and inputs gathered at every step), and with one call per linear layer.
Each variant is its own model and its own compiled graph, timed in turn repetition by repetition (greedy, the same
tokens checked).
Usage:
    python benchmarks/decode_step.py [--models smollm2-135m] [--weights int4,bf16] [--reps 12] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).parent))
from _common import record_table  # noqa: E402
from llama_cpp import quantized_dir  # noqa: E402

VARIANTS = ("as shipped", "compiled in-process", "through torch.compile's guards", "one call per layer")
# inductor's settings for the step compiled in the process (standalone_compile; the shipped step before AOTInductor)
IN_PROCESS = {"compiled in-process": {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}}


def model_dir(name: str, weights: str, root: Path) -> Path:
    """The zoo model with random weights: quantized (int8, int4 g32 with the head) or as built."""
    from llmcli.model_dir import resolve_config, save_model
    from llmcli.models import build_model

    if weights in ("int8", "int4"):
        return quantized_dir(name, weights, root)
    config, _ = resolve_config(name)
    directory = root / f"{name}-{weights}"
    directory.mkdir()
    save_model(build_model(config, seed=0).eval(), directory)
    return directory


def variant(directory: Path, weights: str, label: str):
    """A model readied for decoding whose decode step is compiled as `label` says."""
    import torch

    from llmcli import runtime
    from llmcli.model_dir import load_model
    from llmcli.models.gemv import prepare_for_decode
    from llmcli.runtime import compile_decode

    model = load_model(directory).eval()
    if weights == "bf16":
        model.to(torch.bfloat16)
    prepare_for_decode(model)
    if label == "one call per layer":
        for module in model.modules():
            vars(module).pop("fused_qkv", None)
            vars(module).pop("fused_gate_up", None)
    compile_decode(model, torch.device("cpu"), print)
    if label in IN_PROCESS:  # compiled at the first step: in this process, with these wrapper settings
        def in_process(program, warn):
            inputs = list(program.example_inputs[0])
            options = {**runtime.DECODE_COMPILE_OPTIONS, **IN_PROCESS[label]}
            return torch._inductor.standalone_compile(program.module(), inputs, dynamic_shapes="from_graph",
                                                      options={"config_patches": options})

        step = model.decode_forward
        compile_step = step._compile

        def compile_in_process(*args):
            with mock.patch.object(runtime, "compiled_ahead_of_time", in_process):
                return compile_step(*args)

        step._compile = compile_in_process
    if label == "through torch.compile's guards":
        model.decode_forward = model.decode_forward.guarded
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--weights", default="int4,bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import torch

    from llmcli.generation import generate_ids
    from llmcli.models.gemv import kernel_name

    torch.set_num_threads(args.threads)
    prompt = torch.randint(5, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in args.models.split(","):
        for weights in args.weights.split(","):
            torch._dynamo.reset()  # the guarded variant's graphs of the case before would be looked through first
            with tempfile.TemporaryDirectory() as tmp:
                directory = model_dir(name, weights, Path(tmp))
                models = {label: variant(directory, weights, label) for label in VARIANTS}
                tokens = {label: generate_ids(m, prompt, 8, temperature=0) for label, m in models.items()}  # compiles
                first = tokens[VARIANTS[0]]
                assert all(torch.equal(t, first) for t in tokens.values()), "the variants disagree on tokens"
                times = {label: [] for label in VARIANTS}
                for _ in range(args.reps):
                    for label, model in models.items():
                        start = time.perf_counter()
                        generate_ids(model, prompt, args.new_tokens, temperature=0)
                        times[label].append((time.perf_counter() - start) / args.new_tokens * 1e3)
            shipped = times[VARIANTS[0]]
            for label in VARIANTS:
                ratios = [t / s for t, s in zip(times[label], shipped)]
                rows.append(f"| {name} | {weights} | {label} | {statistics.median(times[label]):.2f} "
                            f"({min(times[label]):.2f}-{max(times[label]):.2f}) | {statistics.median(ratios):.2f}x "
                            f"({min(ratios):.2f}-{max(ratios):.2f}) |")
                print(rows[-1], file=sys.stderr, flush=True)
    record_table(
        "The compiled decode step: exported, compiled ahead of time, called without guards, against other ways",
        f"Batch-1 greedy decode from an 8-token prompt, {args.new_tokens} new tokens, KV cache, {args.threads} "
        f"threads, products by {kernel_name()} (int4: group 32, the LM head quantized too); every variant "
        f"compiled before timing, {args.reps} repetitions interleaved. ms a token: "
        f"median (min-max); against shipped: the variant's time over the shipped step's in the same repetition, "
        f"median (min-max).",
        ["model", "weights", "decode step", "ms a token", "against shipped"], rows, dry_run=args.no_record)


if __name__ == "__main__":
    main()
