"""llmcli's own few-row kernels (models/gemv.cpp): every body this CPU can run against a reference computed another
way, and a model readied for decoding with them computing what it computed before."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.models import build_model, gemv
from llmcli.models.quantized import (QuantizedLinear, dequantize, pack_int4, qrange, symmetric_scales,
                                     tile_for_kernels, tile_rows, untile_rows)
from conftest import tiny_config

pytestmark = pytest.mark.skipif(gemv.isa("fp32") is None, reason="the kernels need an x86 CPU with AVX2")

# (rows, in, out): one and several rows, out not a multiple of the 4-row tile, in of 1, 3 and 24 blocks
SHAPES = [(1, 32, 5), (3, 96, 33), (8, 768, 771)]


def levels(kind: str) -> list[int]:
    """The bodies this CPU runs for `kind`: AVX2 always, AVX-512 where it has the features."""
    return [1, 2] if gemv.isa(kind) == 2 else [1]


@pytest.fixture(scope="module")
def ext():
    built = gemv.extension()
    if built is None:
        pytest.fail("the kernels did not build on an x86 CPU with AVX2: see the line on stderr")
    return built


def operands(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fp32_and_bf16_kernels_match_torch(ext, m, k, n):
    x, w = operands(m, k, n)
    for level in levels("fp32"):
        assert relative(ext.linear_f32(x, w, level), F.linear(x, w)) < 1e-6
    w16, x16 = w.bfloat16(), x.bfloat16()
    want = F.linear(x16.double(), w16.double()).float()  # the same bf16 operands, summed in double
    for level in levels("bf16"):
        got = ext.linear_bf16(x16 if level == 2 else x16.float(), w16, level)
        assert relative(got, want) < 1e-6


def test_the_model_call_takes_any_leading_shape_dtype_and_bias(ext):
    """ops.linear is F.linear as a model calls it: (B, T, K) in fp32 or bf16, a bias, the result in x's dtype."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 3, 96, generator=g), torch.randn(40, 96, generator=g) * 0.05
    bias = torch.randn(40, generator=g)
    for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for level in levels(kind):
            got = ext.linear(x.to(dtype), [w.to(dtype)], bias.to(dtype), level)
            want = F.linear(x.to(dtype).double(), w.to(dtype).double(), bias.to(dtype).double())
            assert got.shape == (2, 3, 40) and got.dtype == dtype
            assert relative(got.double(), want) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_the_model_call_converts_x_where_the_body_reads_another_dtype_or_layout(ext):
    """x is read in place where it is already as the body reads it, else converted without a dispatch: fp32 x
    against bf16 weights on AVX-512 is rounded to bf16 (as `to` rounds), bf16 x on AVX2 widened; a non-contiguous
    x (a transposed view) is read in its logical order. The result keeps x's dtype and leading shape."""
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(24, 64, generator=g) * 0.05).bfloat16()
    x = torch.randn(3, 2, 64, generator=g).transpose(0, 1)  # (2, 3, 64), not contiguous
    assert not x.is_contiguous()
    for dtype in (torch.float32, torch.bfloat16):
        for level in levels("bf16"):
            got = ext.linear(x.to(dtype), [w], None, level)
            read = x.to(dtype).bfloat16() if level == 2 else x.to(dtype).float()  # what the body multiplies
            want = F.linear(read.double(), w.double())
            assert got.shape == (2, 3, 24) and got.dtype == dtype
            assert relative(got.double(), want) < (1e-6 if dtype == torch.float32 else 1e-2)
    q = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=g)
    scales = torch.rand(32, 1, generator=g).half().float()
    tiled = tile_for_kernels(q, scales, 8)
    for level in levels("int"):
        as_fp32 = ext.linear_int_tiles(x.contiguous(), [tiled[0]], [tiled[1]], 64, 8, level)
        from_bf16 = ext.linear_int_tiles(x.bfloat16(), [tiled[0]], [tiled[1]], 64, 8, level)
        assert from_bf16.dtype == torch.bfloat16 and from_bf16.shape == (2, 3, 32)
        widened = ext.linear_int_tiles(x.bfloat16().float(), [tiled[0]], [tiled[1]], 64, 8, level)
        assert torch.equal(from_bf16, widened.bfloat16())  # bf16 x widened exactly, the result rounded once
        assert torch.equal(ext.linear_int_tiles(x, [tiled[0]], [tiled[1]], 64, 8, level), as_fp32)


