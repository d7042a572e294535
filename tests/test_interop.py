"""Hugging Face interop: parity with transformers in both directions, exact round trips, refusals."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from llmcli import load_model  # noqa: E402
from llmcli.cli import app  # noqa: E402
from llmcli.config import ModelConfig  # noqa: E402
from llmcli.errors import UserError  # noqa: E402
from llmcli.interop.hf import convert_from_hf, convert_to_hf  # noqa: E402
from llmcli.model_dir import save_model  # noqa: E402
from llmcli.models import build_model  # noqa: E402

TOL = 1e-4  # fp32
LENGTHS = (9, 6, 3)  # right padding: rows 2 and 3 are padded


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    return ids * mask, mask  # padded positions hold the pad id 0


def _diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Max abs difference over the non-padded positions."""
    delta = (a - b).abs()
    return float(delta[mask.bool()].max() if mask is not None else delta.max())


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Fresh inits leave norms at 1 and biases at 0; noise makes every tensor count in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _save_hf(model, path: pathlib.Path, **kwargs) -> pathlib.Path:
    _perturb(model, 1)
    model.eval().save_pretrained(path, safe_serialization=True, **kwargs)
    return path


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)


# ---------------------------------------------------------------- from Hugging Face


GPT2_CASES = {
    "gelu_new": dict(n_embd=32, n_head=4, n_layer=2, vocab_size=101),
    "relu-n_inner": dict(n_embd=48, n_head=3, n_layer=2, vocab_size=257, n_inner=80, activation_function="relu",
                         layer_norm_epsilon=1e-6),
    "gelu-untied": dict(n_embd=64, n_head=8, n_layer=2, vocab_size=300, activation_function="gelu",
                        tie_word_embeddings=False),
    "pytorch_tanh": dict(n_embd=32, n_head=2, n_layer=3, vocab_size=120, n_inner=48,
                         activation_function="gelu_pytorch_tanh"),
}


@pytest.mark.parametrize("case", GPT2_CASES)
def test_gpt2_from_hf_matches_transformers(tmp_path, case):
    hf_cfg = transformers.GPT2Config(n_positions=32, bos_token_id=None, eos_token_id=None, **GPT2_CASES[case])
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    if not hf_cfg.tie_word_embeddings:
        assert hf.lm_head.weight is not hf.transformer.wte.weight
    src = _save_hf(hf, tmp_path / "hf")
    config = convert_from_hf(src, tmp_path / "ours")
    assert config.name == "hf" and config.d_ff == (hf_cfg.n_inner or 4 * hf_cfg.n_embd)
    assert config.tie_embeddings == hf_cfg.tie_word_embeddings

    ids, mask = _batch(hf_cfg.vocab_size)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, output_hidden_states=True)
        got = load_model(tmp_path / "ours")(ids, attention_mask=mask)
    assert _diff(got.logits, want.logits, mask) <= TOL
    assert _diff(got.hidden_states, want.hidden_states[-1], mask) <= TOL


def test_gpt2_base_model_without_head_converts(tmp_path):
    hf = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=90,
                                                        n_positions=16, bos_token_id=None, eos_token_id=None))
    convert_from_hf(_save_hf(hf, tmp_path / "hf"), tmp_path / "ours")
    ids, mask = _batch(90)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).last_hidden_state
        got = load_model(tmp_path / "ours")(ids, attention_mask=mask)
        want_logits = want @ hf.wte.weight.T  # the tied LM head
    assert _diff(got.hidden_states, want, mask) <= TOL
    assert _diff(got.logits, want_logits, mask) <= TOL


def _bert_config(**kwargs):
    base = dict(vocab_size=150, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=24, type_vocab_size=2)
    return transformers.BertConfig(**{**base, **kwargs})


def _bert_inputs(vocab: int):
    ids, mask = _batch(vocab)
    types = (torch.arange(ids.shape[1]) >= 4).long().expand_as(ids) * mask
    return ids, mask, types


@pytest.mark.parametrize("kwargs", [{}, dict(hidden_size=48, num_attention_heads=6, intermediate_size=40,
                                             hidden_act="gelu_new", layer_norm_eps=1e-7, type_vocab_size=3,
                                             tie_word_embeddings=False)], ids=["base", "untied-gelu_new"])
def test_bert_masked_lm_from_hf_matches_transformers(tmp_path, kwargs):
    hf_cfg = _bert_config(**kwargs)
    hf = transformers.BertForMaskedLM(hf_cfg)
    src = _save_hf(hf, tmp_path / "hf")
    config = convert_from_hf(src, tmp_path / "ours")
    assert config.pooler is False  # BertForMaskedLM has no pooler
    assert config.tie_embeddings == hf_cfg.tie_word_embeddings

    ids, mask, types = _bert_inputs(hf_cfg.vocab_size)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        got = load_model(tmp_path / "ours")(ids, attention_mask=mask, token_type_ids=types)
    assert _diff(got.logits, want.logits, mask) <= TOL
    assert _diff(got.hidden_states, want.hidden_states[-1], mask) <= TOL


