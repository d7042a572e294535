"""memory-estimate: reference figures, the activation ledger against autograd, invariants, CLI and --measure."""

import json
import time

import pytest
import torch
from conftest import tiny_config

from llmcli.errors import UserError
from llmcli.finetune.lora import add_lora
from llmcli.model_dir import resolve_config
from llmcli.models import build_model
from llmcli.profiling.counts import count
from llmcli.profiling.memory import COMPONENTS, attention_kernel, estimate_memory
from llmcli.runtime import autocast, family_loss


def zoo(name):
    return resolve_config(name)[0]


# ---------------------------------------------------------------- reference figures


def test_gpt3_fp16_weights_are_the_classic_350_gb():
    estimate = estimate_memory(zoo("gpt3-175b"), mode="infer", dtype="fp16", seq_len=2048)
    assert estimate.breakdown["weights"] == 2 * count(zoo("gpt3-175b")).params_with_heads
    assert estimate.breakdown["weights"] == pytest.approx(349e9, rel=0.005)


def test_gpt3_mixed_precision_adamw_model_states_are_16_bytes_per_parameter():
    estimate = estimate_memory(zoo("gpt3-175b"), mode="train", dtype="fp16", seq_len=2048)
    assert estimate.bytes_per_param == {"weights": 2, "gradients": 2, "master_weights": 4, "optimizer": 8}
    assert estimate.model_state_bytes == 16 * estimate.params
    assert estimate.model_state_bytes == pytest.approx(2.79e12, rel=0.005)


def test_gpt2_small_kv_cache_is_36864_bytes_per_token_in_fp16():
    estimate = estimate_memory(zoo("gpt2-small"), mode="infer", dtype="fp16", batch_size=3, seq_len=1000)
    assert estimate.kv_bytes_per_token == 36_864  # 2 (K, V) * 12 layers * 768 * 2 bytes
    assert estimate.breakdown["kv_cache"] == 36_864 * 3 * 1000


@pytest.mark.parametrize("name", ["gpt2-small", "bert-base", "t5-small", "llama-65b", "palm-540b"])
@pytest.mark.parametrize("dtype, size", [("fp32", 4), ("bf16", 2)])
def test_weight_bytes_are_parameter_exact(name, dtype, size):
    estimate = estimate_memory(zoo(name), mode="infer", dtype=dtype, seq_len=64, new_tokens=8)
    assert estimate.params == count(zoo(name)).params_with_heads
    assert estimate.breakdown["weights"] == size * estimate.params


def test_weight_only_quantization_shrinks_block_matrices_only():
    config = zoo("llama-65b")
    sizes = {d: estimate_memory(config, mode="infer", dtype=d, seq_len=64).breakdown["weights"]
             for d in ("fp16", "int8", "int4")}
    assert sizes["fp16"] > sizes["int8"] > sizes["int4"]
    # the untied 32000 x 8192 embedding and head stay in full precision
    assert sizes["int4"] > 0.25 * sizes["fp16"] + 2 * 2 * 32000 * 8192 * 0.9