def test_one_call_for_several_weights_gives_each_ones_output_side_by_side(ext):
    """Several weights of one input in one call (q, k and v): the outputs of one call each, bit for bit, side by
    side; the integer kernels quantize the activations once for all of them."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 1, 96, generator=g)
    weights = [torch.randn(n, 96, generator=g) * 0.05 for n in (64, 16, 16)]
    bias = torch.randn(96, generator=g)
    for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for level in levels(kind):
            ws = [w.to(dtype) for w in weights]
            fused = ext.linear(x.to(dtype), ws, bias.to(dtype), level)
            alone = torch.cat([ext.linear(x.to(dtype), [w], b, level)
                               for w, b in zip(ws, bias.to(dtype).split([64, 16, 16]))], dim=-1)
            assert fused.shape == (1, 1, 96) and torch.equal(fused, alone)
    for bits, group in ((8, 96), (4, 32)):
        tiles = [tiled_operands(*quantize_weight(w, bits, group), bits) for w in weights]
        stored, scales = [q for q, _ in tiles], [s for _, s in tiles]
        op = functools.partial(ext.linear_int_tiles, group=group, bits=bits)
        for level in levels("int"):
            fused = op(x, stored, scales, isa=level)
            alone = torch.cat([op(x, [q], [s], isa=level) for q, s in zip(stored, scales)], -1)
            assert torch.equal(fused, alone), (bits, level)
    with pytest.raises(RuntimeError, match="one dtype"):
        ext.linear(x, [weights[0], weights[1].bfloat16()], None, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,length,d_head",
                         [(1, 4, 4, 1, 32), (2, 9, 3, 37, 64), (1, 8, 1, 130, 128), (1, 6, 2, 19, 36)])
def test_decode_attention_matches_sdpa(ext, dtype, batch, heads, kv_heads, length, d_head):
    """One query per sequence over a KV cache's first `length` slots (a view of a longer buffer, as the cache hands
    it over), grouped-query heads included, key counts and head sizes that fill no whole vector: torch's SDPA on the
    same operands, in fp64."""
    g = torch.Generator().manual_seed(length)
    q = torch.randn(batch, heads, 1, d_head, generator=g).to(dtype)
    cache_k, cache_v = (torch.randn(batch, kv_heads, length + 7, d_head, generator=g).to(dtype) for _ in range(2))
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]
    repeat = heads // kv_heads
    want = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(repeat, 1),
                                          v.double().repeat_interleave(repeat, 1), scale=0.3)
    for level in levels("fp32"):
        got = ext.decode_attention(q, k, v, 0.3, level)
        assert got.shape == q.shape and got.dtype == dtype
        assert relative(got.double(), want) < (1e-6 if dtype == torch.float32 else 1e-2), level
    with torch.no_grad():  # the model's entry: the kernel where it applies, torch's SDPA where not (a mask)
        assert relative(gemv.attention(q, k, v, scale=0.3, enable_gqa=repeat > 1).double(), want) < 1e-2
        mask = torch.zeros(1, 1, 1, length, dtype=dtype)
        assert relative(gemv.attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=repeat > 1).double(), want) < 1e-2


def quantize_weight(w: torch.Tensor, bits: int, group: int):
    scales = symmetric_scales(w, group, bits)
    q = (w.reshape(w.shape[0], -1, group) / scales[..., None]).round().clamp(*qrange(bits))
    return q.reshape(w.shape).to(torch.int8), scales


def tiled_operands(q: torch.Tensor, scales: torch.Tensor, bits: int):
    """Integers (N, K) and scales as the tile bodies read them: int8 bytes or packed int4, in tile_rows's layout."""
    return tile_rows(pack_int4(q) if bits == 4 else q, scales.float(), bits)


