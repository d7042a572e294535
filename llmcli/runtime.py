"""What every command that runs a model needs: the device, the precision and its dtype, autocast,
calling a model with a batch, the family's loss, and held-out evaluation.

Inference, compression, profiling and training all import this module; it imports only the
foundation (errors), never a command.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import shutil
import warnings

import torch
from torch.export import Dim

from llmcli.config import user_cache_dir
from llmcli.cpu import cpu_flags
from llmcli.errors import UserError
from llmcli.models.base import ModelOutput
from llmcli.models.blocks import KVCache, LayerKVCache, MixtureOfExperts
from llmcli.models.layout import blocks

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SEQ_LEN = 128  # training and evaluation use the model's context, at most this many tokens
MODEL_INPUTS = ("attention_mask", "token_type_ids", "decoder_input_ids", "decoder_attention_mask")
IGNORE_INDEX = -100  # a label that is not scored
CROSS_ENTROPY_CHUNK = 2**22  # logits per chunk of the loss: 16 MB in fp32, whatever the vocabulary


def torch_dtype(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> the torch dtype."""
    return DTYPES[name]


def default_seq_len(config) -> int:
    return min(DEFAULT_SEQ_LEN, config.max_seq_len)


def resolve_device(name: str) -> torch.device:
    """'auto' is cuda where available, else cpu; a CUDA device on a machine without CUDA is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPUs that multiply bf16 in hardware; others emulate it


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: CUDA that supports bf16, a CPU with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' is bf16 where it is native (weights for inference, autocast for training), fp32 elsewhere;
    LLMCLI_PRECISION=fp32 (or bf16) makes auto mean that instead."""
    if name not in PRECISIONS:
        raise UserError(f"--precision {name!r} is not one of {', '.join(PRECISIONS)}")
    if name == "auto":
        forced = os.environ.get("LLMCLI_PRECISION")
        if forced:
            if forced not in ("fp32", "bf16"):
                raise UserError(f"LLMCLI_PRECISION={forced!r}: use fp32 or bf16, or unset it for auto")
            return forced
        return "bf16" if native_bf16(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA (its gradient scaler is CUDA-only); use bf16 or fp32 on CPU")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch_dtype(precision))


def _can_compile(device: torch.device, warn) -> bool:
    """Whether inductor can compile here (on the CPU it needs a C++ compiler; without one: one warning line). A
    graph that fails to compile then runs eagerly rather than failing the command."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        warn("warning: --compile needs a C++ compiler (g++) for torch.compile on the CPU; running without it")
        return False
    torch._dynamo.config.suppress_errors = True
    return True


def compile_blocks(model: torch.nn.Module, device: torch.device, warn) -> bool:
    """torch.compile every transformer block (inductor; on the CPU it needs a C++ compiler). Where compile is
    not available: one warning line, and the model runs eagerly. A block that fails to compile runs eagerly too.
    Compilation happens on the first forward, so the first step is slower (callers report it apart)."""
    if not _can_compile(device, warn):
        return False
    for block in blocks(model).values():
        block.compile()
    return True


DECODE_COMPILE_OPTIONS = {"freezing": True, "size_asserts": False}
# On the CPU the exported decode step is compiled ahead of time (AOTInductor): a C++ wrapper that holds the weights
# itself, where inductor's in-process C++ wrapper takes them as some 500 inputs at every step, each through Python
# (smollm2-135m's int4 step 1.09x faster, its bf16 one 1.23x: benchmarks/decode_step.py). The weights stay the
# model's tensors: the package holds the code, and the step reads the weights in place.
AHEAD_OF_TIME_OPTIONS = {"size_asserts": False, "aot_inductor.package_constants_in_so": False}


def compile_decode(model: torch.nn.Module, device: torch.device, warn) -> bool:
    """Compile a decoder-only model's decode step (new tokens over the KV cache) as one graph, every block and our
    kernels' ops in it: generation calls `model.decode_forward` for each step after the prompt, and the prompt runs
    as it is. One graph instead of some 40 small ops a block, each with eager PyTorch's per-op cost (figures:
    benchmarks/llama_cpp.py --compile in RESULTS.md); see DecodeStep for how it is compiled and called. The weights
    are constants of the compiled step, not inputs, and the graph does not re-check its buffers' shapes; on the CPU
    it is compiled ahead of time and kept in the user's cache (`compiled_ahead_of_time`). Compiled on the first step
    (about 60 s on 2 cores for a 135M model the first time; exported and loaded from the cache in 10 s after). The
    step must run under no_grad or inference mode, as generation's do. T5 gets its blocks compiled. Not available:
    one warning line, and decoding runs eagerly."""
    if model.config.family != "gpt":  # T5's steps carry the encoder's output: its blocks are compiled instead
        return compile_blocks(model, device, warn)
    if not _can_compile(device, warn):
        return False
    model.decode_forward = DecodeStep(model, warn)
    return True


class DecodeStep:
    """`model.decode_forward` for a decoder. The usual step (one new token per sequence, no padding mask) of a model
    without sliding-window layers or mixtures of experts is exported once per batch size and dtype (torch.export,
    the cache's length and size symbols) and compiled by inductor into a callable that takes the token, the length
    and the cache's tensors: no torch.compile guards to check and no weights to gather at each step, which took 31%
    of smollm2-135m's int4 step and 16% of its bf16 one (benchmarks/decode_step.py). Other steps (padded batches,
    sliding windows, mixtures of experts, a model that does not export) go through torch.compile(model.forward)."""

    def __init__(self, model: torch.nn.Module, warn) -> None:
        self.model, self.warn = model, warn
        self.guarded = torch.compile(model.forward, dynamic=True, options=DECODE_COMPILE_OPTIONS)
        self.graphs: dict[tuple, object] = {}  # (batch, dtype, device) -> compiled step, or None: it failed
        self._markers = torch.empty(0, dtype=torch.uint8)
        # a sliding window rewrites its cache, and a mixture of experts sizes its work by the routing (data-dependent
        # shapes, which export refuses)
        config = model.config
        self.exportable = (all(config.window(i) is None for i in range(config.n_layers))
                           and not any(isinstance(module, MixtureOfExperts) for module in model.modules()))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cache=None, last_only: bool = False):
        if not self._plain(input_ids, attention_mask, position_ids, cache):
            return self.guarded(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                last_only=last_only)
        if not (cache.layers[0].room(1) and self.model.decoder.positions_fit(cache.length + 1)):
            return self.model(input_ids, cache=cache)  # raises the full cache's or context's error
        key = (input_ids.shape[0], cache.layers[0].k.dtype, input_ids.device)
        if key not in self.graphs:
            self.graphs[key] = self._compile(input_ids, cache)
        step = self.graphs[key]
        if step is None:
            return self.guarded(input_ids, cache=cache, last_only=last_only)
        logits, hidden = step(input_ids, self._length_marker(cache.length, input_ids.device), *_cache_tensors(cache))
        for layer in cache.layers:
            layer.length += 1
        return ModelOutput(logits=logits, hidden_states=hidden)

    def _plain(self, input_ids, attention_mask, position_ids, cache) -> bool:
        return (self.exportable and cache is not None and input_ids.shape[1] == 1 and attention_mask is None
                and position_ids is None and not torch.is_grad_enabled())

    def _length_marker(self, length: int, device: torch.device) -> torch.Tensor:
        """A tensor `length` long (a view of one kept buffer): how the step takes the cache's length."""
        if self._markers.numel() < length or self._markers.device != device:
            self._markers = torch.empty(max(length, 2 * self._markers.numel()), dtype=torch.uint8, device=device)
        return self._markers[:length]

    def _compile(self, input_ids: torch.Tensor, cache):
        """The exported and compiled step, or None (said once) where the model does not export or compile."""
        tensors = _cache_tensors(cache)
        # export specializes a dimension of 1; the example's length only has to fit the cache
        example = (input_ids, self._length_marker(max(cache.length, 2), input_ids.device), *tensors)
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # a failed export prints its partial graph there
                shapes = (None, {0: Dim.DYNAMIC}, tuple({2: Dim.DYNAMIC} for _ in tensors))
                program = torch.export.export(_StepOverTensors(self.model), example, strict=False,
                                              dynamic_shapes=shapes)
            if input_ids.device.type == "cpu":
                return compiled_ahead_of_time(program, self.warn)
            with _quiet("torch._inductor.standalone_compile"):  # it warns when it cannot save what it never saves
                return torch._inductor.standalone_compile(
                    program.module(), list(example), dynamic_shapes="from_graph", donate_graph_module=True,
                    options={"config_patches": DECODE_COMPILE_OPTIONS})
        except Exception as error:  # noqa: BLE001 - any export or compile failure: the guarded path runs the step
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            self.warn(f"note: the decode step did not export or compile ({reason}); it runs through torch.compile's "
                      "guards")
            return None


