"""`llmcli bench`: a llama-bench-style matrix of train / prefill / decode throughput.

Every case runs warm-up steps, then timed repetitions, and reports the median with the spread; results
keep every sample, and each row its provenance (versions, commit, device, CPU, threads, time). With a peer
(Hugging Face transformers) the same weights run through both, interleaved repetition by repetition, so
that machine noise hits both alike. Decode rows also time the first token (prefill plus one step).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llmcli.charts import write_png
from llmcli.errors import UserError
from llmcli.generation import generate_ids
from llmcli.interop.hf import convert_to_hf
from llmcli.model_dir import build_model_dir, load_model, resolve_config
from llmcli.models.blocks import MixtureOfExperts
from llmcli.models.gemv import prepare_for_decode
from llmcli.models.layout import store_matrices_transposed
from llmcli.profiling.counts import count, flops_per_token, kv_cache_bytes
from llmcli.profiling.llama_cpp import LlamaCppRunner
from llmcli.profiling.machine import machine_peaks, sync
from llmcli.profiling.peak import PeakMemory
from llmcli.profiling.provenance import provenance
from llmcli.runtime import (DTYPES, autocast, compile_blocks, compile_decode, family_loss, resolve_device,
                             torch_dtype)

MODES = ("train", "prefill", "decode")
PEERS = ("transformers", "llama.cpp")
DECODE_PROMPT = 8  # decode cases start from a prompt this long, then generate seq_len tokens
DEFAULT_SEQ_LENS = (128, 512)
# Dense bf16 peak of known accelerators, for MFU (vendor datasheets).
GPU_PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@dataclass
class BenchResult:
    implementation: str
    mode: str
    batch_size: int
    seq_len: int
    dtype: str
    device: str
    tokens_per_s: float
    tokens_per_s_std: float
    ms_per_step: float
    peak_memory_bytes: int
    samples_s: list[float]  # seconds per repetition
    tokens_per_rep: int
    flops_per_token: float
    flops_utilization: float | None  # model FLOP/s over the measured matmul FLOP/s in the same dtype
    mfu: float | None = None  # over the accelerator's datasheet peak (CUDA only)
    bandwidth_bytes_per_s: float | None = None  # decode: bytes read per step x steps/s
    bandwidth_utilization: float | None = None  # decode: over the machine's measured read bandwidth
    threads: int = 1
    ttft_s: float | None = None  # decode: median seconds to the first new token (prefill, then its sampling)
    ttft_samples_s: list[float] | None = None
    peer: dict | None = field(default=None)
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- the two implementations


def _stored_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class Runner:
    """One implementation's train step, prefill and decode on random tokens."""

    name = "llmcli"
    external = False  # True for another program, which times itself (profiling.llama_cpp)

    def __init__(self, model, device: torch.device, dtype: str) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.family = model.config.family if hasattr(model.config, "family") else None

    def prepare(self, mode: str):
        """Put the model in the right precision and state for `mode`; returns a context for each step."""
        if mode == "train":
            if self.name == "llmcli":  # the order it was built in
                store_matrices_transposed(self.model, transposed=False)
            self.model.to(torch.float32).train()
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=True)  # the same for both
            return lambda: autocast(self.device, self.dtype)
        self.model.to(torch_dtype(self.dtype)).eval()  # first: a cast after prepare_for_decode would undo its buffer
        if self.name == "llmcli":  # as `llmcli generate` runs
            prepare_for_decode(self.model) if self.device.type == "cpu" else store_matrices_transposed(self.model)
        self.optimizer = None
        return torch.inference_mode

    def weight_bytes(self) -> int:
        return _stored_bytes(self.model)

    def decode_read_bytes(self) -> int:
        """The weight bytes one decode step of one sequence reads, as stored (quantized, bf16, ...): all but the
        embedding tables, of which it reads one row (a token embedding that is also the output projection is read
        whole), and but the experts a token skips (it reads k of each mixture's experts)."""
        tied = getattr(self.model.config, "tie_embeddings", False)
        tables = [m.weight for name, m in self.model.named_modules() if isinstance(m, torch.nn.Embedding)
                  and not (tied and name == "tok_emb")]
        idle = sum((len(m.experts) - m.top_k) * _stored_bytes(m.experts[0]) for m in self.model.modules()
                   if isinstance(m, MixtureOfExperts))
        return self.weight_bytes() - sum(t.numel() * t.element_size() for t in tables) - idle

    def finish(self) -> None:
        self.optimizer = None
        self.model.zero_grad(set_to_none=True)

    def step(self, mode: str, ids: torch.Tensor, new_tokens: int) -> float | None:
        """One timed unit of `mode`; returns its own seconds where it times itself (decode: its steps alone)."""
        if mode == "train":
            self.optimizer.zero_grad(set_to_none=True)
            self.loss(ids).backward()
            self.optimizer.step()
        elif mode == "prefill":
            self.prefill(ids)
        else:
            return self.decode(ids, new_tokens)
        return None

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": ids, "labels": ids}
        if self.family == "t5":
            batch["decoder_input_ids"] = ids
        return family_loss(self.model, batch)

    def prefill(self, ids: torch.Tensor) -> None:
        """The prompt's pass of generation: logits at the last position only (as llama.cpp and generate compute)."""
        if self.family == "t5":
            self.model(ids, decoder_input_ids=ids[:, :1])
        else:
            self.model(ids, last_only=True)

    def decode(self, ids: torch.Tensor, steps: int) -> float | None:
        """The prompt's token, then `steps` decode steps (a token each); returns the steps' seconds (llama-bench's
        decode rows time steps alone too; the prompt is the time to first token)."""
        stamps = []

        def stamp(token: torch.Tensor) -> None:
            sync(self.device)  # CUDA: the token is there, not only queued
            stamps.append(time.perf_counter())

        generate_ids(self.model, ids, steps + 1, temperature=0, on_token=stamp)
        return time.perf_counter() - stamps[0] if steps else None


