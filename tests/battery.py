"""The compressed-model battery: every compressed output llmcli writes, loaded from disk, through every command
that reads a model, each output in a child process of its own, so that a crash (a signal) fails its case instead
of ending the run. Used by tests/test_battery.py, and run as a script for the table in benchmarks/RESULTS.md:

    python tests/battery.py [--dispatch avx2] [--markdown]

A command that applies must exit 0; one that does not (`applies`) must exit 2 with a message. Never a signal,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_TOML = ('name = "battery-gpt"\nfamily = "gpt"\nvocab_size = 512\nd_model = 128\nn_layers = 2\nn_heads = 4\n'
             'd_ff = 512\nmax_seq_len = 256\n')  # 128 and 512 input features: every int4 group size divides them
PROMPT_TOKENS = 208  # "generate with a prompt of 200+ tokens"

QUANTIZED = {
    "int8": ["--scheme", "int8"],
    "int4-g32": ["--scheme", "int4", "--group-size", "32"],
    "int4-g128": ["--scheme", "int4", "--group-size", "128"],
    "int8-dynamic": ["--scheme", "int8-dynamic"],
    "gptq-int8": ["--scheme", "int8", "--method", "gptq", "--calibration-batches", "2"],
    "gptq-int4": ["--scheme", "int4", "--group-size", "128", "--method", "gptq", "--calibration-batches", "2"],
}


def outputs() -> dict[str, list[str]]:
    """Each compressed output: the llmcli arguments that write it from `{base}` into `{out}`."""
    made = {}
    for name, args in QUANTIZED.items():
        for head in (False, True):
            head_flag = ["--include-head"] if head else []
            made[name + ("+head" if head else "")] = ["quantize", "{base}", *args, *head_flag, "--no-speed", "--data",
                                                      "{data}", "--out", "{out}"]
    made["pruned-2:4"] = ["prune", "{base}", "--method", "magnitude", "--pattern", "2:4", "--no-speed", "--data",
                          "{data}", "--out", "{out}"]
    made["pruned-heads"] = ["prune", "{base}", "--method", "heads", "--sparsity", "0.5", "--calibration-batches", "2",
                            "--no-speed", "--data", "{data}", "--out", "{out}"]
    made["distilled"] = ["distill", "--teacher", "{base}", "--student-layers", "1", "--steps", "4", "--batch-size",
                         "4", "--seq-len", "64", "--no-speed", "--data", "{data}", "--out", "{out}"]
    made["merged-lora"] = ["merge", "{root}/lora", "--out", "{out}"]
    return made


def commands() -> dict[str, list[str]]:
    """Every command that reads a model, as a user runs it on `{model}`."""
    return {
        "eval": ["eval", "{model}", "--data", "{data}", "--json"],
        "generate": ["generate", "{model}", "--prompt", "{prompt}", "--max-new-tokens", "16", "--temperature", "0",
                     "--json"],
        "bench prefill": ["bench", "{model}", "--mode", "prefill", "--batch-size", "8", "--seq-len", "256",
                          "--reps", "1", "--warmup", "1", "--json"],
        "bench decode": ["bench", "{model}", "--mode", "decode", "--batch-size", "1", "--seq-len", "32", "--reps", "1",
                         "--warmup", "1", "--json"],
        "memory --measure": ["memory-estimate", "{model}", "--mode", "infer", "--batch-size", "8", "--seq-len", "256",
                             "--measure", "--json"],
        "to-hf": ["convert", "to-hf", "{model}", "{scratch}/hf"],
        "finetune lora": ["finetune", "{model}", "--method", "lora", "--task", "lm", "--steps", "2", "--batch-size",
                          "2", "--seq-len", "32", "--data", "{data}", "--out", "{scratch}/lora"],
    }


def applies(output: str, command: str) -> bool:
    """Where a command must refuse (exit 2): to-hf of integer weights (transformers' classes hold floats) and of
    a GPT-2 with heads removed (GPT-2's attention has d_model / n_heads per head, no d_head of its own)."""
    return not (command == "to-hf" and (output.split("+")[0] in QUANTIZED or output == "pruned-heads"))


def prepare(root: Path, data: str, env: dict | None = None) -> dict[str, Path]:
    """A trained base model, and every compressed output of it, written by llmcli itself into `root` (in one
    child process: a crash here fails the preparation, not the run)."""
    (root / "battery-gpt.toml").write_text(BASE_TOML)
    base = root / "base"
    steps = [("train", ["train", root / "battery-gpt.toml", "--data", data, "--steps", "20", "--batch-size", "8",
                        "--seq-len", "64", "--out", base]),
             ("lora", ["finetune", base, "--method", "lora", "--task", "lm", "--steps", "3", "--batch-size", "4",
                       "--seq-len", "64", "--data", data, "--out", root / "lora"])]
    made = {}
    for name, args in outputs().items():
        made[name] = root / name.replace(":", "-")
        steps.append((name, [a.format(base=base, data=data, out=made[name], root=root) for a in args]))
    failed = [f"{r['command']}: {verdict(r)}\n{r['tail']}" for r in run_commands(steps, "prepare", env) if verdict(r)]
    if failed:
        raise RuntimeError("preparing the battery failed:\n" + "\n".join(failed))
    return made


CHILD = """
import json, sys, tempfile, time
from typer.testing import CliRunner
from llmcli.cli import app

runner = CliRunner()
for name, args in json.loads(sys.argv[1]):
    print(json.dumps({"start": name}), flush=True)  # a crash leaves this as the last line
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        result = runner.invoke(app, [a.replace("{scratch}", scratch) for a in args])
    seconds = time.perf_counter() - start
    error = "".join(__import__("traceback").format_exception(result.exc_info[1])) if result.exc_info and not \\
        isinstance(result.exc_info[1], SystemExit) else ""
    output = result.output + error
    lines = [line for line in result.stderr.splitlines() if line.strip()] if result.exit_code else []
    print(json.dumps({"command": name, "exit": result.exit_code, "traceback": "Traceback" in output,
                      "message": lines[-1] if lines else "", "tail": output[-1500:], "seconds": seconds,
                      "stdout": result.stdout if "--json" in args else ""}), flush=True)
"""


def prompt_text(model: Path, tokens: int = PROMPT_TOKENS) -> str:
    """Text of exactly `tokens` tokens under the model's own tokenizer (a long, ordinary prompt)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = tokenizer.encode(" ".join(["the quick brown fox jumps over the lazy dog and then"] * 40)).ids[:tokens]
    return tokenizer.decode(ids)


def run_output(name: str, model: Path, data: str, env: dict | None = None) -> list[dict]:
    """All commands on one output, in one child process."""
    prompt = prompt_text(model)
    return run_commands([(command, [a.format(model=model, data=data, prompt=prompt) if "{scratch}" not in a else a
                                    for a in args]) for command, args in commands().items()], name, env)


def run_commands(cases: list[tuple[str, list]], output: str, env: dict | None = None, timeout: float = 900) -> list:
    """Named llmcli commands run in turn in one child process: one record each, and one for a child that died
    (a signal), naming the command it was in."""
    cases = [(command, [str(a) for a in args]) for command, args in cases]
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True,
                           env=env, timeout=timeout)
    records, started = [], None
    for line in child.stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        else:
            records.append({**record, "output": output, "applies": applies(output, record["command"])})
            started = None
    if child.returncode != 0:  # the child itself died: a signal (negative) or an error outside any command
        died = (f"signal {signal.Signals(-child.returncode).name}" if child.returncode < 0
                else f"exit {child.returncode}")
        records.append({"output": output, "command": started or "(between commands)", "exit": child.returncode,
                        "traceback": "Traceback" in child.stderr, "message": died, "tail": child.stderr[-1500:],
                        "applies": True, "stdout": ""})
    return records


def verdict(record: dict) -> str | None:
    """What is wrong with one record, or None."""
    if record["exit"] < 0 or record["exit"] > 128:
        return f"crashed ({record['message']})"
    if record["traceback"]:
        return "traceback"
    if record["applies"] and record["exit"] != 0:
        return f"exit {record['exit']}: {record['message']}"
    if not record["applies"] and record["exit"] != 2:
        return f"exit {record['exit']} where a refusal (exit 2) was expected"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dispatch", help="ATEN_CPU_CAPABILITY for every process (default, avx2, avx512)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args()
    env = {**os.environ, **({"ATEN_CPU_CAPABILITY": args.dispatch} if args.dispatch else {})}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llmcli.cpu import describe_cpu  # noqa: E402

    cpu = subprocess.run([sys.executable, "-c", "from llmcli.cpu import describe_cpu; print(describe_cpu())"],
                         capture_output=True, text=True, env=env).stdout.strip() or describe_cpu()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus.txt"
        from pydoc_data.topics import topics

        data.write_text("\n\n".join(topics[k] for k in sorted(topics)[:12]))
        start = time.perf_counter()
        made = prepare(Path(tmp), str(data), env)
        records = [r for name, model in made.items() for r in run_output(name, model, str(data), env)]
    names = list(commands())
    print(f"cpu: {cpu}; {len(records)} cases in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    bad = [(r, verdict(r)) for r in records if verdict(r)]
    if args.markdown:
        print("| output | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for output in made:
            row = {r["command"]: r for r in records if r["output"] == output}
            cells = [("ok" if row[c]["exit"] == 0 else f"refused ({row[c]['exit']})") if c in row and not
                     verdict(row[c]) else ("FAIL" if c in row else "-") for c in names]
            print(f"| {output} | " + " | ".join(cells) + " |")
    for record, why in bad:
        print(f"FAIL {record['output']} / {record['command']}: {why}\n{record['tail']}", file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