def blockwise_int8(x: torch.Tensor) -> torch.Tensor:
    """The activations as the kernels see them: int8 per block of 32, scale = absmax / 127, back in floats."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(scale > 0, scale, 1)) * scale).reshape(x.shape)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 96)])
def test_integer_kernels_match_dequantize_then_matmul(ext, m, k, n, bits, group):
    """Exact against the same quantized activations times the dequantized weight (integer sums are exact), and within
    2% of the unquantized activations' product (what the activation blocks cost)."""
    group = group or k  # int8: one scale per output row
    if k % group:
        pytest.skip("the group does not divide the inputs")
    x, w = operands(m, k, n, seed=bits)
    q, scales = quantize_weight(w, bits, group)
    weight = dequantize(q, scales, group).double()
    exact = F.linear(blockwise_int8(x).double(), weight).float()
    plain = F.linear(x.double(), weight).float()
    tiled, tiled_scales = tiled_operands(q, scales, bits)
    assert torch.equal(tiled_scales.half().float(), tiled_scales)  # symmetric_scales gives fp16 values
    for level in levels("int"):  # whole tiles of 16 rows, then the rest row by row
        for held in (tiled_scales, tiled_scales.half()):  # an older directory's fp32 scales, or fp16
            got = ext.linear_int_tiles(x, [tiled], [held], group, bits, level)
            assert relative(got, exact) < 1e-5
            assert relative(got, plain) < 0.02


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,group", [(5, 64, 32), (16, 32, 32), (33, 128, 64), (771, 256, 128)])
def test_tiles_are_the_row_major_bytes_rearranged(n, k, group, bits):
    """tile_rows places each weight where the tile body reads it (checked against the layout written out by hand)
    and untile_rows gives back every byte and scale; rows past the last whole tile stay as they were."""
    g = torch.Generator().manual_seed(n)
    if bits == 4:
        stored = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        columns = torch.stack((stored & 15, stored >> 4), dim=-1).reshape(n, k)  # nibble of each input, in order
    else:
        stored = columns = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        group = k
    scales = torch.rand(n, k // group, generator=g)
    tiled, tiled_scales = tile_rows(stored, scales, bits)
    assert tiled.shape == stored.shape and tiled.dtype == stored.dtype and tiled_scales.shape == scales.shape
    assert all(torch.equal(a, b) for a, b in zip(untile_rows(tiled, tiled_scales, bits), (stored, scales)))
    whole = n // 16 * 16
    assert torch.equal(tiled[whole:], stored[whole:]) and torch.equal(tiled_scales[whole:], scales[whole:])
    flat, flat_scales = tiled[:whole].flatten(), tiled_scales[:whole].flatten()
    blocks, groups, runs = k // 32, k // group, bits  # int4: 4 runs of 64 bytes a block, int8: 8
    for row in range(whole):
        tile, r = divmod(row, 16)
        for col in range(0, k, 7):
            block, within = divmod(col, 32)
            if bits == 4:  # run i: inputs 4i .. 4i + 3 low, 16 + 4i .. 19 + 4i high
                half, run, byte = within // 16, within % 16 // 4, within % 4
            else:  # run i: inputs 4i .. 4i + 3
                half, run, byte = 0, within // 4, within % 4
            at = flat[((tile * blocks + block) * runs + run) * 64 + r * 4 + byte]
            value = at if bits == 8 else (at >> 4 if half else at & 15)
            assert value == columns[row, col]
        for group_index in range(groups):
            assert flat_scales[(tile * groups + group_index) * 16 + r] == scales[row, group_index]


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("fp16_scales", [True, False])
def test_a_tiled_layer_saves_and_computes_as_before(ext, scheme, fp16_scales):
    """tile_for_gemv changes no saved byte, no dequantized weight and no result of the prompt path (torch's, more
    rows than the kernels take); a state dict loaded into it is row-major again. Scales that are fp16 values
    (symmetric_scales's) are held in fp16; others (an older directory's) stay fp32."""
    x, w = operands(12, 128, 40, seed=5)
    bits, group = (4, 32) if scheme == "int4" else (8, 128)
    q, scales = quantize_weight(w, bits, group)
    if not fp16_scales:
        scales = scales * (1 + 2 ** -20)  # no longer an fp16 value
    layer = QuantizedLinear.from_linear(nn.Linear(128, 40, bias=True), scheme, group, q, scales)
    saved = {name: t.clone() for name, t in layer.state_dict().items()}
    with torch.no_grad():
        prompt, weight = layer(x), layer.dequantized_weight()
        layer.tile_for_gemv()
        assert layer.tiled and not torch.equal(layer.qweight, saved["qweight"])
        assert layer.scales.dtype == (torch.float16 if fp16_scales else torch.float32)
        assert all(torch.equal(t, saved[name]) for name, t in layer.state_dict().items())
        assert torch.equal(layer.dequantized_weight(), weight)
        assert torch.equal(layer(x), prompt)
        want = F.linear(blockwise_int8(x[:1]), weight, layer.bias)
        assert torch.allclose(layer(x[:1]), want, atol=1e-5)  # one row: the tile body
    layer.load_state_dict(saved)
    assert not layer.tiled and torch.equal(layer.qweight, saved["qweight"])
    assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, saved["scales"])


