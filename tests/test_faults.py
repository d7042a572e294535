"""Faults while writing: a process killed in the middle of writing its output and just before putting it in place,
Ctrl-C, a full disk, a second writer. Afterwards the output is the complete old one, absent, or complete and new,
never partial; a stopped run resumes bit-identically."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import one_thread

TINY = ('name = "fault-gpt"\nfamily = "gpt"\nvocab_size = 320\nd_model = 32\nn_layers = 2\nn_heads = 2\n'
        'd_ff = 64\nmax_seq_len = 64\n')


@pytest.fixture(scope="module", autouse=True)
def _threads():
    yield from one_thread()  # as the children (OMP_NUM_THREADS=1), so in-process runs give the same bits


def digest(path: Path) -> str | None:
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def llmcli(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmcli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


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


# The end of every child script below: llmcli with the arguments after the marker and the point to stop at.
RUN_LLMCLI = """
from llmcli.cli import main
sys.argv = ["llmcli", *sys.argv[3:]]
main()
"""

# A child llmcli that stops at a chosen point of writing its output, so that the kill lands exactly there:
# "write": model.safetensors (or tokenizer.json) half written into the temporary directory;
# "swap": the new output complete in the temporary directory, just before it is exchanged with the old one.
CHILD = """
import pathlib, sys, time
import llmcli.interop.hf as hf
import llmcli.model_dir as m
marker, where = pathlib.Path(sys.argv[1]), sys.argv[2]

def pause():
    marker.touch()
    time.sleep(300)

def halved(write):
    def half(obj, path, *args, **kwargs):
        result = write(obj, path, *args, **kwargs)
        target = pathlib.Path(path) if not pathlib.Path(path).is_dir() else pathlib.Path(path) / "tokenizer.json"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        pause()
        return result
    return half

if where == "write":
    m.save_file, hf.save_file, m.save_tokenizer = halved(m.save_file), halved(hf.save_file), halved(m.save_tokenizer)
else:
    exchange = m._exchange
    m._exchange = lambda a, b: (pause(), exchange(a, b))[1]
""" + RUN_LLMCLI
WRITERS = ("build", "quantize", "prune", "merge", "from-hf", "to-hf", "tokenizer")


def signalled_at(child_code: str, args, where: str, marker: Path, signum=signal.SIGKILL) -> tuple[int, str]:
    """Run `child_code` (CHILD or RUN_CHILD) until it reaches `where`, then send it `signum`; its exit code and
    stderr."""
    child = subprocess.Popen([sys.executable, "-c", child_code, marker, where, *map(str, args)],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(2400):
            if marker.exists() or child.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), f"the child never reached {where}: {child.stderr.read().decode()[-1500:]}"
        child.send_signal(signum)
        child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()
    return child.returncode, child.stderr.read().decode()


def stopped_cleanly(code: int, stderr: str) -> bool:
    """Ctrl-C: exit code 130, no traceback, and one closing line that says so (after the command's own logs)."""
    lines = stderr.strip().splitlines()
    return code == 130 and "Traceback" not in stderr and lines[-1].startswith("stopped") and \
        sum(line.startswith("stopped") for line in lines) == 1


@pytest.mark.parametrize("command", WRITERS)
def test_a_kill_while_writing_leaves_the_old_output_and_the_next_run_completes(command, base, tmp_path, corpus, cli):
    """Stopped by Ctrl-C with the new output half written, then killed with it complete but not yet in place: the
    old output is untouched both times (or, for a first output, absent); the next run cleans up and completes."""
    out = tmp_path / "out"
    data = ["--data", corpus, "--seq-len", 16]
    args = {"build": ["build", base / "tiny.toml", "--out", out, "--seed", 1],
            "quantize": ["quantize", base / "model", "--scheme", "int8", "--out", out, "--no-speed", *data],
            "prune": ["prune", base / "model", "--method", "magnitude", "--out", out, "--no-speed", *data],
            "merge": ["merge", base / "lora", "--out", out],
            "from-hf": ["convert", "from-hf", base / "hf", out],
            "to-hf": ["convert", "to-hf", base / "model", out],
            "tokenizer": ["tokenizer", "train", "--data", corpus, "--vocab-size", 300, "--out", out]}[command]
    if command != "tokenizer":  # an old output to keep; a tokenizer run writes a new directory
        assert cli(*args).exit_code == 0
        args = [*args, "--force"]
    old = digest(out)
    # a first output (tokenizer) has nothing to swap: killed while writing instead
    faults = [("write", signal.SIGKILL)] if command == "tokenizer" else [("write", signal.SIGINT),
                                                                         ("swap", signal.SIGKILL)]
    for where, signum in faults:
        code, stderr = signalled_at(CHILD, args, where, tmp_path / f"marker-{where}", signum)
        assert digest(out) == old, f"{signum.name} at {where}: the output changed"
        if signum == signal.SIGINT:
            assert stopped_cleanly(code, stderr), (code, stderr)
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "Ctrl-C left a temporary"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert leftovers, "the kills left no temporary directory: they did not land inside the write"
    finished = cli(*args)
    assert finished.exit_code == 0, finished.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "stale temporary directories remain"
    if command == "tokenizer":
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(out / "tokenizer.json"))
    elif command == "to-hf":
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    else:
        assert complete_model_dir(out)


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


