"""The quantized linear layer and its layout on disk: what `load_model` needs to load a quantized directory.

All schemes are symmetric: w ≈ q · scale with q in [-2^(b-1), 2^(b-1) - 1]. int8 keeps one scale per output
channel; int4 one scale per group of `group_size` input features, two 4-bit values packed per byte (low
nibble = even column). Scales are stored in fp32 and, as quantize makes them (`symmetric_scales`), hold fp16 values.
A quantized model directory stores `qweight`, `scales` (and `bias`) per linear layer in
model.safetensors and the layout in quantization.json; `apply_quantized_layout` rebuilds that layout on a
meta-device model so that loading assigns the stored integers straight into place, never expanding to fp32.
How the integers are chosen (round to nearest, GPTQ) is llmcli.compression.quantize.

Which compute path runs (chosen in QuantizedLinear.forward):
- int8, int4 on an x86 CPU, a few rows (decode), once readied for decoding (gemv.prepare_for_decode, which holds
  the layer in the kernels' tiles of 16 rows: `tile_for_gemv`, `tile_rows`, the same bytes rearranged): llmcli's
  own kernels (models/gemv.cpp), activations quantized to int8 per block of 32, integer dot products (VNNI or
  AVX2); fp32 or bf16 activations alike. Every other path, and the state dict, reads the layer row-major
  (`row_major`).
- int8, int4 on CPU otherwise (a prompt), or where our kernels did not build: ATen's `_weight_int8pack_mm` /
  `_weight_int4pack_mm_for_cpu` in bf16 (fp32 activations are cast to bf16 and back: their x86 vector code is
  bf16-only, with fp32 they run scalar code), where the layer meets their assumptions.
- int8, int4 otherwise (CUDA, layers neither kernel takes): the integers become floats in forward, one layer at a
  time (int8: x·qᵀ then the per-channel scales; int4: the dequantized weight).
- Training through the layer (its integers frozen, e.g. LoRA on a quantized model): always the int8/int4 path above
  in float activations, which passes gradients to the activations; the packed kernels have no backward.
- int8-dynamic on CPU: fbgemm's `quantized.linear_dynamic` (activations quantized per call to 7 bits), prepacked
  once per layer from the stored int8 weights: about 0.14 ms decode, 10 ms for 128 tokens (fp32 dense: 0.2-0.8 ms,
  12-19 ms). Elsewhere activations are quantized per token to int8 and multiplied with `torch._int_mm` on CUDA,
  or emulated in floats.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.errors import UserError
from llmcli.models import build_on_meta, gemv
from llmcli.models.layout import block_linears, set_submodule

SCHEMES = ("int8", "int4", "int8-dynamic")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
FORMAT_VERSION = 1


def scheme_bits(scheme: str) -> int:
    return 4 if scheme == "int4" else 8


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


SCALE_RANGE = (2.0 ** -24, 65504.0)  # fp16's smallest and largest positive values


def symmetric_scales(weight: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """(N, K) -> (N, K / group_size): absmax / qmax per group, rounded to an fp16 value (as GGUF's Q8_0 and Q4_0
    blocks carry theirs: the decode kernels read them in half the bytes); 1 for all-zero groups (they quantize to
    0). Held in fp32."""
    rows, cols = weight.shape
    absmax = weight.detach().float().abs().reshape(rows, cols // group_size, group_size).amax(-1)
    scales = torch.where(absmax > 0, absmax / qrange(bits)[1], torch.ones_like(absmax))
    return scales.clamp(*SCALE_RANGE).half().float()


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int, dtype=torch.float32) -> torch.Tensor:
    rows, cols = q.shape
    grouped = q.reshape(rows, cols // group_size, group_size).to(dtype) * scales[..., None].to(dtype)
    return grouped.reshape(rows, cols)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 in [-8, 7] -> (N, K / 2) uint8: column 2j in the low nibble, 2j + 1 in the high one."""
    unsigned = (q.to(torch.int16) + 8).to(torch.uint8)
    return unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1).to(torch.int8) - 8


