"""Mixtures of experts: the layer against a per-token loop, the router's losses against their formulas, training
that balances the experts, and the commands around it (counts, train, runs show, experts, quantize, bench).
The parity with transformers' Mixtral, Qwen3-MoE and OLMoE is in test_llama.py, with the other Llama-style models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmcli.config import config_from_dict
from llmcli.models import build_model
from llmcli.models.blocks import MixtureOfExperts, load_balancing_loss, router_losses, router_z_loss
from conftest import one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def moe_config(**overrides):
    base = dict(name="tiny-moe", family="gpt", vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                max_seq_len=64, n_experts=4, experts_per_token=2, d_expert=32, activation="swiglu", norm="rmsnorm",
                position="rope", bias=False)
    return config_from_dict({**base, **overrides}, "test")


@pytest.mark.parametrize("top_k,renormalise", [(1, False), (2, False), (2, True), (4, True)])
def test_the_layer_equals_a_loop_over_tokens(top_k, renormalise):
    """Grouping tokens by expert computes, for every token, the weighted sum of its top-k experts."""
    torch.manual_seed(0)
    config = moe_config(experts_per_token=top_k, norm_topk_prob=renormalise)
    layer = MixtureOfExperts(config)
    x = torch.randn(3, 5, config.d_model)
    got = layer(x)
    want = torch.zeros_like(x)
    for b in range(3):
        for t in range(5):
            probs = F.softmax(layer.router(x[b, t]), dim=-1)
            weights, chosen = probs.topk(top_k)
            if renormalise:
                weights = weights / weights.sum()
            for w, e in zip(weights, chosen):
                want[b, t] += w * layer.experts[int(e)](x[b, t])
    assert torch.allclose(got, want, atol=1e-6)
    assert int(layer.expert_load.sum()) == 15 * top_k


def test_router_losses_match_their_formulas_and_gradients():
    """Values against the papers' sums written out, gradients against the derivatives worked by hand."""
    torch.manual_seed(1)
    tokens, experts, k = 12, 5, 2
    logits = torch.randn(tokens, experts, dtype=torch.float64, requires_grad=True)
    chosen = logits.detach().topk(k, dim=-1).indices
    probs = torch.softmax(logits.detach(), -1)
    share = torch.tensor([(chosen == e).sum().item() / (tokens * k) for e in range(experts)], dtype=torch.float64)
    balance = load_balancing_loss(logits, chosen)
    assert torch.isclose(balance, experts * sum(share[e] * probs[:, e].mean() for e in range(experts)))
    (grad,) = torch.autograd.grad(balance, logits)
    # d/dz_tj of E/T Σ_e f_e p_te = E/T Σ_e f_e p_te (δ_ej - p_tj) = E/T p_tj (f_j - Σ_e f_e p_te)
    expected = experts / tokens * probs * (share - (probs * share).sum(-1, keepdim=True))
    assert torch.allclose(grad, expected)

    z = router_z_loss(logits)
    lse = torch.log(torch.exp(logits.detach()).sum(-1))
    assert torch.isclose(z, (lse ** 2).mean())
    (grad,) = torch.autograd.grad(z, logits)
    assert torch.allclose(grad, 2 * lse[:, None] * probs / tokens)  # d lse / dz = softmax

    even = torch.zeros(8, 4)  # equal logits, tokens spread evenly: the balance loss is 1, its floor
    spread = torch.arange(8).remainder(4)[:, None]
    assert torch.isclose(load_balancing_loss(even, spread), torch.tensor(1.0))
    assert torch.isclose(load_balancing_loss(torch.eye(4)[[0] * 8] * 10, torch.zeros(8, 1, dtype=torch.long)),
                         torch.tensor(4.0), atol=1e-3)  # one expert takes all: E


def test_router_losses_come_only_from_a_forward_with_autograd():
    model = build_model(moe_config(), seed=0)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        model(ids)
    assert router_losses(model) is None  # inference keeps no logits
    model(ids)
    balance, z = router_losses(model)
    assert balance.requires_grad and z.requires_grad and balance.item() >= 1.0 - 1e-6
    assert router_losses(build_model(moe_config(n_experts=0), seed=0)) is None