@pytest.mark.parametrize("name", ["gpt-mini", "gpt2-small"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_weight_bytes_are_what_llmcli_quantize_writes(tmp_path, name, scheme):
    """The estimate's int8/int4 weights against the tensor bytes of a quantized model.safetensors (its header)."""
    from llmcli.compression.quantize import quantize_model
    from llmcli.model_dir import save_model, stored_tensor_bytes

    group_size = 64 if name == "gpt-mini" else 128  # gpt-mini's 192 features take groups of 32 or 64
    model = build_model(zoo(name), seed=0)
    quantize_model(model, scheme, group_size=group_size)
    save_model(model, tmp_path)
    written = stored_tensor_bytes(tmp_path)
    estimated = estimate_memory(zoo(name), mode="infer", dtype=scheme, seq_len=64,
                                group_size=group_size).breakdown["weights"]
    assert abs(estimated - written) <= 0.01 * written, (estimated, written)


def test_quantized_weight_bytes_match_the_quantize_command(tmp_path, cli):
    """End to end on gpt-mini: `llmcli quantize` writes it, `memory-estimate --mode infer` on the output reads it."""
    model_dir = tmp_path / "mini"
    assert cli("build", "gpt-mini", "--out", model_dir).exit_code == 0
    assert cli("tokenizer", "train", "--vocab-size", 300, "--out", model_dir).exit_code == 0
    out = tmp_path / "mini-int4"
    result = cli("quantize", model_dir, "--scheme", "int4", "--group-size", 64, "--out", out, "--no-speed",
                 "--seq-len", 32)
    assert result.exit_code == 0, result.stderr
    from llmcli.model_dir import stored_tensor_bytes

    estimate = json.loads(cli("memory-estimate", "gpt-mini", "--mode", "infer", "--dtype", "int4", "--group-size", 64,
                              "--seq-len", 64, "--json").stdout)
    assert abs(estimate["breakdown"]["weights"] - stored_tensor_bytes(out)) <= 0.01 * stored_tensor_bytes(out)


# ---------------------------------------------------------------- activations against what autograd saves

_VIEWS = {"TBackward0", "ToCopyBackward0", "ViewBackward0", "TransposeBackward0"}


def _derived_from_parameter(grad_fn) -> bool:
    """A parameter seen through casts and views: autocast's 16-bit weight copies are weights, not activations."""
    while grad_fn is not None and type(grad_fn).__name__ in _VIEWS:
        grad_fn = grad_fn.next_functions[0][0]
    return grad_fn is not None and type(grad_fn).__name__ == "AccumulateGrad"


def saved_activation_bytes(model, batch, precision: str) -> int:
    """Bytes of the distinct storages autograd saves in a forward and loss, without parameters and logits."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        logits = tensor.dim() == 2 and tensor.shape[-1] == model.config.vocab_size  # the loss's: under "logits"
        if storage.data_ptr() not in params and not logits and not _derived_from_parameter(tensor.grad_fn):
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), precision):
        family_loss(model, batch)
    return sum(seen.values())


LLAMA = dict(norm="rmsnorm", activation="swiglu", position="rope", n_kv_heads=2, bias=False, tie_embeddings=False)
# Gemma 2: four (1 + w) norms per block, capped scores (eager attention) and logits, a sliding layer and a full one
GEMMA2 = dict(LLAMA, norm="gemma_rmsnorm", norm_position="sandwich", attention_softcap=50.0, logits_softcap=30.0,
              sliding_window=8, layer_types=["sliding", "full"])
GEMMA3 = dict(LLAMA, norm="gemma_rmsnorm", norm_position="sandwich", qk_norm="head", sliding_window=8,
              layer_types=["sliding", "full"], rope_local_base=10000.0)
OLMO2 = dict(LLAMA, norm_position="output", qk_norm="projection")
MOE = dict(LLAMA, n_experts=4, experts_per_token=2, d_expert=24, norm_topk_prob=True)  # Mixtral-like, narrow experts


def random_batch(config, b: int, t: int) -> dict:
    """Random tokens shaped like the family's training batch."""
    batch = {"input_ids": torch.randint(0, config.vocab_size, (b, t)),
             "labels": torch.randint(0, config.vocab_size, (b, t))}
    if config.family == "t5":
        batch["decoder_input_ids"] = torch.randint(0, config.vocab_size, (b, t))
    if config.family == "bert":
        batch["attention_mask"] = torch.ones(b, t, dtype=torch.long)
    return batch


@pytest.mark.parametrize("family, precision, attention, overrides", [
    ("gpt", "fp32", "sdpa", dict(dropout=0.1)),  # pre-norm, CPU dropout -> SDPA's math kernel
    ("gpt", "bf16", "sdpa", {}),  # flash kernel, autocast copies
    ("gpt", "bf16", "eager", dict(dropout=0.1)),  # s x s scores kept
    ("bert", "fp32", "sdpa", {}),  # post-norm, padding-mask bias, MLM head and pooler
    ("bert", "bf16", "sdpa", dict(dropout=0.1)),
    ("gpt", "bf16", "sdpa", LLAMA),  # rmsnorm, swiglu, rope, GQA, untied head
    ("gpt", "fp32", "eager", dict(LLAMA, parallel_block=True, dropout=0.1)),
    ("t5", "fp32", "sdpa", {}),  # relative bias with a gradient -> math kernel, cross-attention
    ("t5", "bf16", "sdpa", dict(activation="geglu", dropout=0.1)),
    ("gpt", "fp32", "sdpa", GEMMA2), ("gpt", "bf16", "sdpa", GEMMA2),
    ("gpt", "fp32", "sdpa", GEMMA3), ("gpt", "bf16", "sdpa", GEMMA3),
    ("gpt", "bf16", "sdpa", OLMO2),
    ("gpt", "bf16", "sdpa", dict(LLAMA, rotary_fraction=0.5, sliding_window=8)),  # Phi-4-mini's partial rotation
    ("gpt", "fp32", "sdpa", MOE), ("gpt", "bf16", "sdpa", MOE),
    ("gpt", "fp32", "sdpa", dict(n_experts=4, experts_per_token=1, dropout=0.1)),  # top-1, gelu, biases
    ("gpt", "bf16", "sdpa", dict(MOE, d_shared_expert=40)), ("gpt", "fp32", "sdpa", dict(MOE, d_shared_expert=40)),
])
def test_activation_ledger_matches_what_autograd_saves(family, precision, attention, overrides):
    config = tiny_config(family, **overrides)
    model = build_model(config, seed=0).train()
    for module in model.modules():
        if hasattr(module, "record_weights"):
            module.record_weights = attention == "eager"
    b, t = 3, 20
    batch = random_batch(config, b, t)
    estimate = estimate_memory(config, "train", b, t, precision, attention=attention, device="cpu")
    assert estimate.breakdown["activations"] == saved_activation_bytes(model, batch, precision)


@pytest.mark.parametrize("family, overrides", [("gpt", dict(dropout=0.1)), ("bert", {}), ("t5", {}),
                                               ("gpt", dict(LLAMA, parallel_block=True)), ("gpt", GEMMA2),
                                               ("gpt", GEMMA3), ("gpt", OLMO2), ("gpt", MOE)])
def test_lora_activation_ledger_matches_what_autograd_saves(family, overrides):
    config = tiny_config(family, **overrides)
    model = build_model(config, seed=0).train().requires_grad_(False)
    add_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=["q", "v"])
    b, t = 3, 20
    batch = random_batch(config, b, t)
    estimate = estimate_memory(config, "train", b, t, "fp32", lora_rank=4, device="cpu")
    assert estimate.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate.breakdown["activations"] == saved_activation_bytes(model, batch, "fp32")


def test_attention_kernel_follows_the_real_path():
    assert attention_kernel("sdpa", "cuda", True, 0.1, True) == "fused"  # flash / memory-efficient
    assert attention_kernel("sdpa", "cpu", True, 0.1, False) == "math"  # CPU flash takes no dropout
    assert attention_kernel("sdpa", "cpu", False, 0.1, True) == "fused"  # no dropout in inference
    assert attention_kernel("eager", "cuda", True, 0.0, False) == "eager"
    config = zoo("gpt2-small")
    fused, eager = (estimate_memory(config, batch_size=4, seq_len=1024, attention=a, device="cuda")
                    for a in ("sdpa", "eager"))
    assert eager.breakdown["activations"] > 1.5 * fused.breakdown["activations"]  # the s x s terms


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("name, mode, dtype", [("gpt2-small", "train", "bf16"), ("bert-base", "train", "fp32"),
                                               ("t5-small", "train", "bf16"), ("gpt2-small", "infer", "fp16"),
                                               ("t5-small", "infer", "fp32")])
def test_more_batch_or_sequence_never_needs_less_memory(name, mode, dtype):
    config = zoo(name)
    estimates = [estimate_memory(config, mode, b, s, dtype, new_tokens=4) for b in (1, 2, 8) for s in (16, 128, 512)]
    totals = [e.total_bytes for e in estimates]
    varying = [e.breakdown["activations"] + e.breakdown["logits"] + e.breakdown["kv_cache"] for e in estimates]
    for values, strictly in ((totals, False), (varying, True)):
        rows = [values[i::3] for i in range(3)] + [values[3 * i:3 * i + 3] for i in range(3)]  # by batch, by seq
        for row in rows:
            assert row == sorted(row) and (len(set(row)) == 3 or not strictly)


@pytest.mark.parametrize("name", ["gpt2-small", "bert-base", "t5-small", "llama-65b"])
def test_checkpointing_never_keeps_more_activations(name):
    config = zoo(name)
    for b, s in ((1, 64), (8, 512)):
        plain, checkpointed = (estimate_memory(config, "train", b, s, "bf16", grad_checkpointing=c) for c in (0, 1))
        assert checkpointed.breakdown["activations"] <= plain.breakdown["activations"]
        assert checkpointed.total_bytes <= plain.total_bytes


def test_zero_stages_divide_model_states_by_the_number_of_gpus():
    config, n = zoo("gpt3-175b"), 64
    single = estimate_memory(config, "train", 1, 2048, "bf16", gpus=n).breakdown
    stages = {s: estimate_memory(config, "train", 1, 2048, "bf16", zero_stage=s, gpus=n).breakdown
              for s in (1, 2, 3)}
    sharded = {1: ("optimizer", "master_weights"), 2: ("optimizer", "master_weights", "gradients"),
               3: ("optimizer", "master_weights", "gradients", "weights")}
    for stage, breakdown in stages.items():
        for key in ("weights", "gradients", "optimizer", "master_weights"):
            expected = single[key] / n if key in sharded[stage] else single[key]
            assert breakdown[key] == pytest.approx(expected, abs=1)
    states = lambda b: sum(b[k] for k in ("weights", "gradients", "optimizer", "master_weights"))  # noqa: E731
    assert states(stages[3]) == pytest.approx(states(single) / n, abs=4)
    assert stages[3]["activations"] == single["activations"]


def test_lora_trains_far_less_than_full_fine_tuning():
    config = zoo("gpt2-small")
    full = estimate_memory(config, "train", 4, 256, "bf16")
    lora = estimate_memory(config, "train", 4, 256, "bf16", lora_rank=8)
    assert lora.trainable_params == 12 * 2 * 8 * (768 + 768)  # A and B on q_proj and v_proj
    assert lora.total_bytes < full.total_bytes
    assert lora.model_state_bytes < 0.2 * full.model_state_bytes
    assert lora.breakdown["activations"] < full.breakdown["activations"]  # frozen linears keep no inputs
    qlora = estimate_memory(config, "train", 4, 256, "int4", lora_rank=8)
    assert qlora.breakdown["weights"] < lora.breakdown["weights"]


def test_optimizers_differ_as_their_states_do():
    config = zoo("gpt2-small")
    states = {o: estimate_memory(config, "train", 1, 128, "fp32", optimizer=o).breakdown["optimizer"]
              for o in ("adamw", "sgd", "adafactor", "adamw8bit")}
    params = count(config).params_with_heads
    assert states["adamw"] == 8 * params and states["sgd"] == 4 * params
    assert states["adafactor"] < 0.02 * params * 4  # rows + columns per matrix
    assert 2 * params < states["adamw8bit"] < 2.1 * params


def test_training_peak_is_the_larger_phase():
    config = zoo("gpt2-small")
    small = estimate_memory(config, "train", 1, 32, "fp32")  # tiny activations: the optimizer step peaks
    big = estimate_memory(config, "train", 8, 1024, "fp32")
    assert small.peak_phase == "optimizer_step" and big.peak_phase == "forward_backward"
    for estimate in (small, big):
        assert estimate.total_bytes == max(p["total"] for p in estimate.phases.values())
    assert "gradients" not in big.live_at_peak  # set to None between steps, produced as activations go


def test_palm_540b_is_instant_and_allocates_nothing():
    config = zoo("palm-540b")
    estimate_memory(config, "train", 1, 2048, "bf16")  # imports
    start = time.perf_counter()
    estimate = estimate_memory(config, "train", 1, 2048, "bf16", zero_stage=3, gpus=2048)
    assert time.perf_counter() - start < 2.0
    assert estimate.params == pytest.approx(540.35e9, rel=0.001)
    assert estimate.model_state_bytes == pytest.approx(16 * estimate.params / 2048, rel=1e-6)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="fp8"), "--dtype 'fp8' is not one of"),
    (dict(optimizer="lion"), "--optimizer 'lion'"),
    (dict(mode="serve"), "--mode 'serve'"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
    (dict(seq_len=2048), "outside gpt2-small's context of 1..1024"),
    (dict(dtype="int8"), "add --lora-rank"),
    (dict(zero_stage=2), "add --gpus N"),
    (dict(mode="infer", seq_len=8, new_tokens=8), "--new-tokens 8 must be below --seq-len 8"),
])
def test_bad_input_is_a_user_error(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        estimate_memory(zoo("gpt2-small"), **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp8"], "--dtype 'fp8'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--seq-len", "4096"], "outside gpt2-small's context"),
    (["--zero-stage", "3"], "add --gpus N"),
])
def test_cli_errors_exit_2_with_one_line(cli, args, message):
    result = cli("memory-estimate", "gpt2-small", *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_measure_refuses_what_does_not_fit_before_allocating(cli):
    start = time.perf_counter()
    result = cli("memory-estimate", "gpt3-175b", "--device", "cpu", "--measure")
    assert result.exit_code == 2 and "exceeds this cpu device's memory" in result.stderr
    assert time.perf_counter() - start < 5  # refused from the estimate, no model built


# ---------------------------------------------------------------- the CLI


def test_cli_json_has_the_contract_keys(cli):
    result = cli("memory-estimate", "gpt2-small", "--batch-size", "4", "--seq-len", "256", "--dtype", "bf16",
                 "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data["breakdown"]) == set(COMPONENTS)
    assert data["params"] == 124_439_808
    assert data["total_bytes"] == data["phases"][data["peak_phase"]]["total"]
    assert data["breakdown"]["kv_cache"] == 0 and data["inputs"]["dtype"] == "bf16"


def test_cli_table_states_convention_and_sources(cli):
    result = cli("memory-estimate", "gpt2-small", "--seq-len", "128", "--device", "cuda")
    assert result.exit_code == 0, result.stderr
    for text in ("weights", "optimizer", "activations", "logits", "bytes per parameter", "Korthikanti",
                 "Rajbhandari"):
        assert text in result.stdout


def test_measure_on_gpt_nano_is_close_to_the_estimate(cli):
    result = cli("memory-estimate", "gpt-nano", "--batch-size", "4", "--seq-len", "64", "--device", "cpu",
                 "--measure", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["measured_bytes"] > 0
    assert abs(data["relative_error"]) < 0.25
    assert data["relative_error"] == pytest.approx((data["total_bytes"] - data["measured_bytes"])
                                                   / data["measured_bytes"], abs=1e-4)


def test_png_draws_each_phase_beside_the_measured_peak(cli, tmp_path):
    from matplotlib import image

    assert cli("memory-estimate", "gpt-nano", "--png", tmp_path / "missing" / "m.png").exit_code == 2  # before work
    result = cli("memory-estimate", "gpt-nano", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
                 "--measure", "--png", tmp_path / "memory.png")
    assert result.exit_code == 0, result.stderr
    assert image.imread(tmp_path / "memory.png").shape[2] in (3, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["memory.png"]  # no temporary file left


def test_measured_lora_training_uses_less_memory_than_full(cli):
    """Issue 7's acceptance: LoRA below full fine-tuning, in the estimate and in the measured peak."""
    figures = {}
    for name, extra in (("full", []), ("lora", ["--lora-rank", "8"])):
        result = cli("memory-estimate", "gpt-mini", "--batch-size", "4", "--seq-len", "128", "--device", "cpu",
                     "--measure", "--json", *extra)
        assert result.exit_code == 0, result.stderr
        figures[name] = json.loads(result.stdout)
    assert figures["lora"]["total_bytes"] < figures["full"]["total_bytes"]
    assert figures["lora"]["measured_bytes"] < figures["full"]["measured_bytes"]
    assert abs(figures["lora"]["relative_error"]) < 0.25
