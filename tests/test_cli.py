"""The CLI: zoo list/show, build, and exit code 2 with a one-line message for bad input."""

import json
import os
import subprocess
import sys

import pytest


def test_help_does_not_import_torch():
    code = "import sys; import llmcli.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_zoo_list_json(cli):
    result = cli("zoo", "list", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["gpt2-small"]["params"] == 124_439_808
    assert rows["palm-540b"]["published_params"] > 5e11
    for row in rows.values():
        assert {"name", "family", "params", "published_params", "flops_per_token", "fp16_weight_bytes"} <= set(row)
    # fp16 weights of GPT-3 are the classic "350 GB"
    assert rows["gpt3-175b"]["fp16_weight_bytes"] == pytest.approx(349e9, rel=0.005)


def test_zoo_list_table_and_family_filter(cli):
    result = cli("zoo", "list", "--family", "t5")
    assert result.exit_code == 0
    assert "t5-small" in result.stdout and "gpt2-small" not in result.stdout


def test_zoo_show_json(cli):
    result = cli("zoo", "show", "t5-small", "--json")
    data = json.loads(result.stdout)
    assert (data["family"], data["params"], data["n_decoder_layers"]) == ("t5", 60_506_624, 6)


def test_build_and_load(cli, tmp_path):
    result = cli("build", "gpt-nano", "--out", tmp_path / "m", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    from llmcli import load_model

    assert load_model(tmp_path / "m").num_parameters() == 293_808


@pytest.mark.parametrize("args, message", [
    (["zoo", "show", "gpt2-smal"], "unknown model 'gpt2-smal'"),
    (["build", "bert-bse", "--out", "{tmp}/x"], "did you mean bert-base"),
    (["zoo", "list", "--family", "rnn"], "--family 'rnn' is not one of"),
    (["build", "{tmp}/bad.toml", "--out", "{tmp}/x"], "malformed TOML"),
    (["build", "gpt3-175b", "--out", "{tmp}/x"], "building needs about"),
])
def test_bad_input_exits_2_with_one_line(cli, tmp_path, args, message):
    (tmp_path / "bad.toml").write_text("name = ")
    result = cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") <= 2


def test_existing_output_needs_force(cli, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("keep")
    result = cli("build", "gpt-nano", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (tmp_path / "out" / "file").read_text() == "keep"
    assert cli("build", "gpt-nano", "--out", tmp_path / "out", "--force").exit_code == 0


def test_python_m_entry_point_reports_errors_without_traceback(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text('name = "m"\nfamily = "gpt"\nvocab_size = 10\nd_model = 30\nn_layers = 1\n'
                    'n_heads = 4\nd_ff = 8\nmax_seq_len = 8\n')
    env = {**os.environ, "LLMCLI_DEBUG": "0"}
    proc = subprocess.run([sys.executable, "-m", "llmcli", "zoo", "show", str(toml)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "d_model (30) is not divisible by n_heads (4)" in proc.stderr
    assert "Traceback" not in proc.stderr
