"""Our own few-row matrix products for decoding on x86 CPUs (gemv.cpp), and readying a model to decode with them.

A decode step multiplies one row per sequence by every weight matrix: its speed is how fast the weights stream
from memory. torch's single-row paths stream them at a third to a half of the machine's read bandwidth
(benchmarks/gemv.py); gemv.cpp's kernels read each matrix once per call, each row straight through, for fp32, bf16,
int8 and int4 weights (the integer ones against int8 activation blocks, with VNNI or AVX2's byte products). It also
holds attention for one query per sequence over the KV cache (torch's bf16 SDPA is slow at one query). They are torch
ops (`torch.ops.llmcli.*`, shapes registered for tracing), so that `runtime.compile_decode` compiles a decode step
with them inside one graph.

The C++ is compiled with torch.utils.cpp_extension at first use (once per source and torch version, about 30 s,
said on stderr) and cached in the user's cache directory. Which body runs is read from the CPU's features at run
time. Without a compiler, setuptools or an x86 CPU, or with LLMCLI_KERNELS=0, decoding takes torch's path, as it
did before: `kernel_name()` says which. int8 and int4 layers are held in tiles of 16 rows
(models.quantized.tile_rows), which the integer bodies read with one vector lane per row.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.config import user_cache_dir
from llmcli.cpu import cpu_flags
from llmcli.models.blocks import Attention, FeedForward
from llmcli.models.layout import set_submodule, store_matrices_transposed

SOURCE = Path(__file__).with_name("gemv.cpp")
HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14  # Linux
ARENA_MIN_BYTES = 64 * 2**10  # tensors this large move into the arena; norms and biases stay where they are
MAX_ROWS = 8  # more rows (a prompt) are a matrix product: torch's GEMM does those
BLOCK = 32  # inputs per activation block; every kernel takes K in whole blocks
MAX_HEAD_DIM = 256  # the attention kernel's largest head
AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}
AVX2 = {"avx2", "fma", "f16c"}
# weight kind -> (the AVX-512 feature its fast body needs besides AVX512, the name it goes by)
BODIES = {"fp32": (None, "AVX-512"), "bf16": ("avx512_bf16", "AVX-512-BF16"), "int": ("avx512_vnni", "AVX-512-VNNI")}
# weight kind -> the body its calls run, filled once the kernels load: the calls read this dict, not the CPU's
# features (torch.compile traces a dict, not the reading of /proc/cpuinfo)
LEVELS: dict[str, int] = {}


@functools.lru_cache(maxsize=None)
def isa(kind: str) -> int | None:
    """Which body of gemv.cpp runs `kind` ("fp32", "bf16", "int") here: 2 AVX-512, 1 AVX2, None neither."""
    flags = cpu_flags()
    extra, _ = BODIES[kind]
    if AVX512 <= flags and (extra is None or extra in flags):
        return 2
    return 1 if AVX2 <= flags else None


@functools.lru_cache(maxsize=1)
def extension():
    """The compiled kernels as ops (`torch.ops.llmcli`), or None where they cannot run here (said once on stderr
    when a build fails)."""
    LEVELS.clear()
    if os.environ.get("LLMCLI_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if isa("fp32") is None:
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + torch.__version__.encode()).hexdigest()[:12]
    name = f"llmcli_gemv_{digest}"
    build = user_cache_dir() / "kernels" / name
    if not (build / f"{name}.so").exists():
        print("llmcli: compiling the CPU decode kernels (once per torch version, about 30 s)", file=sys.stderr)
    try:
        build.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load  # needs setuptools and a C++ compiler

        load(name, [str(SOURCE)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
             build_directory=str(build), verbose=False, is_python_module=False)
    except (ImportError, OSError, RuntimeError, SystemExit) as error:  # cpp_extension raises each of these
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "error:" in line), lines[-1])[:200]  # the compiler's first error
        print(f"llmcli: the CPU decode kernels did not build ({reason}); decoding takes torch's path",
              file=sys.stderr)
        return None
    _register_shapes()
    LEVELS.update({kind: isa(kind) for kind in BODIES})
    return torch.ops.llmcli


@functools.lru_cache(maxsize=1)
def _register_shapes() -> None:
    """What each op a model calls returns, for torch.compile's tracing (which runs no kernel)."""
    def rows_out(x, n):
        return x.new_empty((*x.shape[:-1], n))

    torch.library.register_fake("llmcli::linear")(lambda x, w, bias, isa: rows_out(x, sum(t.shape[0] for t in w)))
    torch.library.register_fake("llmcli::linear_int_tiles")(lambda x, qweight, scales, group, bits, isa:
                                                            rows_out(x, sum(t.shape[0] for t in qweight)))
    torch.library.register_fake("llmcli::argmax_rows")(lambda logits: logits.new_empty(logits.shape[0],
                                                                                    dtype=torch.long))
    torch.library.register_fake("llmcli::decode_attention")(lambda q, k, v, scale, isa: torch.empty_like(q))


