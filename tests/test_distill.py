"""Distillation: the KD loss against a hand computation, teacher-layer initialisation, the CLI end to end."""

import json
import math

import pytest
import torch

from llmcli.compression.distill import half_depth
from llmcli.training.distillation import copy_from_teacher, kd_loss, teacher_layer_map
from llmcli.models import build_model
from llmcli.training.pretrain import pretrain
from llmcli.training.run import TrainFlags
from conftest import one_thread, tiny_config

FAST = dict(steps=4, batch_size=4, seq_len=32, log_every=1, eval_batches=2)
TEACHER = 'name = "tiny-teacher"\nfamily = "gpt"\nvocab_size = 320\nd_model = 32\nn_layers = 4\nn_heads = 2\n' \
          'd_ff = 64\nmax_seq_len = 64\ndropout = 0.0\n'


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus) -> str:
    directory = tmp_path_factory.mktemp("teacher")
    (directory / "tiny-teacher.toml").write_text(TEACHER)
    pretrain(str(directory / "tiny-teacher.toml"), corpus, str(directory / "run"), TrainFlags(**{**FAST, "steps": 8}),
             log=lambda *a, **k: None)
    return str(directory / "run")


def test_kd_loss_equals_a_hand_computed_value():
    student = torch.tensor([[[1.0, 2.0, 0.0, 9.0], [0.5, -1.0, 2.0, 9.0], [3.0, 3.0, 3.0, 3.0]]])
    teacher = torch.tensor([[[2.0, 1.0, 0.0, -9.0], [0.0, 0.0, 1.0, -9.0], [1.0, 2.0, 3.0, 4.0]]])
    labels = torch.tensor([[1, 2, -100]])  # the last position is not scored
    t = 2.0

    def softmax(row):
        exps = [math.exp(x / t) for x in row]
        return [e / sum(exps) for e in exps]

    expected = 0.0
    for position in range(2):  # only the first 3 logits are the tokenizer's vocabulary
        p = softmax(teacher[0, position, :3].tolist())
        q = softmax(student[0, position, :3].tolist())
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = expected / 2 * t**2
    assert kd_loss(student, teacher, labels, t, vocab=3).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(teacher, teacher, labels, t, vocab=3).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_layers_are_evenly_spaced():
    assert teacher_layer_map(12, 6) == [0, 2, 4, 6, 8, 10]
    assert teacher_layer_map(4, 2) == [0, 2]
    assert teacher_layer_map(3, 2) == [0, 1]
    assert teacher_layer_map(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_student_starts_from_every_other_teacher_layer(family):
    teacher_config = tiny_config(family, n_layers=4, **({"n_decoder_layers": 4} if family == "t5" else {}))
    student_config = half_depth(teacher_config, None)
    assert student_config.n_layers == 2
    assert student_config.n_decoder_layers == (2 if family == "t5" else None)
    teacher, student = build_model(teacher_config, seed=0), build_model(student_config, seed=1)
    copy_from_teacher(student, teacher)
    t, s = teacher.state_dict(), student.state_dict()
    stack = "decoder" if family == "gpt" else "encoder"
    assert torch.equal(s[f"{stack}.blocks.1.attn.q_proj.weight"], t[f"{stack}.blocks.2.attn.q_proj.weight"])
    assert torch.equal(s[f"{stack}.blocks.0.ff.down.weight"], t[f"{stack}.blocks.0.ff.down.weight"])
    assert torch.equal(s["tok_emb.weight"], t["tok_emb.weight"])
    if family == "t5":
        assert torch.equal(s["decoder.blocks.1.cross_attn.k_proj.weight"], t["decoder.blocks.2.cross_attn.k_proj.weight"])


def test_distill_cli_reports_teacher_student_and_baseline(tmp_path, teacher, corpus, cli):
    out = tmp_path / "student"
    result = cli("distill", "--teacher", teacher, "--data", corpus, "--out", out, "--steps", 4, "--batch-size", 4,
                 "--seq-len", 32, "--init-from-teacher", "--baseline", "--no-speed", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["student"] == "tiny-teacher-2l"
    assert json.loads((out / "config.json").read_text())["n_layers"] == 2
    assert report["after"]["params"] < report["before"]["params"]
    assert report["change"]["size_ratio"] > 1.3
    # the report's student perplexity is the run's own final validation, on the same batches
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert report["after"]["perplexity"] == pytest.approx(final["val_perplexity"], rel=1e-6)
    assert report["baseline"]["perplexity"] > 1 and (out / "baseline" / "model.safetensors").is_file()
    assert json.loads((out / "compression.json").read_text())["after"] == report["after"]
    generated = cli("generate", out, "--prompt", "The", "--max-new-tokens", 4, "--json")
    assert generated.exit_code == 0, generated.output


def test_padded_student_vocabulary_is_accepted(tmp_path, teacher, corpus, cli):
    student = tmp_path / "wide-vocab.toml"
    student.write_text(TEACHER.replace("tiny-teacher", "wide").replace("320", "384").replace("n_layers = 4",
                                                                                             "n_layers = 1"))
    result = cli("distill", "--teacher", teacher, "--student", student, "--data", corpus, "--out", tmp_path / "s",
                 "--steps", 2, "--batch-size", 2, "--seq-len", 16, "--no-speed", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["after"]["perplexity"] > 1


def test_bad_distill_input_exits_2(tmp_path, teacher, corpus, cli):
    bert = tmp_path / "bert.toml"
    bert.write_text(TEACHER.replace('"gpt"', '"bert"'))
    cases = [
        (["--student", bert], "one family"),
        (["--alpha", "1.5"], "--alpha"),
        (["--temperature", "0"], "--temperature"),
        (["--student-layers", "9"], "--student-layers"),
    ]
    for extra, message in cases:
        result = cli("distill", "--teacher", teacher, "--data", corpus, "--out", tmp_path / "x", *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.stderr and "Traceback" not in result.output
    result = cli("distill", "--teacher", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "not a model directory" in result.stderr


def test_a_student_with_another_tokenizer_is_refused(tmp_path, teacher, corpus, cli):
    other = tmp_path / "other"
    (tmp_path / "t.toml").write_text(TEACHER.replace("tiny-teacher", "other"))
    from pydoc_data.topics import topics

    text = tmp_path / "other.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[12:24]))  # another corpus, another vocabulary
    pretrain(str(tmp_path / "t.toml"), str(text), str(other), TrainFlags(**{**FAST, "steps": 1}), log=lambda *a, **k: None)
    result = cli("distill", "--teacher", teacher, "--student", other, "--data", corpus, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "tokenizer differs" in result.stderr
