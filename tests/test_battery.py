"""Every compressed model, loaded from disk, through every command that reads a model: one child process per
output, so a crash fails its case (tests/battery.py holds the cases). And the packed kernels' operands, placed at
the addresses that crashed them before."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import battery


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, corpus) -> dict:
    return battery.prepare(tmp_path_factory.mktemp("battery"), corpus)


@pytest.mark.parametrize("output", list(battery.outputs()))
def test_every_command_runs_on_a_compressed_model_from_disk(compressed, corpus, output):
    records = battery.run_output(output, compressed[output], corpus)
    failures = [f"{r['command']}: {battery.verdict(r)}\n{r['tail']}" for r in records if battery.verdict(r)]
    assert not failures, "\n".join(failures)
    assert [r["command"] for r in records] == list(battery.commands())
    results = {r["command"]: json.loads(r["stdout"]) if r["stdout"] else None for r in records}
    assert 1 < results["eval"]["perplexity"] < 1e4 and math.isfinite(results["eval"]["loss"])
    assert results["generate"]["prompt_tokens"] >= 200 and results["generate"]["new_tokens"] == 16
    for mode in ("bench prefill", "bench decode"):
        assert results[mode] and all(row["tokens_per_s"] > 0 for row in results[mode])
        assert "AVX2" in results[mode][0]["provenance"]["cpu_features"] or sys.platform != "linux" or \
            os.uname().machine != "x86_64"
    assert results["memory --measure"]["measured_bytes"] > 0


MISALIGNED = """
import sys, torch
import torch.nn as nn, torch.nn.functional as F
from llmcli.compression.quantize import quantize_rtn
from llmcli.models.quantized import QuantizedLinear

def misplaced(t, offset):
    # a copy of t starting `offset` bytes past a 64-byte boundary, as a tensor read from a safetensors file
    nbytes = t.numel() * t.element_size()
    buffer = torch.empty(nbytes + 128, dtype=torch.uint8)
    start = -buffer.data_ptr() % 64 + offset
    return buffer[start:start + nbytes].view(t.dtype).view(t.shape).copy_(t)

scheme, in_features, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
linear = nn.Linear(in_features, 256)
group = 32 if scheme == "int4" else in_features
q, scales = quantize_rtn(linear.weight, group, 4 if scheme == "int4" else 8)
layer = QuantizedLinear.from_linear(linear, scheme, group, q, scales)
layer.qweight = misplaced(layer.qweight, 8)
assert layer.qweight.data_ptr() % 64 == 8
x = torch.randn(rows, in_features)
want = F.linear(x, layer.dequantized_weight(), linear.bias)
for dtype in (torch.bfloat16, torch.float32):
    activations = misplaced(x.to(dtype), 8)
    with torch.no_grad():
        got = layer(activations).float()
    error = ((got - want).norm() / want.norm()).item()
    assert error < 0.02, (scheme, dtype, error)
print("kernel" if layer._kernel[1] is not None else "reference")
"""


@pytest.mark.parametrize("dispatch", [None, "avx2", "default"])
@pytest.mark.parametrize("scheme, in_features, kernel", [("int8", 128, True), ("int8", 136, False),
                                                          ("int4", 128, True), ("int8-dynamic", 128, None)])
def test_kernels_take_weights_and_activations_at_any_address(scheme, in_features, kernel, dispatch):
    """A weight and activations 8 bytes past a 64-byte boundary, 8 rows: this crashed ATen's AVX-512 int8 kernel
    (SIGSEGV) before the layer aligned its operands; 136 input features (not whole steps of 16) read past the rows.
    Run under each of torch's x86 dispatch levels, as on an AVX-512, an AVX2-only and an older CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"ATEN_CPU_CAPABILITY": dispatch} if dispatch else {})}
    child = subprocess.run([sys.executable, "-c", MISALIGNED, scheme, str(in_features), "8"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert child.returncode == 0, f"exit {child.returncode}\n{child.stderr[-2000:]}"
    if kernel is not None and dispatch is None:  # the fix keeps the packed kernel where it is safe
        assert child.stdout.strip() == ("kernel" if kernel else "reference")