def test_kernels_refuse_what_they_cannot_take(ext):
    """Broken preconditions are errors, never out-of-bounds reads: the Python side only calls within them."""
    x, w = operands(1, 40, 8)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ext.linear_f32(x, w, 1)
    x, w = operands(1, 64, 8)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.linear_f32(x, w.t().contiguous().t(), 1)
    transposed = w.t().contiguous().t()
    assert torch.equal(gemv.linear(x, transposed), F.linear(x, transposed))  # torch's path takes it instead
    with pytest.raises(RuntimeError, match="int8 bytes or uint8 nibbles"):
        ext.linear_int_tiles(x, [torch.zeros(8, 64, dtype=torch.uint8)], [torch.ones(8, 1)], 64, 8, 1)
    q, keys = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 32, 5).transpose(-1, -2)  # a head's positions not in a row
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.decode_attention(q, keys, keys, 1.0, 1)
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        ext.decode_attention(torch.randn(1, 3, 1, 32), torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32), 1.0, 1)
    with torch.no_grad():
        assert torch.equal(gemv.attention(q, keys, keys), F.scaled_dot_product_attention(q, keys, keys))


@pytest.mark.parametrize("shape", [dict(), dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False,
                                                  n_kv_heads=2)])
def test_a_model_readied_for_decoding_computes_the_same(ext, shape):
    """prepare_for_decode changes no name, no saved byte and (within fp32 summation order) no logit; greedy tokens
    are those of the model as built, and a training step still gets gradients through torch's path. GPT-2's and
    Llama's shapes: q, k and v (and gate and up) go through one call each."""
    from llmcli.generation import generate_ids
    from llmcli.models.blocks import Attention, FeedForward

    config = tiny_config("gpt", d_model=128, n_heads=4, d_ff=256, tie_embeddings=True, **shape)
    model = build_model(config, seed=0).eval()
    reference = build_model(config, seed=0).eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    gemv.prepare_for_decode(model)
    assert sum(isinstance(m, gemv.DecodeLinear) for m in model.modules()) == sum(
        type(m) is nn.Linear for m in reference.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    large = [p for p in model.parameters() if p.numel() * 4 >= gemv.ARENA_MIN_BYTES]
    assert large and len({p.untyped_storage().data_ptr() for p in large}) == 1  # gathered into one buffer
    assert all(p.data_ptr() % 64 == 0 for p in large)
    assert all(m.fused_qkv is not None for m in model.modules() if isinstance(m, Attention))
    assert all((m.fused_gate_up is not None) == (m.gate is not None) for m in model.modules()
               if isinstance(m, FeedForward))
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for step in range(1, 3):  # one-row calls: the kernels run
            assert torch.allclose(model(ids[:1, :step]).logits, reference(ids[:1, :step]).logits, atol=1e-5)
        assert torch.equal(generate_ids(model, ids, 8, temperature=0), generate_ids(reference, ids, 8, temperature=0))
    model.train()
    model(ids).logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_quantized_layer_takes_the_kernel_for_few_rows(ext):
    x, w = operands(1, 128, 40, seed=3)
    for scheme, group in (("int8", None), ("int4", 32)):
        bits = 4 if scheme == "int4" else 8
        q, scales = quantize_weight(w, bits, group or 128)
        layer = QuantizedLinear.from_linear(nn.Linear(128, 40, bias=True), scheme, group, q, scales)
        assert not layer._takes_gemv()  # only once held in the kernels' tiles
        layer.tile_for_gemv()  # as prepare_for_decode does
        with torch.no_grad():
            got = layer(x)
            want = F.linear(blockwise_int8(x), layer.dequantized_weight(), layer.bias)
            assert layer._takes_gemv()
            assert torch.allclose(got, want, atol=1e-5), scheme  # block-quantized activations: our kernel's result


def test_a_quantized_models_fused_projections_change_no_logit(ext):
    """An int4 Llama-style model readied for decoding: q, k and v (gate and up) in one call each give the logits of
    one call per layer exactly (the same bodies over the same quantized activations)."""
    from llmcli.compression.quantize import quantize_model
    from llmcli.models.blocks import Attention, FeedForward
    from llmcli.progress import SILENT

    config = tiny_config("gpt", position="rope", norm="rmsnorm", activation="swiglu", bias=False, d_model=128,
                         n_heads=4, n_kv_heads=2, d_ff=256)
    model = build_model(config, seed=0).eval()
    quantize_model(model, "int4", 32, "rtn", True, None, False, SILENT)
    gemv.prepare_for_decode(model)
    assert all(m.tiled == ("int" in gemv.LEVELS) for m in model.modules() if isinstance(m, QuantizedLinear))
    hooked = [m for m in model.modules() if isinstance(m, (Attention, FeedForward))]
    assert all((m.fused_qkv if isinstance(m, Attention) else m.fused_gate_up) is not None for m in hooked)
    ids = torch.randint(0, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fused = model(ids[:, :1]).logits
        for m in hooked:  # back to one call per layer (the class's unset hooks)
            vars(m).pop("fused_qkv", None), vars(m).pop("fused_gate_up", None)
        assert torch.equal(model(ids[:, :1]).logits, fused)


def test_without_kernels_decoding_takes_torchs_path():
    """LLMCLI_KERNELS=0: no build, the present path (matrices stored transposed), provenance says so."""
    code = ("from llmcli.models import build_model, gemv; from conftest import tiny_config\n"
            "m = gemv.prepare_for_decode(build_model(tiny_config('gpt', d_model=64, n_heads=4), seed=0))\n"
            "print(gemv.kernel_name(), any(isinstance(x, gemv.DecodeLinear) for x in m.modules()),"
            " m.tok_emb.weight.t().is_contiguous())")
    env = {**os.environ, "LLMCLI_KERNELS": "0", "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "(llmcli's", "kernels", "off)", "False", "True"]
    assert "compiling" not in out.stderr


def test_a_failed_build_is_one_line_and_torchs_path(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "gemv.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(gemv, "SOURCE", broken)
    gemv.extension.cache_clear()
    try:
        assert gemv.extension() is None
        x, w = operands(1, 64, 8)
        assert torch.equal(gemv.linear(x, w), F.linear(x, w))
    finally:
        gemv.extension.cache_clear()
    err = capsys.readouterr().err
    assert "did not build" in err and "torch's path" in err and "Traceback" not in err


def test_the_compiled_decode_step_generates_what_eager_does(ext):
    """compile_decode: the decode step exported and compiled as one graph with our ops in it gives the eager model's
    logits and greedy tokens, for prompts of other lengths (one token too) and cache sizes, without compiling again
    (the length and the cache's size are symbols) and without torch.compile's guarded path; a padded batch takes
    that path and decodes as eager does too; a full cache is the eager model's error."""
    from torch._dynamo.utils import counters

    from llmcli.errors import UserError
    from llmcli.generation import generate_ids
    from llmcli.runtime import compile_decode

    config = tiny_config("gpt", position="rope", norm="rmsnorm", activation="swiglu", bias=False, d_model=64,
                         n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2)
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms off their fresh ones
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.1)
    model = gemv.prepare_for_decode(model)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, config.vocab_size, (1, n), generator=g) for n in (5, 9, 1)]
    padded = (torch.randint(0, config.vocab_size, (2, 6), generator=g), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]))
    eager = [generate_ids(model, p, 12, temperature=0) for p in prompts]
    eager_padded = generate_ids(model, padded[0], 6, attention_mask=padded[1], temperature=0)
    with torch.no_grad():
        caches = [model.new_cache(1, 7) for _ in range(2)]
        for cache in caches:
            model(prompts[0], cache=cache)
        token = prompts[0][:, -1:]
        want = model(token, cache=caches[0]).logits
    assert compile_decode(model, torch.device("cpu"), print)
    counters.clear()
    with torch.no_grad():
        got = model.decode_forward(token, cache=caches[1]).logits
        assert caches[1].length == caches[0].length == 6
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        model.decode_forward(token, cache=caches[1])  # the last free slot
        with pytest.raises(UserError, match="KV cache full"):
            model.decode_forward(token, cache=caches[1])
    assert all(torch.equal(generate_ids(model, p, 12, temperature=0), want) for p, want in zip(prompts, eager))
    assert list(model.decode_forward.graphs.values()) != [None] and len(model.decode_forward.graphs) == 1
    assert counters["stats"]["unique_graphs"] == 0  # torch.compile's path did not run
    assert torch.equal(generate_ids(model, padded[0], 6, attention_mask=padded[1], temperature=0), eager_padded)
    assert counters["stats"]["unique_graphs"] == 1


