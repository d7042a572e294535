"""`llmcli convert to-gguf`: read back with the gguf package's own reader (names, shapes, values, metadata)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from llmcli.interop.to_gguf import gguf_tensors, interleave_rotary_rows
from llmcli.model_dir import save_model
from llmcli.models import build_model

gguf = pytest.importorskip("gguf")

LLAMA = dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False, n_kv_heads=2, tie_embeddings=False,
             d_model=64, d_ff=128, vocab_size=128)
GPT2 = dict(position="learned", norm="layernorm", activation="gelu_tanh", d_model=64, d_ff=128, vocab_size=128)
# Largest error relative to each row's largest weight: half a step of each format (Q8_0: amax/127 per block of 32,
# Q4_0: a full step, amax/8, where its asymmetric range clamps), with room for the scale rounded to fp16
TOLERANCE = {"f32": 0.0, "f16": 5e-4, "bf16": 4e-3, "q8_0": 4.5e-3, "q4_0": 0.13}


def read_back(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        [int(n) for n in reversed(t.shape)])) for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_to_gguf_reads_back_as_written(tmp_path, cli, layout, gguf_type):
    config = tiny_config("gpt", **(LLAMA if layout == "llama" else GPT2))
    model = build_model(config, seed=0)
    with torch.no_grad():  # fresh norms are all ones: spread them so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.normal_(1.0, 0.2)
    (tmp_path / "m").mkdir()
    save_model(model, tmp_path / "m")
    result = cli("convert", "to-gguf", tmp_path / "m", tmp_path / "m.gguf", "--type", gguf_type, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["architecture"] == layout
    fields, tensors = read_back(tmp_path / "m.gguf")
    assert fields["general.architecture"] == layout
    assert fields[f"{layout}.block_count"] == config.n_layers and fields[f"{layout}.embedding_length"] == 64
    if layout == "llama":
        assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.freq_base"] == config.rope_base
    assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size
    expected = gguf_tensors(model, layout)
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        kind, got = tensors[name]
        assert tuple(got.shape) == tuple(want.shape), name
        if want.dim() == 1 or name == "position_embd.weight":
            assert kind == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want.numpy()), name
            continue
        assert kind.name.lower() == gguf_type, name
        scale = want.abs().amax(dim=1, keepdim=True).numpy()
        assert (np.abs(got - want.numpy()) / scale).max() <= TOLERANCE[gguf_type], name


def test_llama_rotary_rows_are_interleaved_pairs():
    """Row j of head h goes from [x_0 .. x_{d/2-1} | y_0 .. y_{d/2-1}] to [x_0, y_0, x_1, y_1, ...]."""
    weight = torch.arange(2 * 8).float().reshape(2 * 8, 1)  # 2 heads of 8 rows: row index as value
    got = interleave_rotary_rows(weight, heads=2).flatten().tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("overrides, message", [
    (dict(LLAMA, qk_norm="head"), "llama.cpp's llama layout has no place for qk_norm = 'head'"),
    (dict(LLAMA, sliding_window=8), "sliding_window = 8"),
    (dict(LLAMA, n_experts=4, experts_per_token=2), "n_experts = 4"),  # a mixture of experts
    (dict(position="relative"), "writes GPT-2 (learned positions) and Llama-style (rotary) decoders"),
])
def test_what_llama_cpp_layouts_cannot_hold_is_exit_2(tmp_path, cli, overrides, message):
    (tmp_path / "m").mkdir()
    save_model(build_model(tiny_config("gpt", **overrides), seed=0), tmp_path / "m")
    result = cli("convert", "to-gguf", tmp_path / "m", tmp_path / "m.gguf")
    assert result.exit_code == 2 and message in result.stderr and not (tmp_path / "m.gguf").exists()