def test_bert_model_without_mlm_head_gets_fresh_head_and_warning(tmp_path, capsys):
    hf = transformers.BertModel(_bert_config())
    src = _save_hf(hf, tmp_path / "hf")
    config = convert_from_hf(src, tmp_path / "ours")
    assert "mlm_head.dense.weight" in capsys.readouterr().err
    assert config.pooler is True and config.tie_embeddings is True

    ids, mask, types = _bert_inputs(150)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types)
        got = load_model(tmp_path / "ours")(ids, attention_mask=mask, token_type_ids=types)
    assert _diff(got.hidden_states, want.last_hidden_state, mask) <= TOL
    assert _diff(got.pooled, want.pooler_output) <= TOL
    assert torch.isfinite(got.logits).all()


def test_bert_base_uncased_layout_converts(tmp_path, capsys):
    """bert-base-uncased says BertForMaskedLM, also stores the NSP head (cls.seq_relationship, dropped with a
    warning) and names LayerNorm parameters gamma and beta (from its TensorFlow origin)."""
    from safetensors.torch import load_file, save_file

    hf = transformers.BertForPreTraining(_bert_config())
    src = _save_hf(hf, tmp_path / "hf")
    path = src / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "architectures": ["BertForMaskedLM"]}))
    tensors = load_file(src / "model.safetensors")
    renamed = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
               for name, t in tensors.items()}
    assert "bert.embeddings.LayerNorm.gamma" in renamed
    save_file(renamed, src / "model.safetensors", metadata={"format": "pt"})
    config = convert_from_hf(src, tmp_path / "ours")
    assert "cls.seq_relationship.weight" in capsys.readouterr().err
    assert config.pooler is True

    ids, mask, types = _bert_inputs(150)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types)
        got = load_model(tmp_path / "ours")(ids, attention_mask=mask, token_type_ids=types)
    assert _diff(got.logits, want.prediction_logits, mask) <= TOL


def _t5_config(**kwargs):
    base = dict(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=16, relative_attention_max_distance=20)
    return transformers.T5Config(**{**base, **kwargs})