def test_the_compiled_decode_step_reads_the_models_weights_and_is_cached(ext, monkeypatch):
    """On the CPU the step is compiled ahead of time: it reads the model's own weights in place (a weight changed
    after compiling changes its logits as it does the eager model's), and the package is kept in the user's cache, so
    that a second model of the same shapes loads it instead of compiling."""
    from llmcli.config import user_cache_dir
    from llmcli.generation import generate_ids
    from llmcli.runtime import compile_decode

    config = tiny_config("gpt", position="rope", norm="rmsnorm", activation="swiglu", bias=False, d_model=64,
                         n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2)  # the test above's: one compile for both
    prompt = torch.randint(0, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))

    def ready(seed):
        model = gemv.prepare_for_decode(build_model(config, seed=seed).eval())
        eager = generate_ids(model, prompt, 8, temperature=0)
        assert compile_decode(model, torch.device("cpu"), print)
        return model, eager

    def next_logits(model, step):
        with torch.no_grad():
            cache = model.new_cache(1, 8)
            model(prompt[:, :-1], cache=cache)
            return step(prompt[:, -1:], cache=cache).logits

    model, eager = ready(seed=0)
    assert torch.equal(generate_ids(model, prompt, 8, temperature=0), eager)
    assert list(model.decode_forward.graphs.values()) != [None]
    assert list((user_cache_dir() / "decode_steps").glob("*.pt2"))
    compiled_before = next_logits(model, model.decode_forward)
    with torch.no_grad():
        model.decoder.blocks[0].ff.up.weight.mul_(-3.0)  # in place, after compiling
    compiled, eager_logits = next_logits(model, model.decode_forward), next_logits(model, model)
    assert not torch.allclose(compiled, compiled_before, atol=1e-3)
    torch.testing.assert_close(compiled, eager_logits, rtol=1e-4, atol=1e-5)

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiling)
    second, eager = ready(seed=1)  # other weights, the same shapes: the cached package
    assert torch.equal(generate_ids(second, prompt, 8, temperature=0), eager)
    assert list(second.decode_forward.graphs.values()) != [None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_argmax_picks_what_torch_picks(ext, dtype):
    """gemv.argmax is torch.argmax over the last dim: random rows of many widths (a tail past 16, a row of a larger
    tensor), ties (the first index), NaN (the first NaN), all -inf (index 0)."""
    g = torch.Generator().manual_seed(0)
    for width in (1, 5, 16, 17, 49_152, 50_257):
        logits = torch.randn(3, 2, width, generator=g).to(dtype)[:, -1]  # rows 2V apart, each contiguous
        assert torch.equal(gemv.argmax(logits), logits.argmax(-1))
    special = torch.zeros(3, 100, dtype=dtype)
    special[0, 40] = special[0, 70] = 1  # a tie
    special[1, 10], special[1, 33], special[1, 80] = float("inf"), float("nan"), float("nan")
    special[2] = float("-inf")
    assert gemv.argmax(special).tolist() == special.argmax(-1).tolist() == [40, 33, 0]