def kernel_name() -> str:
    """What few-row products run on here, for provenance: e.g. 'llmcli gemv (fp32 AVX-512, bf16 AVX-512-BF16,
    int AVX-512-VNNI, int8 and int4 in tiles of 16 rows)' or "torch (llmcli's kernels off)"."""
    if extension() is None:
        return "torch (llmcli's kernels off)"
    bodies = [f"{kind} {BODIES[kind][1] if isa(kind) == 2 else 'AVX2'}" for kind in BODIES]
    if "int" in LEVELS:
        bodies.append("int8 and int4 in tiles of 16 rows")
    return f"llmcli gemv ({', '.join(bodies)})"


def fits(x: torch.Tensor, in_features: int) -> bool:
    """Whether a call with activations `x` is one our kernels take: no autograd, CPU, few rows, whole blocks."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and in_features % BLOCK == 0
            and x.numel() <= MAX_ROWS * in_features and x.dtype in (torch.float32, torch.bfloat16))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through our kernels where they are loaded (`extension()`) and apply (see `fits`;
    fp32 or bf16 weight in its (out, in) order), else torch's."""
    kind = _kind(weight)
    if kind not in LEVELS or not fits(x, weight.shape[-1]) or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    return torch.ops.llmcli.linear(x, [weight], bias, LEVELS[kind])


def int_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
               bits: int) -> torch.Tensor:
    """x · (q · scale)ᵀ for int8 (N, K) weights with fp32 scales (N, 1), or int4 (N, K / 2) with scales
    (N, K / group_size), both in the tile bodies' layout (models.quantized.tile_rows); the activations quantized to
    int8 per block of 32 inside the kernel. The caller checks `fits` and that the kernels are loaded ("int" in
    LEVELS); group_size must be a multiple of 32. Returns x's dtype."""
    return _int_products(x, [qweight], [scales], group_size, bits)


def _int_products(x, qweights: list, scales: list, group_size: int, bits: int) -> torch.Tensor:
    return torch.ops.llmcli.linear_int_tiles(x, qweights, scales, group_size, bits, LEVELS["int"])