def test_the_balancing_loss_spreads_tokens_over_experts(tmp_path, corpus):
    """The same model, data and steps (top-1 of 8 experts) with and without the load-balancing loss: without it a
    few experts take most tokens (measured here: the busiest takes 7-8x an even share); with it the busiest
    expert's share is nearer the even one (2.2-2.4x). Read from the expert load the last 4 logged steps saw."""
    from llmcli.training.pretrain import pretrain
    from llmcli.training.run import TrainFlags

    toml = tmp_path / "moe.toml"
    toml.write_text('name = "moe"\nfamily = "gpt"\nvocab_size = 512\nd_model = 64\nn_layers = 2\nn_heads = 4\n'
                    'd_ff = 128\nmax_seq_len = 64\nn_experts = 8\nexperts_per_token = 1\n')
    above_even = {}
    for weight in (0.0, 0.1):
        out = tmp_path / f"aux-{weight}"
        pretrain(str(toml), corpus, str(out), TrainFlags(steps=60, batch_size=8, seq_len=32, lr=3e-3, log_every=5,
                                                         router_aux_weight=weight, router_z_weight=0.0, force=True),
                 log=lambda *a, **k: None)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        layers = [layer for r in records if "expert_load" in r for layer in r["expert_load"]][-8:]
        above_even[weight] = sum(8 * max(layer) - 1 for layer in layers) / len(layers)
    assert above_even[0.1] < 0.5 * above_even[0.0], above_even


def test_moe_micro_counts_what_a_token_uses():
    """moe-micro's active parameters are gpt-micro's, plus per layer the router (d x E) and one more down bias
    (two experts of width 256 in place of one MLP of width 512)."""
    from llmcli.model_dir import resolve_config
    from llmcli.profiling.counts import count

    moe, _ = resolve_config("moe-micro")
    dense, _ = resolve_config("gpt-micro")
    extra = moe.n_layers * (moe.d_model * moe.n_experts + moe.d_model)
    assert count(moe).active_params == count(dense).params + extra
    expert = 2 * moe.d_model * moe.d_expert + moe.d_expert + moe.d_model
    assert count(moe).params == count(moe).active_params + moe.n_layers * (moe.n_experts - 2) * expert
    assert count(moe).flops_per_token < count(dense).flops_per_token * 1.02


