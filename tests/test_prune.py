"""Pruning: exact sparsity per layer/row/group, Wanda's scores by hand, head removal equal to head masking
for every family, head-pruned directories that load and generate, recovery that keeps the zeros, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import one_thread, tiny_config
from llmcli.compression.prune import (choose_heads, head_importance, heads_to_remove, input_norms, keep_mask,
                                      prune_count, prune_heads, prune_weights, resolve_spec, wanda_scores)
from llmcli.compression.prune_dir import prune
from llmcli.models.layout import block_linears
from llmcli.data import default_corpus
from llmcli.errors import UserError
from llmcli.model_dir import load_model
from llmcli.models import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(default_corpus()[:40]))
    return str(path)


def random_batches(family: str, n: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(97, (2, 12), generator=g)
        batch = {"input_ids": ids, "labels": ids}
        if family == "t5":
            batch["decoder_input_ids"] = torch.randint(97, (2, 7), generator=g)
        batches.append(batch)
    return batches


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        extra = {"decoder_input_ids": batch["decoder_input_ids"]} if "decoder_input_ids" in batch else {}
        return model.eval()(batch["input_ids"], **extra).logits


# ---------------------------------------------------------------- unstructured and N:M


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_magnitude_zeros_exactly_round_s_n_smallest_weights_of_each_layer(sparsity):
    model = build_model(tiny_config("gpt", activation="swiglu"), seed=0)
    original = copy.deepcopy(model)
    prune_weights(model, resolve_spec("magnitude", sparsity), [], CPU)
    linears, before = block_linears(model), block_linears(original)
    assert len(linears) == 2 * 7  # q, k, v, o, up, gate, down in each of 2 blocks
    for name, linear in linears.items():
        zero = linear.weight == 0
        assert int(zero.sum()) == prune_count(sparsity, linear.weight.numel()), name
        magnitude = before[name].weight.abs()
        assert magnitude[zero].max() <= magnitude[~zero].min()
    assert torch.equal(model.tok_emb.weight, original.tok_emb.weight)  # embeddings and LM head stay dense
    assert torch.equal(model.decoder.pos_emb.weight, original.decoder.pos_emb.weight)


def test_global_magnitude_prunes_exactly_s_of_all_weights_unevenly():
    model = build_model(tiny_config("gpt"), seed=0)
    original = block_linears(copy.deepcopy(model))
    prune_weights(model, resolve_spec("magnitude", 0.6, scope="global"), [], CPU)
    linears = block_linears(model)
    weights = torch.cat([linear.weight.flatten() for linear in linears.values()])
    assert int((weights == 0).sum()) == prune_count(0.6, weights.numel())
    per_layer = {round(float((linear.weight == 0).float().mean()), 3) for linear in linears.values()}
    assert len(per_layer) > 1  # o_proj and down start smaller (GPT-2 init), so they lose more
    magnitude = torch.cat([linear.weight.abs().flatten() for linear in original.values()])
    assert magnitude[weights == 0].max() <= magnitude[weights != 0].min()


def test_wanda_scores_and_masks_match_a_hand_computation():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                           [-0.5, 0.5, -0.5, 0.5]])
    inputs = torch.tensor([[6.0, 1.0, 0.0, 0.1],
                           [8.0, 0.0, 1.0, 0.0]])  # ||X_j||₂ = 10, 1, 1, 0.1
    norms = inputs.pow(2).sum(0).sqrt()
    scores = wanda_scores(weight, norms)
    assert torch.allclose(scores, torch.tensor([[10.0, 2.0, 3.0, 0.4], [5.0, 0.5, 0.5, 0.05]]))
    keep = keep_mask(scores, 0.5, per_row=True)
    assert keep[0].tolist() == [True, False, True, False]  # magnitude alone would keep 3 and -4
    assert keep.sum(1).tolist() == [2, 2]


def test_input_norms_are_the_l2_norms_of_what_each_linear_reads():
    model = build_model(tiny_config("gpt"), seed=0).eval()
    batches = random_batches("gpt")
    block = model.decoder.blocks[1]
    linears = {"q": block.attn.q_proj, "down": block.ff.down}
    norms = input_norms(model, batches, linears, CPU, stop_after=block)
    seen = {"q": [], "down": []}
    hooks = [block.attn_norm.register_forward_hook(lambda m, a, out: seen["q"].append(out)),
             block.ff.down.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0]))]
    for batch in batches:
        logits(model, batch)
    for hook in hooks:
        hook.remove()
    for name, xs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
        assert torch.allclose(norms[name], x.pow(2).sum(0).sqrt(), rtol=1e-5), name


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_wanda_prunes_exactly_s_of_every_row(family):
    model = build_model(tiny_config(family), seed=0)
    assert resolve_spec("wanda").scope == "row"
    prune_weights(model, resolve_spec("wanda", 0.5), random_batches(family), CPU)
    for name, linear in block_linears(model).items():
        zeros_per_row = (linear.weight == 0).sum(1)
        assert (zeros_per_row == prune_count(0.5, linear.in_features)).all(), name


def test_wanda_per_layer_drops_the_lowest_scores_of_each_layer():
    model = build_model(tiny_config("gpt"), seed=0)
    batches = random_batches("gpt")
    block = model.decoder.blocks[0]
    linears = block_linears(block)
    norms = input_norms(model, batches, linears, CPU, stop_after=block)  # block 0 sees the dense model only
    scores = {name: wanda_scores(linear.weight, norms[name]) for name, linear in linears.items()}
    prune_weights(model, resolve_spec("wanda", 0.3, scope="layer"), batches, CPU)
    rows_differ = False
    for name, linear in linears.items():
        zero = linear.weight == 0
        assert int(zero.sum()) == prune_count(0.3, zero.numel()), name
        assert scores[name][zero].max() <= scores[name][~zero].min(), name
        rows_differ |= len(set(zero.sum(1).tolist())) > 1
    assert rows_differ  # not the same count in every row: the layer is one comparison group


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_2_4_pattern_keeps_exactly_2_of_every_4_inputs(method):
    model = build_model(tiny_config("gpt"), seed=0)
    original = block_linears(copy.deepcopy(model))
    spec = resolve_spec(method, pattern="2:4")
    assert spec.sparsity == 0.5
    prune_weights(model, spec, random_batches("gpt"), CPU)
    for name, linear in block_linears(model).items():
        groups = linear.weight.reshape(linear.out_features, -1, 4)
        assert ((groups == 0).sum(-1) == 2).all(), name
        if method == "magnitude":  # the two kept are the two largest of the group
            before = original[name].weight.abs().reshape(groups.shape)
            kept_min = before.masked_fill(groups == 0, float("inf")).min(-1).values
            dropped_max = before.masked_fill(groups != 0, 0.0).max(-1).values
            assert (dropped_max <= kept_min).all(), name


# ---------------------------------------------------------------- heads


HEAD_CASES = [("gpt", {}, 2), ("bert", {}, 1), ("t5", {}, 2), ("gpt", {"n_kv_heads": 2}, 1),
              ("gpt", {"position": "rope", "activation": "swiglu"}, 3)]


@pytest.mark.parametrize("family, overrides, remove", HEAD_CASES,
                         ids=[f"{f}-{'-'.join(map(str, o.values())) or 'mha'}-{r}" for f, o, r in HEAD_CASES])
def test_removing_heads_equals_masking_them_and_shrinks_the_projections(family, overrides, remove):
    model = build_model(tiny_config(family, **overrides), seed=0)
    with torch.no_grad():  # a fresh init's heads are near-identical; spread them so the choice matters
        for linear in block_linears(model).values():
            linear.weight.mul_(torch.rand(linear.weight.shape, generator=torch.Generator().manual_seed(1)) * 4)
    batches = random_batches(family)
    drop = choose_heads(model, head_importance(model, batches, CPU), remove)
    original, masked = copy.deepcopy(model), copy.deepcopy(model)
    modules = dict(masked.named_modules())
    n_heads, n_kv, d_head = model.config.n_heads, model.config.n_kv_heads, model.config.d_head
    group_width = n_heads // n_kv * d_head
    with torch.no_grad():
        for name, groups in drop.items():  # masking: zero the removed heads' o_proj input columns
            for g in groups:
                modules[name].o_proj.weight[:, g * group_width:(g + 1) * group_width] = 0
    prune_heads(model, drop)

    kept_kv = n_kv - remove
    kept = kept_kv * n_heads // n_kv
    assert (model.config.n_heads, model.config.n_kv_heads, model.config.d_head) == (kept, kept_kv, d_head)
    attentions = [m for name, m in model.named_modules() if name.endswith("attn")]
    assert len(attentions) == len(drop) > 0
    for attn in attentions:
        assert attn.q_proj.weight.shape == (kept * d_head, 32)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (kept_kv * d_head, 32)
        assert attn.o_proj.weight.shape == (32, kept * d_head)
    for batch in batches:
        reference = logits(masked, batch)
        assert torch.allclose(logits(model, batch), reference, atol=1e-5)
        assert not torch.allclose(logits(original, batch), reference, atol=1e-3)  # the removed heads mattered


def test_t5_self_attention_loses_the_same_heads_in_every_layer_of_a_stack():
    """The relative position bias is one table per stack with a column per head."""
    model = build_model(tiny_config("t5", n_layers=3), seed=0)
    with torch.no_grad():
        for linear in block_linears(model).values():
            linear.weight.mul_(torch.rand(linear.weight.shape, generator=torch.Generator().manual_seed(2)) * 4)
    drop = choose_heads(model, head_importance(model, random_batches("t5"), CPU), 2)
    for stack in ("encoder", "decoder"):
        assert len({tuple(drop[f"{stack}.blocks.{i}.attn"]) for i in range(3)}) == 1
    assert "decoder.blocks.0.cross_attn" in drop
    prune_heads(model, drop)
    assert model.encoder.rel_bias.embedding.weight.shape == (8, 2)


def test_heads_refuses_to_remove_every_head_or_the_only_kv_group():
    with pytest.raises(UserError, match="would remove all 4 heads"):
        heads_to_remove(build_model(tiny_config("gpt"), seed=0), 0.9)
    with pytest.raises(UserError, match=r"all 1 kv groups \(GQA: 4 heads each\)"):
        heads_to_remove(build_model(tiny_config("gpt", n_kv_heads=1), seed=0), 0.5)


# ---------------------------------------------------------------- the command


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_head_pruned_directory_loads_with_the_smaller_config_and_generates(cli, model_dirs, corpus_file, tmp_path,
                                                                           family):
    out = tmp_path / "pruned"
    result = cli("prune", model_dirs[family], "--method", "heads", "--sparsity", "0.25", "--out", out,
                 "--data", corpus_file, "--calibration-batches", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_heads"] == {"before": 4, "after": 3} and report["heads_removed_per_layer"] == 1
    assert report["change"]["speed_ratio"] > 0 and report["after"]["params"] < report["before"]["params"]
    config = json.loads((out / "config.json").read_text())
    assert (config["n_heads"], config["d_head"], config["d_model"]) == (3, 8, 32)
    model = load_model(out)
    assert model.config.d_attn == 24
    assert json.loads((out / "compression.json").read_text())["after"]["perplexity"] == report["after"]["perplexity"]
    generated = cli("generate", out, "--prompt", "The", "--max-new-tokens", "5", "--temperature", "0", "--json")
    assert generated.exit_code == 0, generated.output
    assert len(json.loads(generated.stdout)["tokens"]) > 0


def test_recovery_trains_and_keeps_the_zeros(model_dirs, corpus_file, tmp_path):
    common = dict(data=corpus_file, seq_len=16, speed=False, log=lambda *a: None)
    spec = resolve_spec("wanda", 0.5, calibration_batches=2)
    plain = prune(model_dirs["gpt"], tmp_path / "plain", spec, **common)
    recovered = prune(model_dirs["gpt"], tmp_path / "recovered", spec, recover_steps=5, lr=1e-2, **common)
    assert recovered["recovery"]["steps"] == 5
    assert recovered["after"]["loss"] < recovered["pruned"]["loss"] == pytest.approx(plain["after"]["loss"])
    before, after = (block_linears(load_model(tmp_path / name)) for name in ("plain", "recovered"))
    for name, linear in after.items():
        assert torch.equal(linear.weight == 0, before[name].weight == 0), name  # the same zeros, no more, no less
        assert not torch.equal(linear.weight, before[name].weight), name  # and the rest trained
    assert recovered["overall_sparsity"] == 0.5


def test_cli_reports_sparsity_per_layer_and_overall(cli, model_dirs, corpus_file, tmp_path):
    out = tmp_path / "wanda"
    result = cli("prune", model_dirs["bert"], "--method", "wanda", "--out", out, "--data", corpus_file,
                 "--calibration-batches", "2", "--no-speed", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"method", "sparsity", "pattern", "layers", "overall_sparsity", "before", "after", "change",
            "recovery"} <= set(report)
    assert report["sparsity"] == 0.5 and report["overall_sparsity"] == 0.5 and len(report["layers"]) == 12
    assert all(layer["sparsity"] == 0.5 for layer in report["layers"])
    assert report["after"]["perplexity"] != report["before"]["perplexity"]
    table = cli("prune", model_dirs["gpt"], "--method", "magnitude", "--pattern", "2:4", "--out", tmp_path / "nm",
                "--data", corpus_file, "--no-speed")
    assert table.exit_code == 0, table.output
    assert "sparsity per layer (overall 50.00%)" in table.stdout and "decoder.blocks.1.ff.down" in table.stdout
    assert "perplexity" in table.stdout


BAD_INPUT = [
    (["--method", "magnitude", "--sparsity", "1.0"], "--sparsity 1.0 must be in [0, 1)"),
    (["--method", "magnitude", "--sparsity", "-0.1"], "--sparsity -0.1 must be in [0, 1)"),
    (["--method", "random"], "--method 'random' is not one of magnitude, wanda, heads"),
    (["--method", "wanda", "--pattern", "4:2"], "need 0 < N < M"),
    (["--method", "wanda", "--pattern", "two:four"], "is not N:M"),
    (["--method", "magnitude", "--pattern", "2:5"], "has 32 inputs, not a multiple of 5"),
    (["--method", "magnitude", "--pattern", "2:4", "--sparsity", "0.7"], "means sparsity 0.5, not 0.7"),
    (["--method", "heads", "--pattern", "2:4"], "--pattern is for --method magnitude or wanda"),
    (["--method", "heads", "--sparsity", "0.9"], "would remove all 4 heads"),
    (["--method", "wanda", "--scope", "global"], "--scope global is for --method magnitude"),
    (["--method", "heads", "--scope", "layer"], "--scope is for --method magnitude or wanda"),
    (["--method", "wanda", "--pattern", "2:4", "--scope", "row"], "--pattern sets its own groups"),
    (["--method", "magnitude", "--scope", "model"], "--scope 'model' is not one of"),
    (["--method", "wanda", "--calibration-batches", "0"], "--calibration-batches must be positive"),
    (["--method", "magnitude", "--recover-steps", "-1"], "--recover-steps must be >= 0"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[m for _, m in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(cli, model_dirs, corpus_file, tmp_path, args, message):
    result = cli("prune", model_dirs["gpt"], "--out", tmp_path / "out", "--data", corpus_file, "--no-speed", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") <= 2
    assert not (tmp_path / "out").exists()


def test_existing_out_is_kept_without_force(cli, model_dirs, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("prune", model_dirs["gpt"], "--method", "magnitude", "--out", out)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