def projections(layers: tuple[nn.Module, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tuple(layer(x) for layer in layers)` for layers of one input (q, k and v; gate and up) in one kernel call
    where our kernels take them all (prepare_for_decode sets this up: see `fusable`): the activations are
    converted or quantized once, and one parallel pass reads every matrix. Otherwise one call per layer."""
    first = layers[0]
    if not fits(x, first.in_features):
        return tuple(layer(x) for layer in layers)
    sizes = [layer.out_features for layer in layers]
    biases = [layer.bias for layer in layers]
    bias = None if biases[0] is None else torch.cat(biases)
    if isinstance(first, DecodeLinear):
        out = torch.ops.llmcli.linear(x, [layer.weight for layer in layers], bias, LEVELS[_kind(first.weight)])
    else:  # integer layers: models.quantized.QuantizedLinear, their operands through `gemv_operands`
        operands = [layer.gemv_operands() for layer in layers]
        out = _int_products(x, [q for q, _ in operands], [s for _, s in operands], first.group_size, first.bits)
        out = out if bias is None else out + bias.to(out.dtype)
    return out.split(sizes, dim=-1)


def fusable(layers: list[nn.Module]) -> bool:
    """Whether `projections` can run these layers in one call: all our fp32 or bf16 DecodeLinear of one dtype, or
    all integer layers that our kernels take (`gemv_operands`) of one scheme and group; one input width; biases on
    all or none."""
    first = layers[0]
    if len({layer.in_features for layer in layers}) != 1 or len({layer.bias is None for layer in layers}) != 1:
        return False
    if all(type(layer) is DecodeLinear for layer in layers):
        return len({layer.weight.dtype for layer in layers}) == 1 and _kind(first.weight) in LEVELS
    return ("int" in LEVELS and all(hasattr(layer, "gemv_operands") and layer.gemv_operands() is not None
                                    for layer in layers)
            and len({(layer.bits, layer.group_size) for layer in layers}) == 1)


def _kind(weight: torch.Tensor) -> str | None:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(weight.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention, through our kernel for a decode step (one query per sequence, no mask, fp32
    or bf16, a KV cache's layout), else torch's, whose CPU kernel is slow for one query in bf16
    (benchmarks/decode_attention.py)."""
    if (attn_mask is None and not is_causal and dropout_p == 0.0 and q.shape[2] == 1 and q.device.type == "cpu"
            and not torch.is_grad_enabled() and q.dtype in (torch.float32, torch.bfloat16)
            and k.dtype == q.dtype == v.dtype and q.shape[-1] <= MAX_HEAD_DIM and q.stride(-1) == 1
            and k.stride(-1) == v.stride(-1) == 1 and k.stride(-2) == v.stride(-2) == q.shape[-1]
            and "fp32" in LEVELS):
        return torch.ops.llmcli.decode_attention(q, k, v, scale if scale is not None else q.shape[-1] ** -0.5,
                                                 LEVELS["fp32"])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=enable_gqa)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) for (B, V) logits, the same index, through our kernel on a CPU that runs its AVX-512 body
    once the kernels are loaded (torch's CPU reduction takes 30 us for 49K fp32 logits, 170 us in bf16: 2-5% of a
    small model's decode step), else torch's."""
    if (logits.dim() == 2 and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
            and logits.stride(-1) == 1 and logits.shape[-1] > 0 and LEVELS.get("fp32") == 2):
        return torch.ops.llmcli.argmax_rows(logits)
    return logits.argmax(-1)


class DecodeLinear(nn.Linear):
    """nn.Linear whose inference calls of few rows go through our kernels (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    @classmethod
    def wrapping(cls, module: nn.Linear) -> DecodeLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = module.in_features, module.out_features
        layer.weight, layer.bias = module.weight, module.bias  # the same Parameter objects
        return layer


def prepare_for_decode(model: nn.Module) -> nn.Module:
    """Ready a CPU model for generation. With our kernels: every nn.Linear becomes a DecodeLinear, a tied LM head
    runs through `linear` and attention through `attention`, weights kept in their (out, in) order, which the
    kernels read, gathered into one buffer (`gather_weights`). Without them: matrices stored transposed, the order
    torch's single-row product reads fastest. In place; returns `model`."""
    if extension() is None:
        return store_matrices_transposed(model)
    store_matrices_transposed(model, transposed=False)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            set_submodule(model, name, DecodeLinear.wrapping(module))
        elif isinstance(module, Attention):
            module.sdpa = attention
    tile_integer_layers(model)
    for module in model.modules():
        if isinstance(module, Attention) and not module.cross:
            _fuse(module, "fused_qkv", [module.q_proj, module.k_proj, module.v_proj])
        elif isinstance(module, FeedForward) and module.gate is not None:
            _fuse(module, "fused_gate_up", [module.gate, module.up])
    model.tied_head = linear
    gather_weights(model)
    return model


def tile_integer_layers(model: nn.Module) -> None:
    """Hold every quantized layer (models.quantized.QuantizedLinear) in the integer kernels' tiles, in place, where
    the kernels load and take it; state dicts stay row-major."""
    if extension() is None:
        return
    for module in model.modules():
        if hasattr(module, "tile_for_gemv"):
            module.tile_for_gemv()


def _fuse(module: nn.Module, hook: str, layers: list[nn.Module]) -> None:
    """Point `module`'s hook (Attention.fused_qkv, FeedForward.fused_gate_up) at one call for `layers` where it
    can (`fusable`); it stays unset otherwise (LoRA or adapter layers, mixed types)."""
    if fusable(layers):
        setattr(module, hook, functools.partial(projections, tuple(layers)))


def gather_weights(model: nn.Module) -> torch.Tensor:
    """Move the model's large tensors (parameters and buffers, in forward order) into one buffer backed by 2 MB pages
    where Linux grants them (madvise; transparent huge pages are often 'madvise' only). A decode step then streams
    one run of memory with few TLB misses: gpt2-small in bf16 decoded 12.3 ms a token against 14.4-15.0 without
    (this AMD EPYC). Values, names and Parameter objects stay; returns the buffer."""
    tensors, seen = [], set()
    for module in model.modules():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(t) not in seen and t.device.type == "cpu" and t.numel() * t.element_size() >= ARENA_MIN_BYTES:
                seen.add(id(t))
                tensors.append(t)
    sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t in tensors]  # each start 64-byte aligned
    arena = torch.empty(sum(sizes) + HUGE_PAGE, dtype=torch.uint8)  # not touched yet: no page is resident
    start = -arena.data_ptr() % HUGE_PAGE
    _advise_huge_pages(arena.data_ptr() + start, (arena.numel() - start) // HUGE_PAGE * HUGE_PAGE)
    offset = start
    with torch.no_grad():
        for t, size in zip(tensors, sizes):
            view = arena[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            t.data = view.copy_(t.data)  # the old storage goes as its last reference does
            offset += size
    return arena


def _advise_huge_pages(address: int, length: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_HUGEPAGE)
    except (OSError, AttributeError):  # not Linux, or no madvise: ordinary pages
        pass
