"""`llmcli bench`: the JSON contract, the FLOPs formula, and refusals."""

import json

import pytest

from llmcli.model_dir import resolve_config
from llmcli.profiling.counts import flops_per_token
from llmcli.profiling.counts import count


def test_bench_json_carries_the_contract_keys(cli):
    result = cli("bench", "gpt-nano", "--batch-size", "1,2", "--seq-len", "8", "--reps", "2", "--device", "cpu",
                 "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["mode"], r["batch_size"]) for r in rows] == [
        ("train", 1), ("train", 2), ("prefill", 1), ("prefill", 2), ("decode", 1), ("decode", 2)]
    for row in rows:
        assert {"mode", "batch_size", "seq_len", "tokens_per_s", "tokens_per_s_std", "peak_memory_bytes",
                "samples_s"} <= set(row)
        assert len(row["samples_s"]) == 2 and row["tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0
    assert all(r["bandwidth_bytes_per_s"] > 0 for r in rows if r["mode"] == "decode")


def test_bench_sweeps_threads_and_every_row_says_where_it_was_measured(cli):
    result = cli("bench", "gpt-nano", "--mode", "prefill,decode", "--batch-size", "1", "--seq-len", "8",
                 "--threads", "1,2", "--reps", "3", "--warmup", "1", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["threads"], r["mode"]) for r in rows] == [(1, "prefill"), (1, "decode"), (2, "prefill"), (2, "decode")]
    for row in rows:
        assert {"llmcli_version", "git_commit", "torch_version", "device", "device_name", "cpu_model", "cpu_features",
                "torch_cpu_dispatch", "threads", "timestamp"} <= set(row["provenance"])
        assert row["provenance"]["threads"] == row["threads"] and len(row["samples_s"]) == 3
        rates = sorted(row["tokens_per_rep"] / s for s in row["samples_s"])
        assert row["tokens_per_s"] == pytest.approx(rates[1])  # the median of three
    decode = [r for r in rows if r["mode"] == "decode"]
    assert all(0 < r["ttft_s"] < sum(r["samples_s"]) / 3 for r in decode)  # one token costs less than eight
    assert all(r["ttft_s"] is None for r in rows if r["mode"] != "decode")


def test_cpu_features_are_read_from_the_machine(monkeypatch):
    """The features named in provenance are the CPU's own flags (as /proc/cpuinfo lists them), by their usual names;
    torch's dispatch level follows ATEN_CPU_CAPABILITY."""
    import subprocess
    import sys

    from llmcli import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"fpu", "avx2", "fma", "avx512f", "avx512_vnni"}))
    assert cpu.cpu_features() == ["AVX2", "FMA", "AVX-512", "AVX-512-VNNI"]
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "amx_tile", "amx_bf16", "avx512_bf16"}))
    assert cpu.cpu_features() == ["AVX2", "AVX-512-BF16", "AMX", "AMX-BF16"]
    child = subprocess.run([sys.executable, "-c", "from llmcli.cpu import describe_cpu; print(describe_cpu())"],
                           capture_output=True, text=True, env={**__import__("os").environ,
                                                                "ATEN_CPU_CAPABILITY": "default"})
    assert child.stdout.strip().endswith("torch dispatch DEFAULT"), child.stderr