class HFRunner(Runner):
    """The same steps through Hugging Face transformers."""

    name = "transformers"

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, labels=ids).loss  # HF shifts (GPT) or builds decoder inputs (T5)

    def prefill(self, ids: torch.Tensor) -> None:
        if self.family == "t5":
            self.model(input_ids=ids, decoder_input_ids=ids[:, :1], use_cache=False)
        else:
            self.model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def decode(self, ids: torch.Tensor, steps: int) -> float | None:
        stamps = _Stamps()
        self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=steps + 1, min_new_tokens=steps + 1, use_cache=True, pad_token_id=0,
                            streamer=stamps)
        return time.perf_counter() - stamps.times[1] if steps else None


class _Stamps:
    """A transformers streamer that notes when each put arrives: the prompt, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def load_peer(model_dir: Path, family: str, device: torch.device, eager: bool = False):
    """transformers' model of the same weights, with SDPA attention; eager where the model caps its attention
    scores (Gemma 2), as llmcli runs it too."""
    try:
        import transformers
    except ImportError:
        raise UserError("--compare transformers needs the transformers package; pip install 'llmcli[bench]'") from None
    classes = {"gpt": transformers.AutoModelForCausalLM, "bert": transformers.AutoModelForMaskedLM,
               "t5": transformers.AutoModelForSeq2SeqLM}
    model = classes[family].from_pretrained(model_dir, attn_implementation="eager" if eager else "sdpa").to(device)
    model.config.family = family
    return model


# ---------------------------------------------------------------- the matrix


def run_bench(model_ref: str, modes: list[str], batch_sizes: list[int], seq_lens: list[int] | None,
              dtype: str = "fp32",
              device: str = "auto", reps: int = 5, warmup: int = 2, compare: str | None = None,
              on_result: Callable[[BenchResult], None] | None = None, threads: list[int] | None = None,
              compile: bool = False, log: Callable[[str], None] = print) -> tuple[list[BenchResult], dict]:
    """The matrix of modes x batch sizes x lengths (x thread counts); returns the rows and the machine's peaks.
    seq_lens None: the default lengths that fit the model's context."""
    config, directory = resolve_config(model_ref)
    target = resolve_device(device)
    if seq_lens is None:
        seq_lens = default_seq_lens(config, modes, log)
    _check_matrix(config, modes, batch_sizes, seq_lens, dtype, target, reps, warmup, compare)
    if threads is not None and (not threads or any(t <= 0 for t in threads)):
        raise UserError(f"--threads {','.join(map(str, threads))}: give positive thread counts, e.g. 1,2")
    counts = count(config)
    peaks = machine_peaks(target, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        if directory is None:
            directory = Path(tmp) / "model"
            build_model_dir(config, directory, seed=0)
        runners = [Runner(load_model(directory).to(target), target, dtype)]
        compiled = compile and (compile_blocks(runners[0].model, target, log)  # on each case's first warm-up step
                                and compile_decode(runners[0].model, target, log))
        if compare == "transformers":
            convert_to_hf(directory, Path(tmp) / "hf")
            runners.append(HFRunner(load_peer(Path(tmp) / "hf", config.family, target,
                                                 eager=config.attention_softcap is not None), target, dtype))
        elif compare == "llama.cpp":
            runners.append(LlamaCppRunner(directory, dtype, Path(tmp)))
        results, default_threads = [], torch.get_num_threads()
        try:
            _run_matrix(runners, modes, batch_sizes, seq_lens, dtype, target, reps, warmup, config, counts, peaks,
                        threads or [default_threads], results, on_result)
        finally:
            torch.set_num_threads(default_threads)
    for result in results:
        result.provenance["compiled"] = bool(compiled)  # llmcli's blocks and decode step through torch.compile
    return results, peaks


def _run_matrix(runners, modes, batch_sizes, seq_lens, dtype, target, reps, warmup, config, counts, peaks,
                thread_counts, results, on_result) -> None:
    for thread_count in thread_counts:
        torch.set_num_threads(thread_count)
        for mode in modes:
            if mode == "decode" and config.family == "bert":
                continue  # an encoder does not generate
            for batch_size in batch_sizes:
                for seq_len in seq_lens:
                    found = _run_case(runners, mode, batch_size, seq_len, dtype, target, reps, warmup, config,
                                      counts, peaks)
                    results.append(found)
                    if on_result:
                        on_result(found)


def default_seq_lens(config, modes: list[str], log: Callable[[str], None]) -> list[int]:
    """DEFAULT_SEQ_LENS without the lengths above the model's context (said once), or the longest that fits."""
    room = config.max_seq_len - (DECODE_PROMPT if "decode" in modes else 0)
    fits = [s for s in DEFAULT_SEQ_LENS if s <= room]
    if len(fits) < len(DEFAULT_SEQ_LENS):
        log(f"--seq-len {','.join(str(s) for s in DEFAULT_SEQ_LENS if s > room)} left out: above {config.name}'s "
            f"max_seq_len ({config.max_seq_len}" + (f", less the {DECODE_PROMPT}-token decode prompt)" if
                                                    "decode" in modes else ")"))
    return fits or [room]


def _check_matrix(config, modes, batch_sizes, seq_lens, dtype, device, reps, warmup, compare) -> None:
    for mode in modes:
        if mode not in MODES:
            raise UserError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)} (quantized models bench as they load)")
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 is not supported on CPU; use fp32 or bf16")
    if any(b <= 0 for b in batch_sizes) or any(s <= 0 for s in seq_lens) or reps <= 0 or warmup <= 0:
        raise UserError("--batch-size, --seq-len, --reps and --warmup must be positive")
    for seq_len in seq_lens:
        longest = seq_len + (DECODE_PROMPT if "decode" in modes else 0)
        if longest > config.max_seq_len:
            raise UserError(f"--seq-len {seq_len} needs {longest} positions (decode adds a {DECODE_PROMPT}-token "
                            f"prompt), above {config.name}'s max_seq_len ({config.max_seq_len})")
    if compare not in (None, *PEERS):
        raise UserError(f"--compare {compare!r}: the peers are {' and '.join(PEERS)}")


