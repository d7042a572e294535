"""Tokenizer training: exact vocabulary sizes, special ids, round trips, templates, determinism, the CLI."""

import json
import unicodedata

import pytest
import typer
from tokenizers import Tokenizer, models
from typer.testing import CliRunner

from conftest import tiny_config
from llmcli.data import default_corpus
from llmcli.errors import UserError
from llmcli.model_dir import write_json
from llmcli.tokenizer import (encode_plain, minimum_vocab_size, save_tokenizer, special_ids, tokenizer_kind,
                              train_tokenizer)

KINDS = ("bpe", "wordpiece", "unigram")
VOCAB = 400


@pytest.fixture(scope="module")
def docs():
    return default_corpus()[:6]  # about 30k characters


@pytest.fixture(scope="module")
def trained(docs):
    return {kind: train_tokenizer(docs, kind, VOCAB) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_vocab_size_is_exact(trained, kind):
    assert trained[kind].get_vocab_size() == VOCAB
    assert tokenizer_kind(trained[kind]) == kind


def test_special_ids(trained):
    gpt, bert, t5 = (special_ids(trained[kind]) for kind in KINDS)
    assert (gpt.pad, gpt.eos, gpt.mask) == (0, 0, None)
    assert (bert.pad, bert.unk, bert.cls, bert.sep, bert.mask, bert.eos) == (0, 1, 2, 3, 4, None)
    assert (t5.pad, t5.eos, t5.unk) == (0, 1, 2)  # <pad> = 0 is T5's decoder start token
    assert t5.sentinels == list(range(3, 3 + VOCAB // 20))
    assert trained["unigram"].id_to_token(t5.sentinels[-1]) == f"<extra_id_{VOCAB // 20 - 1}>"


def test_bpe_round_trip_is_exact_and_never_unknown(trained):
    text = "Hello  wörld\n\tdef f(x):\n    return x ** 2  # 😀 ünïcödé, 中文\r\n"
    ids = trained["bpe"].encode(text).ids
    assert trained["bpe"].decode(ids) == text
    assert 0 not in ids  # no <|endoftext|> stands in for an unseen character


def test_wordpiece_round_trip_and_bert_template(trained):
    tokenizer = trained["wordpiece"]
    text = "The Python Language Reference, Chapter 3: Data model."
    encoding = tokenizer.encode(text)
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
    decoded = tokenizer.decode(encoding.ids)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    assert tokenizer.encode(decoded).ids == encoding.ids
    pair = tokenizer.encode("first part", "second part")
    assert pair.tokens.count("[SEP]") == 2 and pair.type_ids[-1] == 1 and pair.type_ids[0] == 0


def test_unigram_round_trip_and_eos(trained):
    tokenizer = trained["unigram"]
    text = "The  object model\nof Python ﬁts"  # ﬁ is NFKC-normalised to "fi"
    encoding = tokenizer.encode(text)
    assert encoding.tokens[-1] == "</s>"
    assert tokenizer.decode(encoding.ids) == unicodedata.normalize("NFKC", text)


def test_encode_plain_has_no_template_tokens(trained):
    tokenizer = trained["wordpiece"]
    texts = ["first document", "the second one"]
    assert encode_plain(tokenizer, texts) == [tokenizer.encode(t).ids[1:-1] for t in texts]


@pytest.mark.parametrize("kind", KINDS)
def test_training_is_deterministic(docs, trained, kind):
    # The trainers iterate Rust hash maps, whose order differs per instance: identical JSON needs our fixes.
    assert train_tokenizer(docs, kind, VOCAB).to_str() == trained[kind].to_str()


@pytest.mark.parametrize("kind", KINDS)
def test_too_small_vocab_is_a_user_error_naming_the_exact_minimum(docs, kind):
    need = minimum_vocab_size(docs, kind)
    assert need == 257 if kind == "bpe" else 90 < need < 120  # specials + ~90 characters (+ "##x" pieces)
    with pytest.raises(UserError, match=f"--vocab-size {need - 1} is too small.*use --vocab-size {need} or more"):
        train_tokenizer(docs, kind, need - 1)
    assert train_tokenizer(docs, kind, need).get_vocab_size() == need


def test_special_ids_of_a_tokenizer_without_its_specials():
    with pytest.raises(UserError, match="lacks <|endoftext|>"):
        special_ids(Tokenizer(models.BPE()))


def test_save_tokenizer_is_loadable(trained, tmp_path):
    path = save_tokenizer(trained["unigram"], tmp_path)
    assert Tokenizer.from_file(str(path)).to_str() == trained["unigram"].to_str()
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


# ---------------------------------------------------------------- the CLI


@pytest.fixture
def run(docs, tmp_path):
    """`llmcli tokenizer ...` on an app that mounts the sub-app the way llmcli.cli does."""
    from llmcli.cli import _Group
    from llmcli.cli import tokenizer as tokenizer_cmd

    app = typer.Typer(cls=_Group)
    app.add_typer(tokenizer_cmd.app, name="tokenizer")
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    return lambda *args: CliRunner().invoke(app, ["tokenizer", *map(str, args)])


@pytest.mark.parametrize("kind", KINDS)
def test_cli_train_writes_a_loadable_tokenizer(run, tmp_path, kind):
    result = run("train", "--data", tmp_path / "corpus.txt", "--vocab-size", 350, "--kind", kind,
                 "--out", tmp_path / "t")
    assert result.exit_code == 0, result.stderr
    tokenizer = Tokenizer.from_file(str(tmp_path / "t" / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 350 and tokenizer_kind(tokenizer) == kind
    assert f"trained {kind} tokenizer: vocab 350" in result.stderr and "chars/token" in result.stderr


def test_cli_refuses_to_overwrite_without_force(run, tmp_path):
    args = ("train", "--data", tmp_path / "corpus.txt", "--vocab-size", 300, "--out", tmp_path / "t")
    assert run(*args).exit_code == 0
    result = run(*args)
    assert result.exit_code == 2 and "pass --force" in result.stderr
    assert run(*args, "--force").exit_code == 0


def test_cli_writes_into_a_model_directory_and_checks_its_vocab(run, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    write_json(model / "config.json", tiny_config("gpt", vocab_size=320).to_dict())
    result = run("train", "--data", tmp_path / "corpus.txt", "--vocab-size", 400, "--out", model)
    assert result.exit_code == 2 and "vocab_size is 320" in result.stderr
    assert run("train", "--data", tmp_path / "corpus.txt", "--vocab-size", 320, "--out", model).exit_code == 0
    assert json.loads((model / "config.json").read_text())["vocab_size"] == 320  # the model is untouched
    assert Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab_size() == 320


@pytest.mark.parametrize("args, message", [
    (["--kind", "sentencepiece"], "--kind 'sentencepiece' is not one of"),
    (["--data", "{tmp}/missing.txt"], "missing.txt: no such file or folder"),
    (["--vocab-size", "100"], "--vocab-size 100 is too small"),
])
def test_cli_bad_input_exits_2(run, tmp_path, args, message):
    defaults = {"--vocab-size": "300", "--out": str(tmp_path / "t")}
    given = dict(zip(args[::2], args[1::2]))
    argv = [x for k, v in {**defaults, **given}.items() for x in (k, v.format(tmp=tmp_path))]
    result = run("train", *argv)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "t").exists()