def compiled_ahead_of_time(program: torch.export.ExportedProgram, warn):
    """The exported step compiled by AOTInductor, a callable of the program's inputs returning its outputs. The
    package (the code, not the weights) is kept in the user's cache under a digest of the program as printed (its
    ops, shapes and dtypes), its weights' layouts, the CPU's features and torch's version: a later process with the
    same model loads it instead of compiling (said on `warn` when it compiles). The weights are the program's own
    tensors, read in place."""
    state = {**program.state_dict, **program.constants}
    layouts = [(name, tuple(t.shape), t.stride(), str(t.dtype)) for name, t in sorted(state.items())]
    digest = hashlib.sha256("\n".join([torch.__version__, ",".join(sorted(cpu_flags())), repr(sorted(
        AHEAD_OF_TIME_OPTIONS.items())), repr(layouts), str(program)]).encode()).hexdigest()[:20]
    path = user_cache_dir() / "decode_steps" / f"{digest}.pt2"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{digest}.{os.getpid()}.partial.pt2")
        warn("llmcli: compiling the decode step (once per model, dtype and batch size; about a minute for 135M "
             "parameters on 2 cores)")
        try:
            with warnings.catch_warnings():  # torch's own deprecation notices while it packages
                warnings.simplefilter("ignore", FutureWarning)
                torch._inductor.aoti_compile_and_package(program, package_path=str(partial),
                                                         inductor_configs=AHEAD_OF_TIME_OPTIONS)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    compiled = torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
    compiled.load_constants({name: state[name] for name in compiled.get_constant_fqns()}, check_full_update=True,
                            user_managed=True)
    run = compiled.loader.boxed_run

    def step(*inputs: torch.Tensor, _weights=state):  # the loader keeps pointers: the tensors must outlive it
        return run(list(inputs))

    return step


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every layer's keys and values, in the order _StepOverTensors reads them."""
    return [t for layer in cache.layers for t in (layer.k, layer.v)]


