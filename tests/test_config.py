"""The zoo registry and config validation."""

import pytest

from llmcli.config import FAMILIES, load_toml, zoo_entries
from llmcli.errors import UserError
from llmcli.model_dir import resolve_config
from llmcli.profiling.counts import count

REQUIRED_ENTRIES = """bert-tiny bert-mini bert-small bert-base bert-large gpt-nano gpt-micro gpt-mini gpt2-small
gpt2-medium gpt2-large gpt2-xl gpt3-175b t5-tiny t5-small t5-base t5-large gopher-280b palm-540b llama-65b""".split()


def test_zoo_has_every_required_entry_in_its_family_folder():
    entries = zoo_entries()
    assert set(REQUIRED_ENTRIES) <= set(entries)
    for name, path in entries.items():
        config = load_toml(path)
        assert config.name == name
        assert path.parent.name == config.family in FAMILIES


@pytest.mark.parametrize("name, expected", [
    ("gpt2-small", 124_439_808),
    ("bert-base", 109_482_240),  # BertModel with pooler, the published convention
    ("t5-small", 60_506_624),
    ("t5-base", 222_903_552),
])
def test_exact_parameter_counts(name, expected):
    assert count(resolve_config(name)[0]).params == expected


def test_gpt3_count_within_half_a_percent_of_174_6b():
    assert count(resolve_config("gpt3-175b")[0]).params == pytest.approx(174.6e9, rel=0.005)


def test_every_published_count_within_two_percent():
    for name, path in zoo_entries().items():
        config = load_toml(path)
        if config.published_params:
            assert config.source, name
            assert count(config).params == pytest.approx(config.published_params, rel=0.02), name


def test_counts_match_transformers_on_meta_device():
    """An independent implementation's count of the same architectures."""
    transformers = pytest.importorskip("transformers")
    import torch

    with torch.device("meta"):
        hf = {
            "gpt2-small": transformers.GPT2LMHeadModel(transformers.GPT2Config()),
            "bert-base": transformers.BertModel(transformers.BertConfig()),
            "t5-large": transformers.T5ForConditionalGeneration(transformers.T5Config(
                d_model=1024, d_ff=4096, num_layers=24, num_heads=16, d_kv=64, vocab_size=32128)),
        }
    for name, model in hf.items():
        ours = count(resolve_config(name)[0]).params
        assert ours == sum(p.numel() for p in model.parameters()), name


def write(tmp_path, text, name="m.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """name = "x"\nfamily = "gpt"\nvocab_size = 100\nd_model = 32\nn_layers = 2\nn_heads = 4\nd_ff = 64\nmax_seq_len = 32\n"""


@pytest.mark.parametrize("extra, message", [
    ("n_head = 4\n", "unknown key 'n_head'; did you mean 'n_heads'?"),
    ('dropout = "high"\n', "key 'dropout' must be float"),
    ("bias = 1\n", "key 'bias' must be bool"),
    ('norm = "batchnorm"\n', "'norm' = 'batchnorm' is not one of layernorm, rmsnorm"),
    ("n_kv_heads = 3\n", "n_heads (4) is not divisible by n_kv_heads (3)"),
])
def test_bad_keys_are_named_with_the_fix(tmp_path, extra, message):
    path = write(tmp_path, GOOD + extra)
    with pytest.raises(UserError) as e:
        load_toml(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_d_model_not_divisible_by_heads(tmp_path):
    path = write(tmp_path, GOOD.replace("n_heads = 4", "n_heads = 5"))
    with pytest.raises(UserError, match=r"d_model \(32\) is not divisible by n_heads \(5\)"):
        load_toml(path)


def test_explicit_d_head_allows_any_width(tmp_path):
    config = load_toml(write(tmp_path, GOOD.replace("n_heads = 4", "n_heads = 5") + "d_head = 16\n"))
    assert config.d_attn == 80


def test_malformed_toml_and_missing_key(tmp_path):
    with pytest.raises(UserError, match="malformed TOML"):
        load_toml(write(tmp_path, GOOD + "d_ff = = 3\n"))
    with pytest.raises(UserError, match="missing required key 'd_ff'"):
        load_toml(write(tmp_path, GOOD.replace("d_ff = 64\n", "")))


def test_family_defaults_are_resolved():
    assert resolve_config("bert-base")[0].norm_position == "post"
    t5 = resolve_config("t5-small")[0]
    assert (t5.norm, t5.position, t5.bias, t5.n_decoder_layers) == ("rmsnorm", "relative", False, 6)
    palm = resolve_config("palm-540b")[0]
    assert (palm.n_kv_heads, palm.parallel_block, palm.activation) == (1, True, "swiglu")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UserError, match="did you mean gpt2-small"):
        resolve_config("gpt2-smal")


def test_extra_zoo_folder_from_environment(tmp_path, monkeypatch):
    write(tmp_path, GOOD.replace('"x"', '"my-model"'), "my-model.toml")
    monkeypatch.setenv("LLMCLI_ZOO_PATH", str(tmp_path))
    assert resolve_config("my-model")[0].d_model == 32