def _t5_outputs(hf, ours, vocab: int):
    ids, mask = _batch(vocab)
    decoder_ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), _batch(vocab, seed=1)[0][:1, :5].expand(3, -1)], 1)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, output_hidden_states=True)
        got = ours(ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    return want, got, mask


T5_CASES = {
    "v1.0-relu-tied": dict(),
    "v1.1-gated-gelu-untied": dict(d_model=48, d_kv=16, d_ff=40, num_decoder_layers=3, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, layer_norm_epsilon=1e-5),
    "v1.1-transformers4-config": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", T5_CASES)
def test_t5_from_hf_matches_transformers(tmp_path, case):
    hf_cfg = _t5_config(**T5_CASES[case])
    hf = transformers.T5ForConditionalGeneration(hf_cfg)
    untied = "untied" in case or "transformers4" in case
    if untied:  # transformers 5 builds T5 v1.1 with lm_head tied to shared; real v1.1 checkpoints have their own
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(hf_cfg.vocab_size, hf_cfg.d_model) * 0.05)
    src = _save_hf(hf, tmp_path / "hf")
    if "transformers4" in case:  # as google/t5-v1_1-* configs say it, without scale_decoder_outputs
        path = src / "config.json"
        data = json.loads(path.read_text())
        del data["scale_decoder_outputs"]
        path.write_text(json.dumps({**data, "tie_word_embeddings": False}))
    config = convert_from_hf(src, tmp_path / "ours")
    assert config.tie_embeddings is not untied
    assert config.d_head == hf_cfg.d_kv and config.n_decoder_layers == hf_cfg.num_decoder_layers

    want, got, mask = _t5_outputs(hf, load_model(tmp_path / "ours"), hf_cfg.vocab_size)
    assert _diff(got.logits, want.logits) <= TOL
    assert _diff(got.hidden_states, want.decoder_hidden_states[-1]) <= TOL
    assert _diff(got.encoder_hidden_states, want.encoder_last_hidden_state, mask) <= TOL


def test_sharded_checkpoint_converts(tmp_path):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=100,
                                                              n_positions=16, bos_token_id=None, eos_token_id=None))
    src = _save_hf(hf, tmp_path / "hf", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 1
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    convert_from_hf(src, tmp_path / "ours")
    assert (tmp_path / "ours" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    ids, mask = _batch(100)
    with torch.no_grad():
        assert _diff(load_model(tmp_path / "ours")(ids, attention_mask=mask).logits,
                     hf(ids, attention_mask=mask).logits, mask) <= TOL


# ---------------------------------------------------------------- to Hugging Face and back


def _cfg(family: str, **kwargs) -> ModelConfig:
    sizes = dict(vocab_size=130, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=24, dropout=0.0)
    return ModelConfig(name="src", family=family, **{**sizes, **kwargs})


TO_HF_CASES = {
    "gpt-tied": (_cfg("gpt"), transformers.AutoModelForCausalLM, "GPT2LMHeadModel"),
    "gpt-relu-untied": (_cfg("gpt", activation="relu", d_ff=80, tie_embeddings=False, norm_eps=1e-6),
                        transformers.AutoModelForCausalLM, "GPT2LMHeadModel"),
    "bert-pooler": (_cfg("bert"), transformers.AutoModelForMaskedLM, "BertForMaskedLM"),
    "bert-untied": (_cfg("bert", d_model=48, n_heads=3, activation="gelu_tanh", pooler=False, tie_embeddings=False,
                         type_vocab_size=3), transformers.AutoModelForMaskedLM, "BertForMaskedLM"),
    "t5-relu-tied": (_cfg("t5"), transformers.AutoModelForSeq2SeqLM, "T5ForConditionalGeneration"),
    "t5-geglu-untied": (_cfg("t5", activation="geglu", d_head=12, n_decoder_layers=3, tie_embeddings=False,
                             relative_buckets=8, relative_max_distance=16),
                        transformers.AutoModelForSeq2SeqLM, "T5ForConditionalGeneration"),
    "t5-swiglu": (_cfg("t5", activation="swiglu"), transformers.AutoModelForSeq2SeqLM, "T5ForConditionalGeneration"),
}


@pytest.mark.parametrize("case", TO_HF_CASES)
def test_to_hf_matches_and_round_trips_exactly(tmp_path, case):
    config, auto_class, architecture = TO_HF_CASES[case]
    model = build_model(config, seed=0)
    _perturb(model, 2)
    (tmp_path / "src").mkdir()
    save_model(model, tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")

    assert convert_to_hf(tmp_path / "src", tmp_path / "hf") == architecture
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    hf = auto_class.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == architecture

    ours = load_model(tmp_path / "src")
    ids, mask = _batch(config.vocab_size)
    with torch.no_grad():
        if config.family == "t5":
            want, got, mask = _t5_outputs(hf, ours, config.vocab_size)
            hidden, logits_mask = want.decoder_hidden_states[-1], None
        else:
            want = hf(ids, attention_mask=mask, output_hidden_states=True)
            got = ours(ids, attention_mask=mask)
            hidden, logits_mask = want.hidden_states[-1], mask
    assert _diff(got.logits, want.logits, logits_mask) <= TOL
    assert _diff(got.hidden_states, hidden, logits_mask) <= TOL

    back_config = convert_from_hf(tmp_path / "hf", tmp_path / "back")
    assert {**back_config.to_dict(), "name": "src"} == config.to_dict()
    back = load_model(tmp_path / "back").state_dict()
    original = ours.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[name], original[name]) for name in original)


@pytest.mark.parametrize("position, message", [
    ("learned", "GPT2LMHeadModel.*n_kv_heads = 2"),  # GPT-2 has no grouped-query attention
    ("rope", "LlamaForCausalLM: norm = 'layernorm'.*activation = 'gelu_tanh'"),  # a rotary GPT goes out as Llama
])
def test_to_hf_refuses_what_the_architecture_cannot_express(tmp_path, position, message):
    save_dir = tmp_path / "model"
    save_dir.mkdir()
    save_model(build_model(_cfg("gpt", position=position, n_kv_heads=2), seed=0), save_dir)
    with pytest.raises(UserError, match=message):
        convert_to_hf(save_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- the CLI and its refusals


class _Trap:
    """Unpickling this creates a file: proof that a converter opened the pickle."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def test_cli_refuses_pickle_checkpoint_with_exit_2(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(tmp_path / "unpickled")))
    result = CliRunner().invoke(app, ["convert", "from-hf", str(src), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "pytorch_model.bin" in result.output and "pickle" in result.output
    assert not (tmp_path / "unpickled").exists() and not (tmp_path / "out").exists()


def test_cli_refuses_unsupported_architecture(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"],
                                                 "model_type": "deepseek_v3"}))
    (src / "model.safetensors").write_bytes(b"")
    result = CliRunner().invoke(app, ["convert", "from-hf", str(src), str(tmp_path / "out")])
    assert result.exit_code == 2 and "DeepseekV3ForCausalLM" in result.output
    assert all(name in result.output for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM"))


def test_cli_round_trip_and_no_overwrite_without_force(tmp_path):
    hf = transformers.T5ForConditionalGeneration(_t5_config())
    src = _save_hf(hf, tmp_path / "hf")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "from-hf", str(src), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    assert "converted" in result.output
    result = runner.invoke(app, ["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf2")])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf2")])
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, ["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf2"),
                               "--force"]).exit_code == 0
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf2")
    want, got = hf.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)