def test_default_lengths_leave_out_those_above_the_context(cli):
    """gpt-nano holds 256 positions: the default 512 is left out with a note, not an error; asked for, it is one."""
    result = cli("bench", "gpt-nano", "--mode", "decode", "--batch-size", "1", "--reps", "1", "--warmup", "1",
                 "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    assert [r["seq_len"] for r in json.loads(result.stdout)] == [128]
    assert "--seq-len 512 left out: above gpt-nano's max_seq_len (256" in result.stderr


def test_compare_with_transformers_adds_the_peer(cli):
    pytest.importorskip("transformers")
    result = cli("bench", "t5-tiny", "--mode", "prefill,decode", "--batch-size", "1", "--seq-len", "8",
                 "--reps", "1", "--device", "cpu", "--compare", "transformers", "--json")
    assert result.exit_code == 0, result.stderr
    for row in json.loads(result.stdout):
        assert row["peer"]["implementation"] == "transformers"
        assert row["peer"]["speedup"] == pytest.approx(row["tokens_per_s"] / row["peer"]["tokens_per_s"])


def test_palm_training_flops_per_token():
    """PaLM appendix B by hand for gpt2-small: 6N + 12·L·H·Q·T."""
    config = resolve_config("gpt2-small")[0]
    n = 124_439_808 - 1024 * 768  # all matmul weights: everything but the position table (wte is the head)
    assert count(config).non_embedding_params + 50257 * 768 == n
    assert flops_per_token(config, count(config), "train", 256) == 6 * n + 12 * 12 * 12 * 64 * 256


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp8"], "--dtype 'fp8' is not one of"),
    (["--batch-size", "0"], "must be positive"),
    (["--seq-len", "300"], "above gpt-nano's max_seq_len (256)"),
    (["--mode", "sample"], "--mode 'sample' is not one of"),
    (["--batch-size", "1,x"], "expected comma-separated whole numbers"),
])
def test_bad_bench_input_exits_2(cli, args, message):
    result = cli("bench", "gpt-nano", "--device", "cpu", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_bench_png_is_an_image_and_leaves_no_temporary_file(cli, model_dirs, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    result = cli("bench", model_dirs["gpt"], "--mode", "prefill,decode", "--batch-size", 1, "--seq-len", 4,
                 "--reps", 1, "--warmup", 1, "--png", tmp_path / "bench.png")
    assert result.exit_code == 0, result.output
    assert image.imread(tmp_path / "bench.png").shape[2] in (3, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]
    assert cli("bench", model_dirs["gpt"], "--mode", "decode", "--batch-size", 1, "--seq-len", 4, "--reps", 1,
               "--png", tmp_path / "missing" / "b.png").exit_code == 2


FAKE_LLAMA_BENCH = """#!{python}
import json, pathlib, sys
args = sys.argv[1:]
get = lambda flag: args[args.index(flag) + 1]
model = pathlib.Path(get("-m"))
assert model.read_bytes()[:4] == b"GGUF", model
with open({log!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
tokens = int(get("-p")) or int(get("-n"))
print(json.dumps([{{"build_commit": "fake", "cpu_info": "fake cpu", "n_threads": int(get("-t")),
                    "samples_ns": [tokens * 1_000_000]}}]))
"""


def test_compare_with_llama_cpp_runs_llama_bench_on_the_exported_gguf(cli, tmp_path, monkeypatch):
    """A stand-in llama-bench (the real one is a separate build) that checks its arguments, records them and
    reports 1 ms per token: the rows carry its figures, batch-1 prefill and decode only, interleaved rep by rep."""
    import os
    import sys

    pytest.importorskip("gguf")
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, log=str(tmp_path / "calls.jsonl")))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = cli("bench", "gpt-nano", "--mode", "prefill,decode", "--batch-size", "1,2", "--seq-len", "16",
                 "--reps", "2", "--warmup", "1", "--compare", "llama.cpp", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {(r["mode"], r["batch_size"]): r for r in json.loads(result.stdout)}
    for mode in ("prefill", "decode"):
        peer = rows[(mode, 1)]["peer"]
        assert peer["implementation"] == "llama.cpp" and peer["tokens_per_s"] == pytest.approx(1000.0)
        assert peer["configuration"]["type"] == "f32" and peer["configuration"]["build_commit"] == "fake"
        assert rows[(mode, 2)]["peer"] is None  # llama-bench times one sequence
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [c[c.index("-p") + 1] for c in calls] == ["16", "16", "0", "0"]  # -r 1 each: two reps per case
    assert all(c[c.index("-r") + 1] == "1" for c in calls)


def test_compare_with_llama_cpp_without_it_says_how_to_get_it(cli, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    result = cli("bench", "gpt-nano", "--mode", "decode", "--batch-size", "1", "--seq-len", "8", "--compare",
                 "llama.cpp")
    assert result.exit_code == 2 and "llama-bench, which is not on PATH" in result.stderr
    assert "llama-cpp-python" in result.stderr


def test_decode_reads_the_weights_as_stored():
    """Bandwidth counts the bytes a decode step reads: a quantized model's integers, not fp32 copies; one row of
    the position table and of an untied token embedding, the whole token embedding when it is the head."""
    import torch
    from conftest import tiny_config

    from llmcli.compression.quantize import quantize_model
    from llmcli.models import build_model
    from llmcli.profiling.bench import Runner
    from llmcli.progress import SILENT

    config = tiny_config("gpt", d_model=64, d_ff=256, vocab_size=128)
    model = build_model(config, seed=0).eval()
    every = sum(p.numel() * 4 for p in model.parameters())
    positions = model.decoder.pos_emb.weight.numel() * 4
    assert Runner(model, torch.device("cpu"), "fp32").decode_read_bytes() == every - positions  # head = tok_emb
    quantize_model(model, "int8", 32, "rtn", True, None, False, SILENT)
    quantized = Runner(model, torch.device("cpu"), "fp32")
    embedding = model.tok_emb.weight.numel() * 4  # untied by quantizing the head: read one row a step
    assert quantized.decode_read_bytes() == quantized.weight_bytes() - positions - embedding
    assert quantized.decode_read_bytes() < (every - positions) / 2


def test_machine_peaks_are_measured_once_per_machine_and_dtype(tmp_path, monkeypatch):
    import torch

    from llmcli.profiling import machine

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = []
    real = machine._measure
    monkeypatch.setattr(machine, "_measure", lambda device, dtype: measured.append(dtype) or real(device, dtype))
    cpu = torch.device("cpu")
    first = machine.machine_peaks(cpu, "fp32")
    assert machine.machine_peaks(cpu, "fp32") == first and measured == ["fp32"]  # cached
    bf16 = machine.machine_peaks(cpu, "bf16")
    assert measured == ["fp32", "bf16"] and bf16["matmul_dtype"] == "bfloat16"
    machine.machine_peaks(cpu, "fp32", fresh=True)
    assert measured == ["fp32", "bf16", "fp32"]
    cached = json.loads((tmp_path / "llmcli" / "machine_peaks.json").read_text())
    assert len(cached) == 2 and all(p["measured"]["cpu_model"] for p in cached.values())
    assert first["read_bytes_per_s"] > 1e8 and first["matmul_flops"] > 1e8
    (tmp_path / "llmcli" / "machine_peaks.json").write_text("not json")  # a broken cache is measured again
    assert machine.machine_peaks(cpu, "fp32")["read_bytes_per_s"] > 0 and measured[-1] == "fp32"


def test_decode_rows_say_their_share_of_the_read_bandwidth(cli):
    rows = json.loads(cli("bench", "gpt-nano", "--mode", "decode", "--batch-size", "1", "--seq-len", "8", "--reps",
                          "1", "--warmup", "1", "--json").stdout)
    row = rows[0]
    read = row["machine"]["read_bytes_per_s"]
    assert row["bandwidth_utilization"] == pytest.approx(row["bandwidth_bytes_per_s"] / read)


def test_a_decode_row_times_the_steps_after_the_prompts_token():
    """As llama-bench's `-n N` rows: N decode steps, each one token through the model; the prompt's pass (the first
    token) is left to the time to first token, which a call of no steps times."""
    import torch
    from conftest import tiny_config

    from llmcli.models import build_model
    from llmcli.profiling.bench import Runner

    model = build_model(tiny_config("gpt"), seed=0).eval()
    lengths = []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    runner = Runner(model, torch.device("cpu"), "fp32")
    ids = torch.randint(3, 90, (1, 8))
    with torch.inference_mode():
        seconds = runner.step("decode", ids, 5)
        assert lengths == [8, 1, 1, 1, 1, 1] and seconds > 0
        lengths.clear()
        assert runner.step("decode", ids, 0) is None and lengths == [8]
