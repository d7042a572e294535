"""The model directory: bit-identical round trips, deterministic builds, atomic and safe writes."""

import json

import pytest
import torch

from conftest import tiny_config
from llmcli import load_model
from llmcli.errors import UserError
from llmcli.model_dir import atomic_output_dir, build_model_dir


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_build_then_load_is_bit_identical(tmp_path, family):
    config = tiny_config(family)
    build_model_dir(config, tmp_path / "m", seed=3)
    from llmcli.models import build_model

    original = build_model(config, seed=3).eval()
    loaded = load_model(tmp_path / "m")
    assert loaded.config == config
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 97, (2, 8))
    kw = {"decoder_input_ids": ids} if family == "t5" else {}
    assert torch.equal(original(ids, **kw).logits, loaded(ids, **kw).logits)


def test_build_is_deterministic_per_seed(tmp_path):
    config = tiny_config("gpt")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        build_model_dir(config, tmp_path / name, seed=seed)
    data = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in "abc"}
    assert data["a"] == data["b"]
    assert data["a"] != data["c"]


def test_existing_output_is_refused_then_replaced_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty.*--force"):
        build_model_dir(tiny_config("gpt"), out, seed=0)
    assert (out / "notes.txt").read_text() == "mine"
    build_model_dir(tiny_config("gpt"), out, seed=0, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_a_failed_write_leaves_the_old_directory_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "keep.txt").read_text() == "mine"


def test_pickle_weights_are_refused_unopened(tmp_path):
    build_model_dir(tiny_config("gpt"), tmp_path / "m", seed=0)
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04 not even opened")
    with pytest.raises(UserError, match="pytorch_model.bin is a pickle file"):
        load_model(tmp_path / "m")


def test_corrupt_or_mismatched_weights_are_user_errors(tmp_path):
    build_model_dir(tiny_config("gpt"), tmp_path / "m", seed=0)
    weights = tmp_path / "m" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(tmp_path / "m")
    weights.write_bytes(good)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["d_ff"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="config.json implies"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt JSON"):
        load_model(tmp_path / "m")


def test_load_model_takes_zoo_names_and_toml_paths(tmp_path):
    assert load_model("gpt-nano").config.d_model == 48
    toml = tmp_path / "mine.toml"
    toml.write_text('name = "mine"\nfamily = "bert"\nvocab_size = 50\nd_model = 16\nn_layers = 1\n'
                    'n_heads = 2\nd_ff = 32\nmax_seq_len = 16\n')
    assert load_model(toml).config.family == "bert"
