"""Quantization: error bounds of int8/int4, exact int4 packing, logits close to the original, exact save/load
round-trip without fp32 weights, CPU kernels agree with the reference, GPTQ beats round-to-nearest, the CLI."""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
import torch.nn as nn
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from llmcli.compression.gptq import gptq_quantize
from llmcli.compression.quantize import quantize_model, quantize_rtn
from llmcli.models.quantized import (QuantizedLinear, _fbgemm_available, apply_quantized_layout, dequantize, pack_int4,
                                    unpack_int4)
from llmcli.errors import UserError
from llmcli.training.run import TrainFlags
from llmcli.model_dir import QUANTIZATION_FILE, load_model, save_model, write_json
from llmcli.models import build_model, build_on_meta
from conftest import one_thread, tiny_config

SCHEMES = ("int8", "int4", "int8-dynamic")
TINY_TOML = ('name = "tiny-gpt"\nfamily = "gpt"\nvocab_size = 320\nd_model = 64\nn_layers = 2\nn_heads = 2\n'
             'd_ff = 128\nmax_seq_len = 64\ndropout = 0.0\n')


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


def gaussian(*shape, seed=0, std=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def family_inputs(family: str, seed: int = 0) -> tuple[torch.Tensor, dict]:
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(seed))
    return ids, ({"decoder_input_ids": ids} if family == "t5" else {})


# ---------------------------------------------------------------- the numbers