def _run_case(runners, mode, batch_size, seq_len, dtype, device, reps, warmup, config, counts, peaks) -> BenchResult:
    generator = torch.Generator().manual_seed(0)
    length = DECODE_PROMPT if mode == "decode" else seq_len
    ids = torch.randint(5, config.vocab_size, (batch_size, length), generator=generator).to(device)
    tokens = batch_size * seq_len
    runners = [r for r in runners if not r.external or r.supports(mode, batch_size)]
    samples: dict[str, list[float]] = {r.name: [] for r in runners}
    memory: dict[str, int] = {}
    contexts = {}
    for runner in runners:  # memory: the weights, plus the peak above them over the warm-up steps
        contexts[runner.name] = runner.prepare(mode)
        if runner.external:  # another program: it warms up itself; its file is its weights
            memory[runner.name] = runner.weight_bytes()
            continue
        with PeakMemory(device) as peak:
            for _ in range(warmup):
                with contexts[runner.name]():
                    runner.step(mode, ids, seq_len)
                    if mode == "decode":  # the first-token call too: its shorter cache compiles apart
                        runner.step(mode, ids, 0)
            sync(device)
        memory[runner.name] = runner.weight_bytes() + peak.peak
    read_bytes = runners[0].decode_read_bytes()
    for _ in range(reps):  # interleaved: each repetition runs every implementation once
        for runner in runners:
            with contexts[runner.name]():
                sync(device)
                start = time.perf_counter()
                measured = runner.step(mode, ids, seq_len)  # an external program's own timing, else None
                sync(device)
            samples[runner.name].append(measured if measured is not None else time.perf_counter() - start)
    first_token: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(reps if mode == "decode" else 0):  # time to first token: the prompt's pass and its sampling
        for runner in runners:
            if runner.external:
                continue
            with contexts[runner.name]():
                sync(device)
                start = time.perf_counter()
                runner.step(mode, ids, 0)
                sync(device)
            first_token[runner.name].append(time.perf_counter() - start)
    for runner in runners:
        runner.finish()
    results = [_summarise(r.name, mode, batch_size, seq_len, dtype, device, samples[r.name], tokens,
                          memory[r.name], config, counts, peaks, first_token[r.name], read_bytes) for r in runners]
    ours = results[0]
    if len(results) > 1:
        peer = results[1]
        ours.peer = {k: getattr(peer, k) for k in ("implementation", "tokens_per_s", "tokens_per_s_std",
                                                    "ms_per_step", "peak_memory_bytes", "samples_s", "ttft_s")}
        ours.peer["speedup"] = ours.tokens_per_s / peer.tokens_per_s
        if runners[1].external:  # how llama.cpp was built and run; its memory is its file
            ours.peer["configuration"] = runners[1].build
    return ours


