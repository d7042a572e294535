"""Faults while writing: a process killed at seeded random points, Ctrl-C, and a full disk. Afterwards the output
is the complete old one, absent, or complete and new, never partial; a stopped run resumes bit-identically."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY = ('name = "fault-gpt"\nfamily = "gpt"\nvocab_size = 320\nd_model = 32\nn_layers = 2\nn_heads = 2\n'
        'd_ff = 64\nmax_seq_len = 64\n')
FAULT_SEED = 17


def digest(path: Path) -> str | None:
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def llmcli(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmcli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def killed_at(args, delay: float, sig=signal.SIGKILL) -> None:
    child = llmcli(*args)
    try:
        child.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        child.send_signal(sig)
        child.wait(timeout=60)


def complete_model_dir(path: Path) -> bool:
    from llmcli import load_model

    try:
        load_model(path)
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("faults")
    (root / "tiny.toml").write_text(TINY)
    for args in (["build", root / "tiny.toml", "--out", root / "model"],
                 ["tokenizer", "train", "--data", corpus, "--vocab-size", 300, "--out", root / "model"],
                 ["convert", "to-hf", root / "model", root / "hf"],
                 ["finetune", root / "model", "--method", "lora", "--task", "lm", "--data", corpus, "--out",
                  root / "lora", "--steps", 2, "--batch-size", 2, "--seq-len", 16]):
        assert llmcli(*args).wait() == 0
    return root


KILLED = {"build": 3, "quantize": 3, "to-hf": 3, "from-hf": 2, "prune": 2, "merge": 2}  # kills per command


@pytest.mark.parametrize("command", sorted(KILLED))
def test_a_kill_at_any_point_leaves_the_old_output_or_the_new_one(command, base, tmp_path, corpus):
    """Each command replaces (--force) an existing output and is SIGKILLed at seeded random moments;
    the output is then exactly the old one or a complete new one."""
    out = tmp_path / "out"
    data = ["--data", corpus, "--seq-len", 16]
    args = {"build": ["build", base / "tiny.toml", "--out", out, "--seed", 1],
            "quantize": ["quantize", base / "model", "--scheme", "int8", "--out", out, "--no-speed", *data],
            "prune": ["prune", base / "model", "--method", "magnitude", "--out", out, "--no-speed", *data],
            "merge": ["merge", base / "lora", "--out", out],
            "from-hf": ["convert", "from-hf", base / "hf", out],
            "to-hf": ["convert", "to-hf", base / "model", out]}[command] + ["--force"]
    first = llmcli(*args)
    start = time.perf_counter()
    assert first.wait() == 0, first.stderr.read().decode()
    duration = time.perf_counter() - start
    rng = random.Random(f"{FAULT_SEED}-{command}")
    for delay in sorted(rng.uniform(0.2, duration) for _ in range(KILLED[command])):
        old = digest(out)
        killed_at(args, delay)
        now = digest(out)
        assert now is not None, f"killed after {delay:.2f} s: the output vanished"
        complete = complete_model_dir(out) if command != "to-hf" else (out / "model.safetensors").is_file()
        assert now == old or complete, f"killed after {delay:.2f} s: a partial output"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.old-")]


def test_a_killed_tokenizer_run_leaves_no_partial_tokenizer(base, tmp_path, corpus):
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--data", corpus, "--vocab-size", 300, "--out", out]
    rng = random.Random(f"{FAULT_SEED}-tokenizer")
    for delay in (rng.uniform(0.2, 3.0), rng.uniform(0.2, 3.0)):
        killed_at(args, delay)
        if out.exists():
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(out / "tokenizer.json"))  # complete, or not there at all
            break


def test_ctrl_c_stops_with_a_checkpoint_and_the_resumed_run_is_bit_identical(base, tmp_path, corpus):
    common = ["--data", corpus, "--steps", 40, "--batch-size", 4, "--seq-len", 32, "--save-every", 5]
    assert llmcli("train", base / "tiny.toml", "--out", tmp_path / "straight", *common).wait() == 0
    run = tmp_path / "stopped"
    child = llmcli("train", base / "tiny.toml", "--out", run, *common)
    for _ in range(2400):  # Ctrl-C once training is under way (a first checkpoint at step 5)
        if (run / "checkpoints").is_dir() or child.poll() is not None:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=120) == 0, child.stderr.read().decode()
    from llmcli.training.checkpoint import complete_checkpoints

    stopped_at = int(complete_checkpoints(run)[-1].name.removeprefix("step-"))
    assert 5 <= stopped_at < 40, "Ctrl-C did not stop the run early"
    resumed = llmcli("train", base / "tiny.toml", "--out", run, "--resume")
    assert resumed.wait() == 0, resumed.stderr.read().decode()
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_previous_output_and_says_so(base, tmp_path, corpus, cli, monkeypatch):
    out = tmp_path / "q"
    args = ["quantize", base / "model", "--scheme", "int8", "--out", out, "--no-speed", "--data", corpus,
            "--seq-len", 16]
    assert cli(*args).exit_code == 0
    before = digest(out)
    import llmcli.model_dir

    monkeypatch.setattr(llmcli.model_dir, "save_file", _disk_full)
    result = cli(*args, "--force")
    assert result.exit_code == 2 and "no space left" in result.stderr and "is unchanged" in result.stderr
    assert digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q.tmp-")]


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(base, tmp_path, corpus, monkeypatch):
    import llmcli.training.checkpoint as checkpoint
    from llmcli.errors import UserError
    from llmcli.training.pretrain import pretrain
    from llmcli.training.run import TrainFlags

    real, calls = checkpoint.save_file, []

    def fails_on_the_second_checkpoint(*args, **kwargs):
        calls.append(args[1])
        if any("step-4" in str(c) for c in calls):
            _disk_full()
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fails_on_the_second_checkpoint)
    flags = TrainFlags(steps=6, batch_size=2, seq_len=16, save_every=2, eval_batches=1)
    with pytest.raises(UserError, match="no space left.*step-2 is kept"):
        pretrain(str(base / "tiny.toml"), corpus, str(tmp_path / "run"), flags, log=lambda *a: None)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-2"]
    monkeypatch.setattr(checkpoint, "save_file", real)
    resumed = pretrain(str(base / "tiny.toml"), None, str(tmp_path / "run"), TrainFlags(resume=True),
                       log=lambda *a: None)
    assert resumed["steps_run"] == 4


def test_a_second_process_writing_the_same_output_is_refused(base, tmp_path, corpus, cli):
    """A run holds its output; a second one is refused with exit 2 and the first finishes untouched."""
    out = tmp_path / "run"
    first = llmcli("train", base / "tiny.toml", "--data", corpus, "--out", out, "--steps", 200, "--batch-size", 2,
                   "--seq-len", 32)
    for _ in range(600):
        if (out / "training.json").is_file() or first.poll() is not None:
            break
        time.sleep(0.05)
    second = cli("train", base / "tiny.toml", "--data", corpus, "--out", out, "--steps", 2, "--force")
    assert second.exit_code == 2 and "another llmcli process" in second.stderr, second.stderr
    assert cli("build", base / "tiny.toml", "--out", out, "--force").exit_code == 2
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    assert complete_model_dir(out)