def test_int8_error_is_at_most_half_a_step_per_output_channel():
    weight = gaussian(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitude
    q, scales = quantize_rtn(weight, weight.shape[1], bits=8)
    assert q.dtype == torch.int8 and scales.shape == (48, 1)
    error = (weight - dequantize(q, scales, weight.shape[1])).abs()
    assert (error <= scales / 2 * (1 + 1e-5)).all()
    assert (q.abs().amax(1) == 127).all()  # each row's largest weight uses the full range


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group_size):
    weight = gaussian(16, 256) * torch.logspace(-2, 1, 256)  # columns of very different magnitude
    q, scales = quantize_rtn(weight, group_size, bits=4)
    assert scales.shape == (16, 256 // group_size) and q.min() >= -8 and q.max() <= 7
    error = (weight - dequantize(q, scales, group_size)).abs().reshape(16, -1, group_size)
    assert (error <= scales[..., None] / 2 * (1 + 1e-5)).all()
    coarser = quantize_rtn(weight, 256, bits=4)
    assert error.mean() < (weight - dequantize(*coarser, 256)).abs().mean()  # smaller groups, finer steps


def test_int4_packing_round_trips_exactly_two_values_per_byte():
    q = torch.randint(-8, 8, (32, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 32)
    assert torch.equal(unpack_int4(packed), q)
    assert pack_int4(torch.tensor([[-8, 7]], dtype=torch.int8)).item() == 0xF0  # even column in the low nibble


def test_all_zero_groups_quantize_to_zero():
    weight = torch.zeros(4, 64)
    weight[0, :32] = gaussian(32)
    q, scales = quantize_rtn(weight, 32, bits=4)
    assert torch.isfinite(scales).all() and (q[1:] == 0).all() and (q[0, 32:] == 0).all()


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_quantized_logits_stay_close_to_the_original(family):
    model = build_model(tiny_config(family, d_model=128, d_ff=256), seed=0).eval()
    ids, extra = family_inputs(family)
    with torch.no_grad():
        reference = model(ids, **extra).logits
        errors = {}
        for scheme in SCHEMES:
            quantized = copy.deepcopy(model)
            spec, layer_errors = quantize_model(quantized, scheme, 32)
            assert all(isinstance(quantized.get_submodule(n), QuantizedLinear) for n in spec["layers"])
            logits = quantized(ids, **extra).logits
            errors[scheme] = ((logits - reference).norm() / reference.norm()).item()
    # measured: int8 <= 1.5%, int8-dynamic <= 9%, int4 (groups of 32) <= 20%
    assert errors["int8"] < 0.03 and errors["int8-dynamic"] < 0.15 and errors["int4"] < 0.3
    assert errors["int8"] < errors["int8-dynamic"] and errors["int8"] < errors["int4"]


def test_embeddings_and_head_stay_full_precision_unless_asked():
    model = build_model(tiny_config("gpt", tie_embeddings=False), seed=0)
    spec, _ = quantize_model(model, "int8")
    assert isinstance(model.lm_head, nn.Linear) and model.tok_emb.weight.dtype == torch.float32
    assert all(".blocks." in name for name in spec["layers"])

    tied = build_model(tiny_config("gpt"), seed=0).eval()
    ids, _ = family_inputs("gpt")
    reference = tied(ids).logits.detach()
    spec, _ = quantize_model(tied, "int8", include_head=True)
    assert isinstance(tied.lm_head, QuantizedLinear) and "lm_head" in spec["layers"]
    assert not tied.config.tie_embeddings and tied.tok_emb.weight.dtype == torch.float32
    assert torch.allclose(tied(ids).logits, reference, atol=0.05 * reference.abs().max())


def test_t5_head_untied_keeps_its_logits():
    model = build_model(tiny_config("t5"), seed=0).eval()
    ids, extra = family_inputs("t5")
    reference = model(ids, **extra).logits.detach()
    from llmcli.models.quantized import untie_head

    untie_head(model)
    assert not model.config.tie_embeddings
    assert torch.allclose(model(ids, **extra).logits, reference, atol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_and_load_give_identical_logits_without_fp32_weights(tmp_path, scheme):
    model = build_model(tiny_config("gpt", d_model=64, d_ff=128), seed=0).eval()
    spec, _ = quantize_model(model, scheme, 32)
    save_model(model, tmp_path)
    write_json(tmp_path / QUANTIZATION_FILE, spec)
    ids, _ = family_inputs("gpt")

    with mock.patch.object(QuantizedLinear, "dequantized_weight", side_effect=AssertionError("expanded on load")):
        loaded = load_model(tmp_path)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name in spec["layers"]:
        layer = loaded.get_submodule(name)
        assert isinstance(layer, QuantizedLinear) and not hasattr(layer, "weight")
        assert layer.qweight.dtype == (torch.uint8 if scheme == "int4" else torch.int8)
        assert layer.qweight.device.type == "cpu"
    assert loaded.state_dict().keys() == model.state_dict().keys()

    halved = load_model(tmp_path, dtype=torch.bfloat16)  # a dtype move casts floats, never the integers
    layer = halved.get_submodule(spec["layers"][0])
    assert layer.qweight.dtype == (torch.uint8 if scheme == "int4" else torch.int8)
    assert layer.scales.dtype == torch.bfloat16 and halved.tok_emb.weight.dtype == torch.bfloat16
    assert torch.isfinite(halved(ids).logits).all()


def test_a_layout_that_does_not_fit_the_model_is_refused():
    model = build_on_meta(tiny_config("gpt"))
    with pytest.raises(UserError, match="not a linear layer of this model"):
        apply_quantized_layout(model, {"scheme": "int8", "group_size": None, "layers": ["decoder.blocks.7.ff.up"]})
    with pytest.raises(UserError, match="scheme"):
        apply_quantized_layout(model, {"scheme": "int3", "layers": []})


def test_integer_weights_of_the_wrong_dtype_are_refused(tmp_path):
    model = build_model(tiny_config("gpt"), seed=0)
    spec, _ = quantize_model(model, "int8")
    save_model(model, tmp_path)
    write_json(tmp_path / QUANTIZATION_FILE, {**spec, "scheme": "int8-dynamic"})
    load_model(tmp_path)  # same storage, another forward: fine
    write_json(tmp_path / QUANTIZATION_FILE, {**spec, "scheme": "int4", "group_size": 32})
    with pytest.raises(UserError, match="mixes files"):
        load_model(tmp_path)


# ---------------------------------------------------------------- compute paths


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(128, 64), (768, 3072), (128, 100)])  # 100 outputs: int4 packs rows by 16
def test_cpu_kernels_equal_dequantize_then_matmul(scheme, shape):
    """bf16 and fp32 activations both run ATen's packed kernels (fp32 cast to bf16 and back), within bf16's
    precision of the dequantized fp32 matmul; the portable reference path is exact."""
    linear = nn.Linear(*shape)
    nn.init.normal_(linear.weight, 0, 0.05)
    q, scales = quantize_rtn(linear.weight, 32 if scheme == "int4" else shape[0], 4 if scheme == "int4" else 8)
    layer = QuantizedLinear.from_linear(linear, scheme, 32, q, scales)
    x = gaussian(5, shape[0], seed=1)
    want = F.linear(x, layer.dequantized_weight(), linear.bias)
    for dtype in (torch.bfloat16, torch.float32):
        got = layer(x.to(dtype))
        assert got.dtype == dtype
        assert layer._kernel is not None and layer._kernel[1] is not None, f"the ATen kernel was refused ({dtype})"
        assert (got.float() - want).norm() < 5e-3 * want.norm()  # bf16 keeps 8 bits: about 3e-3 measured
    assert torch.allclose(layer._reference(x) + linear.bias, want, atol=1e-5)


def test_int8_dynamic_quantizes_activations_and_stays_close():
    linear = nn.Linear(128, 64)
    q, scales = quantize_rtn(linear.weight, 128, 8)
    layer = QuantizedLinear.from_linear(linear, "int8-dynamic", None, q, scales)
    x = gaussian(7, 128, seed=2)
    weight_only = F.linear(x, layer.dequantized_weight(), linear.bias)
    reference = layer._dynamic_reference(x) + linear.bias
    assert not torch.allclose(reference, weight_only, atol=1e-5)  # activations really are quantized
    assert (reference - weight_only).norm() < 0.02 * weight_only.norm()
    if _fbgemm_available():
        got = layer(x)
        assert layer._kernel[1] is not None, "fbgemm's dynamic linear was refused"
        assert (got - weight_only).norm() < 0.03 * weight_only.norm()


# ---------------------------------------------------------------- GPTQ


def correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    mix = gaussian(features, features, seed=seed + 1) / features ** 0.5
    scale = torch.logspace(-1, 1, features)[torch.randperm(features, generator=torch.Generator().manual_seed(seed))]
    return gaussian(n, features, seed=seed) @ mix * scale


@pytest.mark.parametrize("bits, group_size, act_order", [(4, 32, False), (4, 128, False), (4, 32, True),
                                                         (8, None, False)])
def test_gptq_has_lower_output_error_than_round_to_nearest(bits, group_size, act_order):
    x = correlated_inputs(1024, 256)
    weight = gaussian(64, 256, seed=3)
    hessian = 2 * x.t() @ x / x.shape[0]
    size = group_size or 256
    rtn = dequantize(*quantize_rtn(weight, size, bits), size)
    q, scales = gptq_quantize(weight, hessian, bits, group_size, act_order)
    assert q.dtype == torch.int8 and scales.shape == (64, 256 // size)
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    gptq = dequantize(q, scales, size)
    rtn_error, gptq_error = ((weight - rtn) @ x.t()).norm(), ((weight - gptq) @ x.t()).norm()
    assert gptq_error < 0.85 * rtn_error


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_gptq_on_a_model_beats_round_to_nearest_on_its_calibration_data(family):
    """Block by block, with the encoder's output feeding T5's cross-attention, heads included."""
    model = build_model(tiny_config(family, d_model=64, d_ff=128), seed=0).eval()
    batches = []
    for i in range(3):
        ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(i))
        batches.append({"input_ids": ids, **({"decoder_input_ids": ids} if family == "t5" else {})})

    def logits(m, batch):
        return m(batch["input_ids"], **{k: v for k, v in batch.items() if k != "input_ids"}).logits

    with torch.no_grad():
        reference = [logits(model, b) for b in batches]
        errors = {}
        for method in ("rtn", "gptq"):
            quantized = copy.deepcopy(model)
            spec, layer_errors = quantize_model(quantized, "int4", 32, method, include_head=True, calibration=batches)
            errors[method] = sum((logits(quantized, b) - r).norm() for b, r in zip(batches, reference))
    assert spec["method"] == "gptq" and set(layer_errors) == set(spec["layers"]) and "lm_head" in spec["layers"]
    assert all("output_rel_error" in e for e in layer_errors.values())
    assert errors["gptq"] < errors["rtn"]


def test_gptq_without_calibration_data_is_refused():
    with pytest.raises(UserError, match="calibration"):
        quantize_model(build_model(tiny_config("gpt"), seed=0), "int4", 32, "gptq", calibration=None)


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> str:
    """A tiny GPT trained for a few dozen steps on the embedded corpus (with its tokenizer)."""
    from llmcli.training.pretrain import pretrain

    root = tmp_path_factory.mktemp("quantize")
    (root / "tiny-gpt.toml").write_text(TINY_TOML)
    run = root / "run"
    pretrain(str(root / "tiny-gpt.toml"), None, str(run),
             TrainFlags(steps=40, batch_size=8, seq_len=32, log_every=20, eval_batches=2), log=lambda *a, **k: None)
    return str(run)


@pytest.fixture(scope="module")
def cli_app():
    """The real app once `quantize` is registered there, else one holding just this command."""
    from llmcli.cli import _Group, app
    from llmcli.cli.quantize import quantize

    if any(command.name == "quantize" for command in app.registered_commands):
        return app
    local = typer.Typer(cls=_Group)
    local.callback()(lambda: None)
    local.command("quantize")(quantize)
    return local


def run_cli(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_writes_a_quantized_directory_that_eval_and_generate_use(trained_dir, cli_app, cli, tmp_path):
    out = tmp_path / "int4"
    result = run_cli(cli_app, "quantize", trained_dir, "--scheme", "int4", "--group-size", "32", "--method", "gptq",
                     "--calibration-batches", "2", "--no-speed", "--json", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    spec = json.loads((out / QUANTIZATION_FILE).read_text())
    assert spec["scheme"] == "int4" and spec["group_size"] == 32 and spec["method"] == "gptq"
    assert spec["calibration"]["batches"] == 2 and len(spec["layers"]) == 12
    quant = report["quantization"]
    assert quant["layers"] == 12 and set(quant["layer_errors"]) == set(spec["layers"])
    assert report["change"]["linear_size_ratio"] > 5.5  # int4 + fp32 scales per 32 + fp32 bias
    assert abs(report["change"]["perplexity_change"]) < 0.05
    assert json.loads((out / "compression.json").read_text())["quantization"]["scheme"] == "int4"

    evaluated = cli("eval", out, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["perplexity"] > 1
    generated = cli("generate", out, "--prompt", "The", "--max-new-tokens", "5", "--temperature", "0", "--json")
    assert generated.exit_code == 0, generated.output
    assert len(json.loads(generated.stdout)["tokens"]) == 5
    estimate = cli("memory-estimate", out, "--mode", "infer", "--json")  # the weights as stored, not as fp32
    assert estimate.exit_code == 0, estimate.output
    stored = sum(t.numel() * t.element_size() for t in load_file(out / "model.safetensors").values())
    assert json.loads(estimate.stdout)["breakdown"]["weights"] == stored


def test_cli_human_report_and_include_head(trained_dir, cli_app, tmp_path):
    out = tmp_path / "int8"
    result = run_cli(cli_app, "quantize", trained_dir, "--scheme", "int8", "--include-head", "--no-speed",
                     "--out", out)
    assert result.exit_code == 0, result.output
    assert "linear weights" in result.stdout and "perplexity" in result.stdout
    assert "lm_head" in json.loads((out / QUANTIZATION_FILE).read_text())["layers"]
    assert json.loads((out / "config.json").read_text())["tie_embeddings"] is False
    assert isinstance(load_model(out).lm_head, QuantizedLinear)


@pytest.mark.parametrize("args, message", [
    (["--scheme", "int3"], "--scheme 'int3' is unknown"),
    (["--scheme", "int4", "--group-size", "48"], "--group-size 48 is not supported"),
    (["--scheme", "int4", "--group-size", "128"], "64 input features are not a multiple of --group-size 128; "
                                                  "use --group-size 32 or 64"),
    (["--scheme", "int8", "--method", "awq"], "--method 'awq' is unknown"),
    (["--scheme", "int8", "--group-size", "64"], "--group-size is for int4 only"),
    (["--scheme", "int4"], "64 input features are not a multiple of --group-size 128"),  # the default
    (["--scheme", "int4", "--group-size", "32", "--calibration-data", "/nonexistent/calib.txt"], "no such file"),
    (["--scheme", "int4", "--group-size", "32", "--method", "rtn", "--calibration-data", "x.txt"],
     "only used by --method gptq"),
])
def test_cli_bad_input_exits_2_with_a_message(trained_dir, cli_app, tmp_path, args, message):
    result = run_cli(cli_app, "quantize", trained_dir, *args, "--no-speed", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_quantize_a_quantized_model(trained_dir, cli_app, tmp_path):
    first = tmp_path / "once"
    assert run_cli(cli_app, "quantize", trained_dir, "--scheme", "int8", "--no-speed", "--out", first).exit_code == 0
    result = run_cli(cli_app, "quantize", first, "--scheme", "int4", "--no-speed", "--out", tmp_path / "twice")
    assert result.exit_code == 2 and "already quantized" in result.stderr