@contextlib.contextmanager
def _quiet(logger: str):
    """The logger's warnings off for the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class _StepOverTensors(torch.nn.Module):
    """model(input_ids, cache) with the cache given as tensors: what DecodeStep exports. Its length is the length of
    `length_marker` (the compiled step's C++ wrapper takes tensors only), then come every layer's keys and values."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, length_marker: torch.Tensor, *tensors: torch.Tensor):
        length = length_marker.shape[0]
        layers = [LayerKVCache.holding(k, v, length) for k, v in zip(tensors[::2], tensors[1::2])]
        out = self.model(input_ids, cache=KVCache.holding(layers))
        return out.logits, out.hidden_states


def machine_memory(device: torch.device | str) -> int:
    """Bytes the device has: physical RAM (or a smaller cgroup limit) for CPU, total memory for CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def model_outputs(model, batch: dict[str, torch.Tensor]):
    """Call any family with the inputs its batch carries."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    return model(batch["input_ids"], **inputs)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions (-100 = not scored), computed in fp32 a chunk of rows at a
    time, so the full fp32 log-probabilities over the vocabulary never exist (see ChunkedCrossEntropy)."""
    return ChunkedCrossEntropy.apply(logits.flatten(0, 1), labels.flatten())


def cross_entropy_chunk_rows(vocab: int) -> int:
    return max(1, CROSS_ENTROPY_CHUNK // vocab)


class ChunkedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), labels, ignore_index=-100) with the memory of the logits alone.

    Forward keeps only the logits (in their own dtype, as the LM head made them) and the labels; each chunk
    of rows is upcast to fp32 for its log-sum-exp and dropped. Backward recomputes each chunk's softmax and
    writes softmax - onehot, scaled by 1 / (scored positions), into a gradient in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = cross_entropy_chunk_rows(logits.shape[-1])
        scored = labels != IGNORE_INDEX
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start:start + rows].float()
            target = labels[start:start + rows].clamp(min=0)[:, None]
            nll = torch.logsumexp(chunk, -1) - chunk.gather(1, target).squeeze(1)
            total += nll.masked_fill(~scored[start:start + rows], 0.0).sum()
        ctx.save_for_backward(logits, labels)
        return total / scored.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, labels = ctx.saved_tensors
        rows = cross_entropy_chunk_rows(logits.shape[-1])
        scored = labels != IGNORE_INDEX
        scale = grad.float() / scored.sum().clamp(min=1)  # nothing scored: zero gradients, as torch gives
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], rows):
            probs = torch.softmax(logits[start:start + rows].float(), -1)
            target = labels[start:start + rows].clamp(min=0)[:, None]
            probs.scatter_add_(1, target, torch.full(target.shape, -1.0, device=probs.device))
            probs.mul_(scored[start:start + rows, None] * scale)
            grad_logits[start:start + rows] = probs
        return grad_logits, None


def family_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The family's objective on a batch: CLM, MLM or span targets."""
    return token_cross_entropy(model_outputs(model, batch).logits, batch["labels"])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700))


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """Nats per token -> bits per byte of text (loss / ln 2 x tokens / bytes), so tokenizers compare."""
    return loss / math.log(2) / bytes_per_token


@torch.no_grad()
def evaluate(model, batches: list[dict], device: torch.device, precision: str = "fp32") -> dict:
    """Token-weighted validation loss and perplexity over a fixed set of batches."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"] != -100).sum())
        with autocast(device, precision):
            total += family_loss(model, batch).item() * n
        tokens += n
    model.train(was_training)
    if tokens == 0:
        raise UserError("validation split has no scored tokens; give more data")
    loss = total / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}