def test_train_logs_expert_load_and_runs_show_draws_it(tmp_path, corpus, cli):
    toml = tmp_path / "moe.toml"
    toml.write_text('name = "moe"\nfamily = "gpt"\nvocab_size = 512\nd_model = 32\nn_layers = 2\nn_heads = 4\n'
                    'd_ff = 64\nmax_seq_len = 64\nn_experts = 4\nexperts_per_token = 2\n')
    out = tmp_path / "run"
    result = cli("train", toml, "--data", corpus, "--steps", 4, "--batch-size", 2, "--seq-len", 16,
                 "--out", out, "--router-aux-weight", 0.02, "--router-z-weight", 0.001)
    assert result.exit_code == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "expert_load" in r]
    assert logged and all(len(r["expert_load"]) == 2 and len(r["expert_load"][0]) == 4 for r in logged)
    assert all(abs(sum(layer) - 1) < 1e-3 for r in logged for layer in r["expert_load"])
    assert all(r["router_balance_loss"] >= 1 - 1e-4 and r["router_z_loss"] > 0 for r in logged)
    shown = cli("runs", "show", out)
    assert shown.exit_code == 0 and "expert load" in shown.stdout and "layer 1" in shown.stdout
    assert json.loads(cli("runs", "show", out, "--json").stdout)[0]["expert_load"] == logged[-1]["expert_load"]
    bad = cli("train", toml, "--steps", 1, "--router-aux-weight", -1, "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "--router-aux-weight" in bad.stderr


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from llmcli.data import default_corpus
    from llmcli.model_dir import build_model_dir
    from llmcli.tokenizer import save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(default_corpus()[:8], "bpe", 300)
    out = tmp_path_factory.mktemp("moe") / "model"
    build_model_dir(moe_config(vocab_size=tokenizer.get_vocab_size()), out, seed=0)
    save_tokenizer(tokenizer, out)
    return out


def test_experts_command_shows_routing(cli, moe_dir, model_dirs, tmp_path):
    text = "def main(): return the value of a list"
    result = cli("experts", moe_dir, "--text", text, "--json")
    assert result.exit_code == 0, result.stderr
    routing = json.loads(result.stdout)
    assert len(routing["load"]) == 2 and all(abs(sum(layer) - 1) < 1e-6 for layer in routing["load"])
    for layer, shares in zip(routing["top_tokens"], routing["load"]):  # an expert lists tokens iff it took some
        assert all(bool(tokens) == (share > 0) for tokens, share in zip(layer, shares))
    drawn = cli("experts", moe_dir, "--text", text, "--layer", 0, "--png", tmp_path / "r.png")
    assert drawn.exit_code == 0 and "layer 0" in drawn.stdout and (tmp_path / "r.png").stat().st_size > 1000
    dense = cli("experts", model_dirs["gpt"], "--text", text)
    assert dense.exit_code == 2 and "no mixture of experts" in dense.stderr and "Traceback" not in dense.stderr
    assert cli("experts", moe_dir, "--text", text, "--layer", 7).exit_code == 2


def test_quantize_takes_every_expert_and_keeps_the_router(cli, moe_dir, corpus, tmp_path):
    from llmcli.model_dir import load_model
    from llmcli.models.quantized import QuantizedLinear

    result = cli("quantize", moe_dir, "--scheme", "int8", "--out", tmp_path / "q", "--no-speed", "--data", corpus,
                 "--seq-len", 32)
    assert result.exit_code == 0, result.stderr
    model = load_model(tmp_path / "q")
    layers = [m for m in model.modules() if isinstance(m, MixtureOfExperts)]
    assert all(isinstance(getattr(e, p), QuantizedLinear) for m in layers for e in m.experts
               for p in ("gate", "up", "down"))
    assert all(type(m.router) is torch.nn.Linear for m in layers)
    generated = cli("generate", tmp_path / "q", "--prompt", "The", "--max-new-tokens", 4, "--temperature", 0)
    assert generated.exit_code == 0, generated.stderr


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_memory_estimate_of_moe_micro_is_within_20_percent_of_measured(cli, mode):
    """Every expert resident, activations per routed token (the training ledger is exact: test_memory.py)."""
    result = cli("memory-estimate", "moe-micro", "--mode", mode, "--batch-size", 4, "--seq-len", 128,
                 "--device", "cpu", "--measure", "--json")
    assert result.exit_code == 0, result.stderr
    assert abs(json.loads(result.stdout)["relative_error"]) < 0.20


def test_decode_reads_the_experts_a_token_uses():
    """bench's decode bandwidth counts the weights one token reads: k of the n experts in each layer."""
    from llmcli.profiling.bench import Runner

    model = build_model(moe_config(n_experts=8, experts_per_token=2), seed=0)
    dense = build_model(moe_config(n_experts=0), seed=0)
    expert = sum(p.numel() * 4 for p in model.decoder.blocks[0].ff.experts[0].parameters())
    runner = Runner(model, torch.device("cpu"), "fp32")
    idle = model.config.n_layers * 6 * expert
    assert runner.decode_read_bytes() == runner.weight_bytes() - idle  # the tied embedding is the head: read whole
    assert Runner(dense, torch.device("cpu"), "fp32").decode_read_bytes() < runner.decode_read_bytes()


def test_an_expert_masked_at_the_router_costs_what_removing_it_does():
    """expert_cost (router logit -inf) equals the loss after prune_experts cuts that expert out."""
    import copy

    from llmcli.compression.prune import calibration_loss, expert_cost, mixtures, prune_experts

    model = build_model(moe_config(), seed=0).eval()
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (2, 3, 16))]
    name, layer = next(iter(mixtures(model).items()))
    masked = expert_cost(model, layer, 2, batches, torch.device("cpu"))
    pruned = copy.deepcopy(model)
    prune_experts(pruned, {n: [2] if n == name else [] for n in mixtures(model)})
    assert len(mixtures(pruned)[name].experts) == 3
    assert abs(calibration_loss(pruned, batches, torch.device("cpu")) - masked) < 1e-5
    assert masked != calibration_loss(model, batches, torch.device("cpu"))


def test_prune_experts_removes_the_least_used_and_reports_their_cost(cli, moe_dir, model_dirs, corpus, tmp_path):
    from llmcli.model_dir import load_model

    data = ["--data", corpus, "--seq-len", 32, "--no-speed"]
    result = cli("prune", moe_dir, "--method", "experts", "--sparsity", 0.5, "--out", tmp_path / "p", "--json", *data)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_experts"] == {"before": 4, "after": 2}
    for layer in report["experts"]:
        assert len(layer["removed"]) == 2 and all(isinstance(c["loss_increase"], float) for c in layer["removed"])
    assert load_model(tmp_path / "p").config.n_experts == 2
    assert cli("generate", tmp_path / "p", "--prompt", "The", "--max-new-tokens", 3).exit_code == 0
    assert cli("prune", moe_dir, "--method", "experts", "--sparsity", 0.75, "--out", tmp_path / "q",
               *data).exit_code == 2  # 1 expert left, tokens use 2
    dense = cli("prune", model_dirs["gpt"], "--method", "experts", "--out", tmp_path / "d", *data)
    assert dense.exit_code == 2 and "no" in dense.stderr and "Traceback" not in dense.stderr