TILE_ROWS = 16  # rows per tile of gemv.cpp's integer tile bodies
TILE_RUN = 4  # inputs of a row next to each other in a tile


def tile_rows(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major int8 (N, K) or int4 (N, K / 2) weights and scales (N, G) -> the same bytes in gemv.cpp's tiles of
    16 rows (`int_tile`), shapes and dtypes kept. Per tile and block of 32 inputs, runs of 64 bytes, each giving every
    row of the tile 4 bytes: int8, 8 runs, run i holding inputs 4i .. 4i + 3; int4, 4 runs, run i holding inputs
    4i .. 4i + 3 in its low nibbles and 16 + 4i .. 19 + 4i in its high ones. Per tile and group, the rows' 16 scales.
    Rows past the last whole tile stay as they were, after the tiles."""
    whole = qweight.shape[0] // TILE_ROWS * TILE_ROWS
    tiles, columns = whole // TILE_ROWS, qweight.shape[1] * 8 // bits
    values = qweight[:whole]
    if bits == 4:  # the nibbles, one column each
        values = torch.stack((values & 0x0F, values >> 4), dim=-1)
    runs = values.reshape(tiles, TILE_ROWS, columns // 32, 32 // TILE_RUN, TILE_RUN).permute(0, 2, 3, 1, 4)
    if bits == 4:  # tile, block, run, row, byte: runs i and i + 4 share bytes
        runs = runs[:, :, :4] | (runs[:, :, 4:] << 4)
    tiled_scales = scales[:whole].reshape(tiles, TILE_ROWS, scales.shape[1]).transpose(1, 2)
    return (torch.cat((runs.reshape(whole, qweight.shape[1]), qweight[whole:])),
            torch.cat((tiled_scales.reshape(whole, scales.shape[1]), scales[whole:])).contiguous())


def tile_for_kernels(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`tile_rows`, the scales in fp16 where that loses nothing (symmetric_scales makes them so; an older
    directory's stay fp32): what the decode kernels read."""
    tiled, tiled_scales = tile_rows(qweight, scales.float(), bits)
    half = tiled_scales.half()
    return tiled, half if torch.equal(half.float(), tiled_scales) else tiled_scales


def untile_rows(tiled: torch.Tensor, tiled_scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `tile_rows`."""
    whole = tiled.shape[0] // TILE_ROWS * TILE_ROWS
    tiles, blocks = whole // TILE_ROWS, tiled.shape[1] * 8 // bits // 32
    runs = tiled[:whole].reshape(tiles, blocks, bits, TILE_ROWS, TILE_RUN)  # tile, block, run (bits of them), row, byte
    if bits == 4:
        runs = torch.cat((runs & 0x0F, runs >> 4), dim=2)
    values = runs.permute(0, 3, 1, 2, 4).reshape(whole, blocks * 32)  # each row's columns in order
    if bits == 4:
        values = values[:, 0::2] | (values[:, 1::2] << 4)
    scales = tiled_scales[:whole].reshape(tiles, tiled_scales.shape[1], TILE_ROWS).transpose(1, 2)
    return (torch.cat((values, tiled[whole:])),
            torch.cat((scales.reshape(whole, tiled_scales.shape[1]), tiled_scales[whole:])).contiguous())


# ---------------------------------------------------------------- the layer


class QuantizedLinear(nn.Module):
    """A linear layer holding integer weights and scales (buffers `qweight`, `scales`) and a float bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, group_size: int | None,
                 device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.bits = scheme_bits(scheme)
        self.group_size = group_size if self.bits == 4 else in_features  # int8: one scale per output channel
        if self.bits == 4:
            qweight = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        else:
            qweight = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", torch.empty(out_features, in_features // self.group_size, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self._kernel: tuple | None = None  # (key, fn or None): the prepared fast path, see forward
        self.tiled = False  # held in gemv.cpp's tiles (`tile_for_gemv`); saved and read row-major all the same

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None, q: torch.Tensor,
                    scales: torch.Tensor) -> QuantizedLinear:
        """Wrap integers `q` ((N, K) int8) and `scales` computed from `linear`'s weight."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, group_size,
                    device=linear.weight.device)
        layer.qweight = pack_int4(q) if layer.bits == 4 else q.to(torch.int8)
        layer.scales = scales.float().contiguous()
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def row_major(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight, fp32 scales) in the stored layout, whether or not the layer holds them in tiles."""
        if not self.tiled:
            return self.qweight, self.scales
        qweight, scales = untile_rows(self.qweight, self.scales, self.bits)
        return qweight, scales.float()

    def tile_for_gemv(self) -> None:
        """Hold the weights as the decode kernels read them (`tile_for_kernels`: tiles of 16 rows, fp16 scales where
        exact), in place of the row-major bytes (no second copy), where our kernels take the layer. Every other path
        reads them through `row_major`."""
        if not self.tiled and self._gemv_shape():
            self.qweight, self.scales = tile_for_kernels(self.qweight, self.scales, self.bits)
            self.tiled, self._kernel = True, None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:
            destination[prefix + "qweight"], destination[prefix + "scales"] = self.row_major()

    def _load_from_state_dict(self, *args, **kwargs):
        if self.tiled:  # a state dict is row-major, its scales fp32: back to that layout first
            self.qweight, self.scales = self.row_major()
        super()._load_from_state_dict(*args, **kwargs)
        self.tiled, self._kernel = False, None

    def int_weight(self) -> torch.Tensor:
        """The integer weight, (N, K) int8."""
        qweight, _ = self.row_major()
        return unpack_int4(qweight) if self.bits == 4 else qweight

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        qweight, scales = self.row_major()
        if self.bits == 8:
            return dequantize(qweight, scales, self.group_size, dtype)
        # unpack_int4 straight into floats, in place: a third fewer passes over the weight
        nibbles = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1)
        grouped = nibbles.reshape(self.out_features, -1, self.group_size).to(dtype).sub_(8)
        return grouped.mul_(scales[..., None].to(dtype)).reshape(self.out_features, self.in_features)

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}{group}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self._takes_gemv() and gemv.fits(rows, self.in_features):  # decode: our kernels (models/gemv.cpp)
            out = gemv.int_linear(rows, *self.gemv_operands(), self.group_size, self.bits)
        elif torch.is_grad_enabled() and rows.requires_grad:  # training through a frozen quantized layer (QLoRA)
            out = self._weight_only(rows)
        else:
            fast = self._fast_path(rows)
            out = fast(rows).to(x.dtype) if fast is not None else self._reference(rows)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _reference(self, rows: torch.Tensor) -> torch.Tensor:
        """The portable path: integers become floats of the activations' dtype, one layer at a time."""
        if self.scheme == "int8-dynamic":
            return self._dynamic_reference(rows)
        return self._weight_only(rows)

    def _weight_only(self, rows: torch.Tensor) -> torch.Tensor:
        """Float activations times the dequantized weight: differentiable in the activations, so gradients flow
        through a frozen quantized layer to the trained ones below it. int8-dynamic trains this way too (rounding
        its activations would pass no gradient)."""
        if self.bits == 8:  # one scale per output channel: scale the outputs, not the weight (2x faster)
            qweight, scales = self.row_major()
            return F.linear(rows, qweight.to(rows.dtype)) * scales[:, 0].to(rows.dtype)
        return F.linear(rows, self.dequantized_weight(rows.dtype))  # dequantize this one layer's weight

    def _dynamic_reference(self, rows: torch.Tensor) -> torch.Tensor:
        """Activations quantized per token (symmetric int8), an integer matmul, then both scales."""
        absmax = rows.detach().float().abs().amax(-1, keepdim=True)
        x_scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        xq = (rows.float() / x_scale).round().clamp(-127, 127).to(torch.int8)
        m, k, n = rows.shape[0], self.in_features, self.out_features
        if rows.is_cuda and m > 16 and k % 8 == 0 and n % 8 == 0:  # torch._int_mm's CUDA shape rules
            acc = torch._int_mm(xq, self.qweight.t()).float()
        else:  # exact while K * 127 * 128 < 2^24 (K < 1032), then fp32 rounding
            acc = xq.float() @ self.qweight.float().t()
        return (acc * x_scale * self.scales[:, 0].float()).to(rows.dtype)

    def _fast_path(self, rows: torch.Tensor) -> Callable | None:
        """The prepared CPU kernel for these activations, or None for the reference path. Prepared once per
        (device, dtype, weights): its operands are made to meet the kernel's assumptions first, and the kernel is
        kept only if it agrees with the reference on a probe input and is not slower than it there (a
        single-token row, the decode case)."""
        if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.bfloat16):
            return None
        if self.scheme == "int8-dynamic" and not _fbgemm_available():
            return None
        self.qweight = aligned(self.qweight)  # a weight read from a file sits wherever the file put it
        key = (rows.device, rows.dtype, self.qweight.data_ptr(), self.scales.data_ptr())
        if self._kernel is None or self._kernel[0] != key:
            self._kernel = (key, self._prepare_kernel(rows.dtype))
        return self._kernel[1]

    def _prepare_kernel(self, dtype: torch.dtype) -> Callable | None:
        try:
            fn = self._kernel_for(dtype)
            if fn is None:
                return None
            probe = torch.randn(2, self.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
            with torch.no_grad():
                got = fn(probe).float()
                want = F.linear(probe.float(), self.dequantized_weight())
                faster = _seconds(fn, probe[:1]) <= KERNEL_MARGIN * _seconds(self._reference, probe[:1])
        except (RuntimeError, NotImplementedError, AttributeError):
            return None
        # bf16 activations, or 8-bit ones for int8-dynamic, leave about 1% error; a layout bug leaves ~100%
        ok = (got - want).norm() <= 0.05 * want.norm() + 1e-6
        return fn if ok and faster else None

    def _kernel_fits(self) -> bool:
        """Whether this layer meets the assumptions the packed kernels' x86 code makes without checking them
        (PyTorch 2.13, aten/src/ATen/native/cpu/int8mm_kernel.cpp and int4mm_kernel.cpp); breaking one reads out of
        bounds (a wrong result, or SIGSEGV). Aligned loads are covered by `aligned`: operands are contiguous and
        64-byte aligned. fbgemm (int8-dynamic) packs weights and quantizes activations into buffers of its own."""
        if self.bits == 8 and self.scheme != "int8-dynamic":  # int8 steps through 16 inputs with no remainder loop
            return self.in_features % INT8_KERNEL_K_STEP == 0
        if self.bits == 4:  # int4 takes whole groups of its sizes
            return self.group_size in INT4_KERNEL_GROUP_SIZES and self.in_features % self.group_size == 0
        return True

    def _kernel_for(self, dtype: torch.dtype) -> Callable | None:
        """ATen's packed kernels where the layer fits them, else the reference path (few rows take our kernels
        before this, see forward). int8-dynamic: fbgemm for every call."""
        if self.scheme == "int8-dynamic":
            return _fbgemm_dynamic(self.qweight, self.scales[:, 0])
        packed = self._aten_kernel() if self._kernel_fits() else None
        if packed is not None and dtype != torch.bfloat16:
            packed = _through_bf16(packed, dtype)
        return packed

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(qweight, scales: fp16 or fp32) as our kernels read them, or None where they do not take this layer."""
        return (self.qweight, self.scales) if self._takes_gemv() else None

    def _takes_gemv(self) -> bool:
        """Whether our kernels take this layer's few-row calls (see gemv.fits): held in their tiles
        (gemv.prepare_for_decode loads the kernels and tiles the layers)."""
        return self._gemv_shape() and self.tiled

    def _gemv_shape(self) -> bool:
        """Whether our kernels are loaded and could take this layer: weight-only int8 or int4 in whole blocks of 32."""
        return ("int" in gemv.LEVELS and self.scheme != "int8-dynamic" and self.in_features % gemv.BLOCK == 0
                and self.group_size % gemv.BLOCK == 0)

    def _aten_kernel(self) -> Callable:
        """ATen's packed CPU kernels, bf16 activations in (their x86 code for fp32 is scalar). Every operand reaches a
        kernel through `aligned` (activations too: a row of a larger tensor may start anywhere)."""
        if self.bits == 8:
            scales = self.row_major()[1][:, 0].to(torch.bfloat16).contiguous()
            if self.tiled:  # the row-major bytes made at each call (a prompt's), not kept: no second copy
                return lambda x: torch.ops.aten._weight_int8pack_mm(aligned(x), self.row_major()[0], scales)
            qweight = self.qweight
            return lambda x: torch.ops.aten._weight_int8pack_mm(aligned(x), qweight, scales)
        qweight, scales = self.row_major()  # once: a tiled layer's untiling is a pass over its bytes
        return _int4_cpu_kernel(unpack_int4(qweight), scales, self.group_size, torch.bfloat16)


def _through_bf16(kernel: Callable, dtype: torch.dtype) -> Callable:
    """fp32 activations cast to bf16 and back around a bf16 kernel: bf16's rounding (about 0.3% relative) for a
    2-25x faster product."""
    return lambda x: kernel(x.to(torch.bfloat16)).to(dtype)


KERNEL_MARGIN = 1.5  # a kernel is dropped only when clearly slower: timing noise must not flip the choice
KERNEL_ALIGNMENT = 64  # bytes: a cache line; ATen's int8 kernel loads 32 bytes of activations and 16 of weight aligned
INT8_KERNEL_K_STEP = 16  # input features per step of ATen's AVX-512 int8 loop (8 in its AVX2 one)
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself if it is contiguous and starts on a 64-byte boundary, else such a copy. Tensors read from a
    safetensors file start wherever the file puts them (llmcli's own files: 8 bytes past a boundary)."""
    if t.is_contiguous() and t.data_ptr() % KERNEL_ALIGNMENT == 0:
        return t
    nbytes = t.numel() * t.element_size()
    buffer = torch.empty(nbytes + KERNEL_ALIGNMENT, dtype=torch.uint8, device=t.device)
    start = -buffer.data_ptr() % KERNEL_ALIGNMENT
    return buffer[start:start + nbytes].view(t.dtype).view(t.shape).copy_(t)


def _seconds(fn: Callable, x: torch.Tensor, repeats: int = 5) -> float:
    """The best of a few timed calls (after one warm-up)."""
    with torch.no_grad():
        fn(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - start)
    return best


def _fbgemm_available() -> bool:
    return hasattr(torch.ops.quantized, "linear_dynamic") and torch.backends.quantized.engine in ("x86", "fbgemm")


def _fbgemm_dynamic(qweight: torch.Tensor, scales: torch.Tensor) -> Callable:
    """fbgemm's dynamic int8 linear from our int8 weights (its quantized-tensor API is deprecated in 2.x)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zero_points = torch.zeros(qweight.shape[0], dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zero_points, 0)
        packed = torch.ops.quantized.linear_prepack(weight, None)
    # reduce_range: 7-bit activations, or fbgemm's u8·s8 pair sums saturate int16 (measured: 10% error, not 2%)
    return lambda x: torch.ops.quantized.linear_dynamic(aligned(x.float()), packed, True)


INT4_PACK_ROWS = 16  # ATen's int4 packing takes output features in multiples of 16


def _int4_cpu_kernel(q: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> Callable:
    """ATen's CPU int4 kernel computes x · ((u - 8) · scale + zero) with u in [0, 15], in its own packed layout.
    Output features are padded with zero rows to a multiple of 16 (a 50,257-token LM head) and cut off again."""
    out_features = q.shape[0]
    pad = -out_features % INT4_PACK_ROWS
    q, scales = F.pad(q, (0, 0, 0, pad)), F.pad(scales, (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 2)  # inner_k_tiles = 2
    scales_and_zeros = torch.stack((scales.t(), torch.zeros_like(scales.t())), dim=-1).to(dtype).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(aligned(x), packed, group_size,
                                                                 scales_and_zeros)[:, :out_features]




# ---------------------------------------------------------------- which layers, and their bytes


def quantizable_layers(model: nn.Module, include_head: bool = False) -> list[str]:
    """The blocks' projections; with include_head also the heads (LM head, pooler, MLM dense)."""
    names = list(block_linears(model))
    if include_head:
        names += [name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and name not in names]
    return names


def check_group_size_value(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise UserError(f"--group-size {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}")


def check_group_size(model: nn.Module, names: list[str], scheme: str, group_size: int) -> None:
    """int4: the group size is supported and divides the input features of every layer in `names`."""
    if scheme_bits(scheme) == 8:
        return
    check_group_size_value(group_size)
    for name in names:
        features = model.get_submodule(name).in_features
        if features % group_size:
            fits = [g for g in GROUP_SIZES if features % g == 0]
            fix = (f"use --group-size {' or '.join(map(str, fits))}" if fits
                   else "no int4 group size divides it; use --scheme int8")
            raise UserError(f"layer {name}: {features} input features are not a multiple of --group-size "
                            f"{group_size}; {fix}")


def quantized_state_bytes(config, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                          include_head: bool = False) -> int:
    """Bytes of every tensor a directory quantized with this scheme stores: the model built on the meta device
    with the quantized layout applied, as `load_model` builds it (the rest stays in fp32, as written)."""
    model = build_on_meta(config)
    if include_head:
        untie_head(model)
    layers = quantizable_layers(model, include_head)
    check_group_size(model, layers, scheme, group_size)
    spec = {"scheme": scheme, "group_size": group_size if scheme_bits(scheme) == 4 else None, "layers": layers}
    apply_quantized_layout(model, spec)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def untie_head(model: nn.Module) -> None:
    """Give a tied model its own LM head (a copy of the embedding) so that the head can be quantized while the
    embedding stays in full precision."""
    config = model.config
    if not config.tie_embeddings:
        return
    weight = model.tok_emb.weight.detach().clone()
    if config.family == "t5":  # T5 scales hidden states by d_model^-0.5 before a tied head only
        weight = weight * config.d_model ** -0.5
    head = nn.Linear(config.d_model, config.vocab_size, bias=False, device=weight.device, dtype=weight.dtype)
    head.weight = nn.Parameter(weight, requires_grad=False)
    model.lm_head = head
    model.config = dataclasses.replace(config, tie_embeddings=False)


# ---------------------------------------------------------------- loading


def apply_quantized_layout(model: nn.Module, spec: dict, where: str = "quantization.json") -> None:
    """Swap the spec's nn.Linear layers for empty QuantizedLinear of the same shapes (on the same device,
    typically meta), so that loading a quantized state dict assigns the stored integers in place."""
    scheme, group_size, layers = spec.get("scheme"), spec.get("group_size"), spec.get("layers")
    if scheme not in SCHEMES or not isinstance(layers, list):
        raise UserError(f"{where}: needs a scheme ({', '.join(SCHEMES)}) and a list of layers; "
                        f"re-run `llmcli quantize`")
    if scheme_bits(scheme) == 4 and group_size not in GROUP_SIZES:
        raise UserError(f"{where}: group_size {group_size!r} is not one of {GROUP_SIZES}; re-run `llmcli quantize`")
    for name in layers:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise UserError(f"{where}: layer {name!r} is not a linear layer of this model; "
                            f"the directory mixes files from different models")
        layer = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                                group_size, device=linear.weight.device)
        set_submodule(model, name, layer)
