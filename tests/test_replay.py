"""run.toml and --config: a run's resolved flags, replayed bit-identically, overridden from the command line."""

import json
import tomllib

import pytest

from conftest import one_thread
from llmcli.training.replay import read_run_config

TINY = ('name = "tiny-gpt"\nfamily = "gpt"\nvocab_size = 300\nd_model = 32\nn_layers = 2\nn_heads = 2\n'
        'd_ff = 64\nmax_seq_len = 32\n')


@pytest.fixture(scope="module", autouse=True)
def _threads():
    yield from one_thread()


@pytest.fixture(scope="module")
def original(tmp_path_factory, corpus):
    from typer.testing import CliRunner

    from llmcli.cli import app

    root = tmp_path_factory.mktemp("replay")
    (root / "tiny.toml").write_text(TINY)
    result = CliRunner().invoke(app, ["train", str(root / "tiny.toml"), "--data", corpus, "--out", str(root / "a"),
                                      "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--lr", "3e-3",
                                      "--seed", "3"])
    assert result.exit_code == 0, result.output
    return root / "a"


def metrics(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_toml_holds_the_resolved_flags(original, corpus):
    flags = tomllib.loads((original / "run.toml").read_text())["flags"]
    assert flags["steps"] == 6 and flags["lr"] == 3e-3 and flags["seed"] == 3
    assert flags["weight_decay"] == 0.1 and flags["grad_accum"] == 1  # defaults, resolved
    assert flags["data"] == corpus and flags["model"].endswith("tiny.toml")
    assert not {"out", "resume", "force", "nproc"} & set(flags)


def test_config_replays_the_run_bit_identically(cli, original, tmp_path):
    result = cli("train", "--config", original / "run.toml", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (original / "model.safetensors").read_bytes()
    assert metrics(tmp_path / "b") == metrics(original)
    assert read_run_config(tmp_path / "b") == read_run_config(original)


def test_command_line_flags_override_the_config(cli, original, tmp_path):
    result = cli("train", "--config", original, "--out", tmp_path / "c", "--steps", "3", "--lr", "1e-3")
    assert result.exit_code == 0, result.output
    flags = read_run_config(tmp_path / "c")
    assert (flags["steps"], flags["lr"], flags["seed"]) == (3, 1e-3, 3)
    assert max(r["step"] for r in metrics(tmp_path / "c")) == 3


@pytest.mark.parametrize("case", ["unknown-key", "not-toml", "no-flags", "missing", "other-command"])
def test_bad_configs_exit_2_naming_the_problem(cli, original, tmp_path, case):
    path = tmp_path / "run.toml"
    text = {"unknown-key": 'command = "train"\n[flags]\nsteps = 3\nstepz = 4\n', "not-toml": "steps = = 3\n",
            "no-flags": 'command = "train"\n', "other-command": 'command = "finetune"\n[flags]\nsteps = 3\n'}
    if case != "missing":
        path.write_text(text[case])
    before = path.read_bytes() if path.exists() else None
    result = cli("train", "--config", path, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    expected = {"unknown-key": "unknown key 'stepz'", "not-toml": "not a readable TOML file",
                "no-flags": "no [flags] table", "missing": "no such file", "other-command": "llmcli finetune"}[case]
    assert expected in result.stderr and "Traceback" not in result.output
    assert (path.read_bytes() if path.exists() else None) == before
    assert not (tmp_path / "out").exists()


def test_runs_diff_names_the_flags_that_differ(cli, original, tmp_path):
    assert cli("train", "--config", original, "--out", tmp_path / "d", "--lr", "1e-3").exit_code == 0
    result = cli("runs", "diff", original, tmp_path / "d", "--json")
    diff = json.loads(result.stdout)
    assert diff["flags"] == {"lr": [3e-3, 1e-3]}
    assert diff["figures"]["steps"] == [6, 6]
    assert diff["figures"]["final_loss"][0] != diff["figures"]["final_loss"][1]