def _summarise(name, mode, batch_size, seq_len, dtype, device, samples, tokens, peak, config, counts,
               peaks, first_token: list[float], read_bytes: int) -> BenchResult:
    rates = [tokens / s for s in samples]
    median = statistics.median(rates)
    context = DECODE_PROMPT + seq_len // 2 if mode == "decode" else seq_len
    flops = flops_per_token(config, counts, mode, context)
    result = BenchResult(
        implementation=name, mode=mode, batch_size=batch_size, seq_len=seq_len, dtype=dtype, device=str(device),
        tokens_per_s=median, tokens_per_s_std=statistics.stdev(rates) if len(rates) > 1 else 0.0,
        ms_per_step=1000 * statistics.median(samples) / (seq_len if mode == "decode" else 1),
        peak_memory_bytes=peak, samples_s=samples, tokens_per_rep=tokens, flops_per_token=flops,
        flops_utilization=flops * median / peaks["matmul_flops"], threads=torch.get_num_threads(),
        ttft_s=statistics.median(first_token) if first_token else None, ttft_samples_s=first_token or None,
        provenance=provenance(device))
    if device.type == "cuda":
        name_ = torch.cuda.get_device_name(device)
        peak_flops = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name_), None)
        result.mfu = flops * median / peak_flops if peak_flops else None
    if mode == "decode":
        element = torch.finfo(torch_dtype(dtype)).bits // 8
        per_step = read_bytes + kv_cache_bytes(config, element, context) * batch_size
        result.bandwidth_bytes_per_s = per_step * median / batch_size
        result.bandwidth_utilization = result.bandwidth_bytes_per_s / peaks["read_bytes_per_s"]
    return result


def write_bench_png(path, results: list[BenchResult], title: str):
    """tokens/s by case (mode, batch, length, threads) as bars with their standard deviation, the peer beside."""
    labels = [f"{r.mode}\nb{r.batch_size} s{r.seq_len} t{r.threads}" for r in results]
    peers = [r.peer for r in results]

    def draw(axes) -> None:
        width = 0.4 if any(peers) else 0.8
        xs = range(len(results))
        axes.bar([x - (width / 2 if any(peers) else 0) for x in xs], [r.tokens_per_s for r in results], width,
                 yerr=[r.tokens_per_s_std for r in results], capsize=3, label="llmcli")
        if any(peers):
            axes.bar([x + width / 2 for x in xs], [p["tokens_per_s"] if p else 0 for p in peers], width,
                     yerr=[p["tokens_per_s_std"] if p else 0 for p in peers], capsize=3,
                     label=next(p["implementation"] for p in peers if p))
        axes.set_xticks(list(xs), labels, fontsize=8)
        axes.set(ylabel="tokens/s (median, ± std)", title=title)
        axes.legend()
    return write_png(path, draw, size=(max(6, 1.2 * len(results)), 4))