# A child run that stops half way through writing a file: "checkpoint" the second checkpoint (step-4), "export"
# the run's own outputs after the last step (model.safetensors, or a LoRA run's adapter).
RUN_CHILD = """
import pathlib, sys, time
import safetensors.torch
import llmcli.finetune.saving as saving
import llmcli.model_dir as m
import llmcli.training.checkpoint as checkpoint
marker, where = pathlib.Path(sys.argv[1]), sys.argv[2]

def halved(write):
    def half(tensors, path, *args, **kwargs):
        result = write(tensors, path, *args, **kwargs)
        in_checkpoint = "checkpoints" in pathlib.Path(path).parts
        if (where == "checkpoint" and "step-4" in str(path)) or (where == "export" and not in_checkpoint):
            target = pathlib.Path(path)
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            marker.touch()
            time.sleep(300)
        return result
    return half

m.save_file, checkpoint.save_file, saving.save_file = (halved(safetensors.torch.save_file),) * 3
""" + RUN_LLMCLI
RUNS = ("train", "finetune", "distill")


@pytest.mark.parametrize("command", RUNS)
def test_a_run_killed_while_checkpointing_and_exporting_resumes_bit_identically(command, base, tmp_path, corpus,
                                                                                 cli):
    """Killed half way through its second checkpoint, resumed, killed again half way through its final export,
    resumed again: the run ends with the bytes of a run never interrupted, and never shows a partial file."""
    common = ["--data", corpus, "--steps", 6, "--batch-size", 2, "--seq-len", 16, "--save-every", 2]
    start = {"train": ["train", base / "tiny.toml"], "finetune": ["finetune", base / "model", "--method", "lora",
                                                                  "--task", "lm"],
             "distill": ["distill", "--teacher", base / "model", "--student-layers", 1, "--no-speed"]}[command]
    output = "adapter/adapter.safetensors" if command == "finetune" else "model.safetensors"
    assert cli(*start, *common, "--out", tmp_path / "straight").exit_code == 0
    run = tmp_path / "run"
    killed = start + [*common, "--out", run]
    resume = {"train": start, "finetune": start[:1], "distill": ["distill", "--no-speed"]}[command] + ["--out", run,
                                                                                                   "--resume"]
    from llmcli.training.checkpoint import complete_checkpoints

    for where, args in (("checkpoint", killed), ("export", resume)):
        signalled_at(RUN_CHILD, args, where, tmp_path / where)
        assert not (run / output).exists(), f"killed at {where}: a partial {output} is in place"
        last = complete_checkpoints(run)[-1].name
        assert last == ("step-2" if where == "checkpoint" else "step-6"), last
    finished = cli(*resume)
    assert finished.exit_code == 0, finished.stderr
    assert (run / output).read_bytes() == (tmp_path / "straight" / output).read_bytes()


# A child sweep whose run "wider-gpt" waits at its step 2 until it is stopped (Ctrl-C) or killed.
SWEEP_CHILD = """
import pathlib, sys, time
import llmcli.scaling.sweep as sweep
marker, pretrain = pathlib.Path(sys.argv[1]), sweep.pretrain

def wait_at_step_2(trainer):
    if trainer.step == 2:
        marker.touch()
        while not trainer.stop_requested:
            time.sleep(0.05)

def wider_run_waits(ref, data, out, *args, **kwargs):
    waits = {"on_step": wait_at_step_2} if out.endswith("wider-gpt") else {}
    return pretrain(ref, data, out, *args, **kwargs, **waits)

sweep.pretrain = wider_run_waits
""" + RUN_LLMCLI


def test_a_sweep_killed_or_stopped_keeps_its_finished_runs_and_completes_when_run_again(base, tmp_path, corpus, cli):
    (tmp_path / "wider.toml").write_text(TINY.replace('"fault-gpt"', '"wider-gpt"').replace("d_model = 32",
                                                                                            "d_model = 48"))
    args = ["scaling", "sweep", "--models", f"{base / 'tiny.toml'},{tmp_path / 'wider.toml'}", "--tokens", 320,
            "--batch-size", 2, "--seq-len", 16, "--data", corpus]
    assert cli(*args, "--out", tmp_path / "straight").exit_code == 0
    straight = (tmp_path / "straight" / "runs.jsonl").read_text().splitlines()
    out = tmp_path / "sweep"
    for signum in (signal.SIGKILL, signal.SIGINT):
        code, stderr = signalled_at(SWEEP_CHILD, [*args, "--out", out], "run", tmp_path / signum.name, signum)
        rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
        assert [r["name"] for r in rows] == ["fault-gpt"], f"{signum.name}: {rows}"  # the finished run only
        assert rows[0]["loss"] == json.loads(straight[0])["loss"]
        if signum == signal.SIGINT:
            assert stopped_cleanly(code, stderr) and "run the same command again" in stderr, (code, stderr)
    finished = cli(*args, "--out", out, "--json")
    assert finished.exit_code == 0, finished.stderr
    assert [(r["name"], r["loss"]) for r in json.loads(finished.stdout)] == \
        [(r["name"], r["loss"]) for r in map(json.loads, straight)]


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


def test_a_second_process_writing_the_same_output_is_refused(base, tmp_path, cli):
    """While one process holds an output, train and build into it (even with --force) exit 2; after it, they run."""
    out, marker = tmp_path / "run", tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import pathlib, sys, time; from llmcli.model_dir import "
                               "output_lock\nwith output_lock(pathlib.Path(sys.argv[1])):\n"
                               "    pathlib.Path(sys.argv[2]).touch(); time.sleep(300)", out, marker])
    try:
        for _ in range(2400):
            if marker.exists():
                break
            time.sleep(0.05)
        for args in (["train", base / "tiny.toml", "--out", out, "--steps", 1, "--force"],
                     ["build", base / "tiny.toml", "--out", out, "--force"]):
            result = cli(*args)
            assert result.exit_code == 2 and "another llmcli process" in result.stderr, result.stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli("build", base / "tiny.toml", "--out", out).exit_code == 0  # the lock went with its process
