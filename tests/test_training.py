"""The training loop: exact resume, determinism, crash safety, divergence, objectives that learn."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from llmcli.errors import UserError
from llmcli.training.optim import lr_factor, make_optimizer
from llmcli.training.pretrain import pretrain
from llmcli.training.run import TrainFlags

TINY = {
    "gpt": 'family = "gpt"\nvocab_size = 320\nd_model = 32\nn_layers = 2\nn_heads = 2\nd_ff = 64\nmax_seq_len = 64\n'
           'dropout = 0.1\n',
    "bert": 'family = "bert"\nvocab_size = 400\nd_model = 48\nn_layers = 2\nn_heads = 2\nd_ff = 96\nmax_seq_len = 64\n'
            'dropout = 0.0\n',
    "t5": 'family = "t5"\nvocab_size = 400\nd_model = 48\nn_layers = 2\nn_heads = 2\nd_ff = 96\nmax_seq_len = 64\n'
          'dropout = 0.0\nrelative_buckets = 16\nrelative_max_distance = 32\n',
}
FAST = dict(steps=6, batch_size=4, seq_len=32, log_every=1, eval_batches=2)


def model_toml(tmp_path, family="gpt"):
    path = tmp_path / f"tiny-{family}.toml"
    path.write_text(f'name = "tiny-{family}"\n' + TINY[family])
    return str(path)


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "model.safetensors"))


def quiet(*args, **kwargs):
    pass


def test_same_seed_gives_bit_identical_weights_and_another_seed_does_not(tmp_path, corpus):
    toml = model_toml(tmp_path)
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        pretrain(toml, corpus, str(tmp_path / name), TrainFlags(**FAST, seed=seed), log=quiet)
        runs[name] = weights(tmp_path / name)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_stop_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, corpus):
    toml = model_toml(tmp_path)
    args = {**FAST, "grad_accum": 2}
    pretrain(toml, corpus, str(tmp_path / "straight"), TrainFlags(**args), log=quiet)

    def stop_at_3(trainer):
        if trainer.step == 3:
            trainer.stop_requested = True  # what the first Ctrl-C does

    stopped = pretrain(toml, corpus, str(tmp_path / "resumed"), TrainFlags(**args), on_step=stop_at_3, log=quiet)
    assert stopped["stopped_early"] and stopped["step"] == 3
    assert (tmp_path / "resumed" / "checkpoints" / "step-3").is_dir()
    resumed = pretrain(toml, None, str(tmp_path / "resumed"), TrainFlags(resume=True), log=quiet)
    assert resumed["step"] == 6 and resumed["steps_run"] == 3
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, corpus):
    """A child process trains, saves step 2, then is killed in the middle of writing step 4."""
    toml = model_toml(tmp_path)
    run = tmp_path / "run"
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import pathlib, time
        import llmcli.training.checkpoint as state
        from llmcli.training.pretrain import pretrain
        from llmcli.training.run import TrainFlags
        real_save = state.save_model
        def slow_save(model, directory):
            if "step-4" in str(directory):
                (directory / "model.safetensors").write_bytes(b"half")
                pathlib.Path({str(marker)!r}).touch()
                time.sleep(60)
            real_save(model, directory)
        state.save_model = slow_save
        pretrain({toml!r}, {corpus!r}, {str(run)!r}, TrainFlags(steps=6, batch_size=2, seq_len=16, save_every=2),
                 log=lambda *a: None)
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):
            if marker.exists() or child.poll() is not None:
                break
            import time
            time.sleep(0.1)
        assert marker.exists(), "the child never reached the checkpoint write"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    from llmcli.training.checkpoint import complete_checkpoints
    from llmcli import load_model

    assert [p.name for p in complete_checkpoints(run)] == ["step-2"]
    assert load_model(run / "checkpoints" / "step-2").num_parameters() > 0
    resumed = pretrain(toml, None, str(run), TrainFlags(resume=True), log=quiet)
    assert resumed["step"] == 6 and resumed["steps_run"] == 4


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, corpus):
    from llmcli.training.loop import TrainingDiverged

    def poison(trainer):
        if trainer.step == 2:
            for p in trainer.model.parameters():
                p.data.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3.*step-2"):
        pretrain(model_toml(tmp_path), corpus, str(tmp_path / "run"), TrainFlags(**FAST, save_every=2), on_step=poison,
                 log=quiet)
    from llmcli import load_model

    restored = load_model(tmp_path / "run" / "checkpoints" / "step-2")
    assert all(torch.isfinite(p).all() for p in restored.parameters())


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_each_objective_lowers_validation_loss_on_the_default_corpus(tmp_path, family):
    result = pretrain(model_toml(tmp_path, family), None, str(tmp_path / "run"),
                      TrainFlags(steps=60, batch_size=8, seq_len=64, lr=3e-3, eval_every=20, eval_batches=4), log=quiet)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in history if "val_loss" in r]
    assert len(val) == 4  # steps 0 (untrained), 20, 40, 60
    assert val[-1] < val[1] < val[0], val
    assert val[-1] < val[0] - 0.5, val
    assert result["val_loss"] == val[-1]
    assert (tmp_path / "run" / "tokenizer.json").is_file()


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    assert lr_factor(0, warmup=10, total=110) == pytest.approx(0.1)
    assert lr_factor(9, warmup=10, total=110) == pytest.approx(1.0)
    assert lr_factor(60, warmup=10, total=110) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert lr_factor(110, warmup=10, total=110) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    from conftest import tiny_config
    from llmcli.models import build_model

    model = build_model(tiny_config("gpt"), seed=0)
    decay, no_decay = make_optimizer(model, 1e-3, 0.1).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_eval_cli_reports_loss_and_perplexity(tmp_path, corpus, cli):
    pretrain(model_toml(tmp_path), corpus, str(tmp_path / "run"), TrainFlags(**FAST), log=quiet)
    result = cli("eval", tmp_path / "run", "--data", corpus, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["perplexity"] == pytest.approx(math.exp(data["loss"]))
    assert data["tokens"] > 0
    # bits per byte by hand: the held-out documents' UTF-8 bytes over their tokens (eos separators included)
    from llmcli.data import document_stream, read_corpus, split_documents
    from llmcli.model_dir import load_tokenizer

    _, val_docs = split_documents(read_corpus(corpus))
    tokens = len(document_stream(load_tokenizer(tmp_path / "run"), val_docs))
    bytes_per_token = sum(len(doc.encode("utf-8")) for doc in val_docs) / tokens
    assert data["bytes_per_token"] == pytest.approx(bytes_per_token)
    assert data["bits_per_byte"] == pytest.approx(data["loss"] / math.log(2) / bytes_per_token)


@pytest.mark.parametrize("extra, message", [
    (["--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--seq-len", "65"], "above tiny-gpt's max_seq_len (64)"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs CUDA"),
    (["--steps", "0"], "--steps must be positive"),
])
def test_bad_training_input_exits_2(tmp_path, cli, extra, message):
    result = cli("train", model_toml(tmp_path), "--out", tmp_path / "run", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_force_with_a_bad_flag_keeps_the_old_run(tmp_path, corpus, cli, command):
    """--force replaces an old run only once the new one has passed every check."""
    pretrain(model_toml(tmp_path), corpus, str(tmp_path / "base"), TrainFlags(**FAST), log=quiet)
    source = [model_toml(tmp_path)] if command == "train" else [tmp_path / "base", "--method", "lora",
                                                                               "--task", "lm"]
    common = ["--data", corpus, "--out", tmp_path / "run", "--steps", 2, "--batch-size", 2, "--seq-len", 16]
    first = cli(command, *source, *common)
    assert first.exit_code == 0, first.stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    for bad in (["--lr", "-1"], ["--seq-len", "65"], ["--logger", "wandb"]):
        result = cli(command, *source, *common, "--force", *bad)
        assert result.exit_code == 2, result.output
        assert {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before, bad


def test_empty_corpus_and_vocab_mismatch_exit_2(tmp_path, cli, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    result = cli("train", model_toml(tmp_path), "--data", empty, "--out", tmp_path / "run")
    assert result.exit_code == 2 and str(empty) in result.stderr
    # a model directory whose tokenizer is larger than the model's vocabulary
    import shutil

    from llmcli.config import load_toml
    from llmcli.model_dir import build_model_dir

    pretrain(model_toml(tmp_path), corpus, str(tmp_path / "small"), TrainFlags(**FAST), log=quiet)
    toml = tmp_path / "smaller.toml"
    toml.write_text('name = "smaller"\n' + TINY["gpt"].replace("vocab_size = 320", "vocab_size = 100"))
    build_model_dir(load_toml(toml), tmp_path / "mismatch", seed=0)
    shutil.copy(tmp_path / "small" / "tokenizer.json", tmp_path / "mismatch" / "tokenizer.json")
    result = cli("train", tmp_path / "mismatch", "--data", corpus, "--out", tmp_path / "run2")
    assert result.exit_code == 2 and "tokenizer has 320 tokens but smaller has vocab_size 100" in result.stderr


def test_existing_run_needs_resume_or_force(tmp_path, corpus, cli):
    pretrain(model_toml(tmp_path), corpus, str(tmp_path / "run"), TrainFlags(**FAST), log=quiet)
    result = cli("train", model_toml(tmp_path), "--data", corpus, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "--resume" in result.stderr


@pytest.mark.slow
def test_default_gpt_micro_run_beats_a_unigram_model_threefold(tmp_path):
    """The README's main job: `llmcli train gpt-micro` with no other arguments."""
    from llmcli.data import document_stream, read_corpus, split_documents, unigram_perplexity
    from llmcli.model_dir import load_tokenizer

    proc = subprocess.run([sys.executable, "-m", "llmcli", "train", "gpt-micro", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    model_ppl = [r["val_perplexity"] for r in history if "val_perplexity" in r][-1]
    tokenizer = load_tokenizer(tmp_path / "run")
    train_docs, val_docs = split_documents(read_corpus(None))
    baseline = unigram_perplexity(document_stream(tokenizer, train_docs), document_stream(tokenizer, val_docs),
                                  tokenizer.get_vocab_size())
    assert model_ppl * 3 <= baseline, (model_ppl, baseline)
