"""Bad input against every command: each case must exit 2 with one `error:` line (what is wrong and how to fix
it), no traceback, and leave every input file byte-for-byte as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import one_thread

TINY_GPT = ('name = "fuzz-gpt"\nfamily = "gpt"\nvocab_size = 320\nd_model = 32\nn_layers = 2\nn_heads = 2\n'
            'd_ff = 64\nmax_seq_len = 64\n')
TINY_BERT = ('name = "fuzz-bert"\nfamily = "bert"\nvocab_size = 400\nd_model = 32\nn_layers = 2\nn_heads = 2\n'
             'd_ff = 64\nmax_seq_len = 64\n')


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def root(tmp_path_factory, corpus):
    """Inputs every case may point at: models, a corpus, broken files. Hashed before and after each case."""
    from typer.testing import CliRunner

    from llmcli.cli import app

    root = tmp_path_factory.mktemp("fuzz")
    run = CliRunner().invoke
    (root / "gpt.toml").write_text(TINY_GPT)
    (root / "bert.toml").write_text(TINY_BERT)
    for name in ("gpt", "bert"):
        assert run(app, ["build", str(root / f"{name}.toml"), "--out", str(root / name)]).exit_code == 0
        assert run(app, ["tokenizer", "train", "--data", corpus, "--vocab-size", "300", "--kind",
                         "bpe" if name == "gpt" else "wordpiece", "--out", str(root / name)]).exit_code == 0
    shutil.copy(corpus, root / "corpus.txt")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("café ünïcode ".encode("latin-1") * 200)
    (root / "empty_dir").mkdir()
    (root / "file.txt").write_text("not a directory")
    weights = (root / "gpt" / "model.safetensors").read_bytes()
    for name, mutate in (("truncated", lambda d: (d / "model.safetensors").write_bytes(weights[:len(weights) // 2])),
                         ("bitflip", lambda d: (d / "model.safetensors").write_bytes(
                             weights[:20] + bytes([weights[20] ^ 0xFF]) + weights[21:])),
                         ("huge_header", lambda d: (d / "model.safetensors").write_bytes(
                             (10**12).to_bytes(8, "little") + weights[8:])),
                         ("bad_config", lambda d: (d / "config.json").write_text("{not json")),
                         ("config_list", lambda d: (d / "config.json").write_text("[1, 2]")),
                         ("config_missing_key", lambda d: _edit_config(d, lambda c: c.pop("d_model"))),
                         ("config_wrong_type", lambda d: _edit_config(d, lambda c: c.update(n_layers="two"))),
                         ("config_absurd", lambda d: _edit_config(d, lambda c: c.update(d_model=10**7, d_head=None))),
                         ("config_other_model", lambda d: _edit_config(d, lambda c: c.update(d_model=64))),
                         ("no_tokenizer", lambda d: (d / "tokenizer.json").unlink()),
                         ("bad_tokenizer", lambda d: (d / "tokenizer.json").write_text("{broken")),
                         ("big_tokenizer", lambda d: _edit_config(d, lambda c: c.update(vocab_size=100))),
                         ("pickle", lambda d: ((d / "model.safetensors").unlink(),
                                               (d / "pytorch_model.bin").write_bytes(b"\x80\x04"))),
                         ("no_weights", lambda d: (d / "model.safetensors").unlink())):
        shutil.copytree(root / "gpt", root / name)
        mutate(root / name)
    (root / "small.toml").write_text(TINY_GPT.replace("vocab_size = 320", "vocab_size = 200"))
    assert run(app, ["build", str(root / "small.toml"), "--out", str(root / "small_vocab")]).exit_code == 0
    shutil.copy(root / "gpt" / "tokenizer.json", root / "small_vocab" / "tokenizer.json")  # 300 > 200 tokens
    assert run(app, ["quantize", str(root / "gpt"), "--scheme", "int8", "--out", str(root / "quantized"),
                     "--no-speed", "--data", corpus, "--seq-len", "16"]).exit_code == 0
    (root / "bad.jsonl").write_text('{"text": "fine", "label": "a"}\n{oops\n{"text": "x", "label": "b"}\n')
    (root / "missing_field.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n{"text": "c", "label": "y"}\n')
    return root


def _edit_config(directory: Path, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


G, B, Q, C = "{root}/gpt", "{root}/bert", "{root}/quantized", "{root}/corpus.txt"
OUT = "{tmp}/out"
CASES = {
    # zoo and build
    "zoo show unknown": ["zoo", "show", "gpt-nanoo"],
    "zoo list bad family": ["zoo", "list", "--family", "rnn"],
    "build missing toml": ["build", "{root}/nope.toml", "--out", OUT],
    "build absurd size": ["build", "gpt3-175b", "--out", OUT],
    "build out is a file": ["build", "{root}/gpt.toml", "--out", "{root}/file.txt"],
    # loading a model directory
    **{f"eval {name}": ["eval", f"{{root}}/{name}", "--data", C] for name in (
        "truncated", "bitflip", "huge_header", "bad_config", "config_list", "config_missing_key", "config_wrong_type",
        "config_absurd", "config_other_model", "no_tokenizer", "bad_tokenizer", "big_tokenizer", "pickle",
        "no_weights", "empty_dir", "nope", "small_vocab")},
    "eval a file": ["eval", "{root}/file.txt"],
    **{f"generate {name}": ["generate", f"{{root}}/{name}", "--prompt", "The"] for name in (
        "truncated", "bad_config", "no_tokenizer", "bad_tokenizer", "pickle", "nope", "file.txt")},
    # eval and data
    "eval missing data": ["eval", G, "--data", "{root}/nope.txt"],
    "eval empty data": ["eval", G, "--data", "{root}/empty.txt"],
    "eval latin-1 data": ["eval", G, "--data", "{root}/latin1.txt"],
    "eval seq-len 0": ["eval", G, "--seq-len", "0"],
    "eval seq-len too long": ["eval", G, "--seq-len", "65"],
    # generate flags
    "generate max-new-tokens 0": ["generate", G, "--prompt", "a", "--max-new-tokens", "0"],
    "generate negative temperature": ["generate", G, "--prompt", "a", "--temperature", "-1"],
    "generate top-p 2": ["generate", G, "--prompt", "a", "--top-p", "2"],
    "generate top-k 0": ["generate", G, "--prompt", "a", "--top-k", "0"],
    "generate num-samples 0": ["generate", G, "--prompt", "a", "--num-samples", "0"],
    "generate empty prompt": ["generate", G, "--prompt", "  "],
    "generate too many tokens": ["generate", G, "--prompt", "a", "--max-new-tokens", "100000"],
    "generate on bert": ["generate", B, "--prompt", "a"],
    "generate bad device": ["generate", G, "--prompt", "a", "--device", "tpu"],
    "generate cuda without cuda": ["generate", G, "--prompt", "a", "--device", "cuda"],
    "fill-mask on gpt": ["fill-mask", G, "The [MASK] sat"],
    "fill-mask without mask": ["fill-mask", B, "no mask here"],
    "attention bad layer": ["attention", G, "--text", "hello there", "--layer", "9"],
    "attention bad head": ["attention", G, "--text", "hello there", "--head", "7"],
    "attention bad kind": ["attention", G, "--text", "hello there", "--kind", "sideways"],
    # train flags
    "train steps 0": ["train", "{root}/gpt.toml", "--data", C, "--out", OUT, "--steps", "0"],
    "train batch -1": ["train", "{root}/gpt.toml", "--data", C, "--out", OUT, "--batch-size", "-1"],
    "train lr 0": ["train", "{root}/gpt.toml", "--data", C, "--out", OUT, "--lr", "0"],
    "train seq-len huge": ["train", "{root}/gpt.toml", "--data", C, "--out", OUT, "--seq-len", "100000"],
    "train precision fp8": ["train", "{root}/gpt.toml", "--data", C, "--out", OUT, "--precision", "fp8"],
    "train fp16 on cpu": ["train", "{root}/gpt.toml", "--data", C, "--out", OUT, "--precision", "fp16",
                          "--device", "cpu"],
    "train empty data": ["train", "{root}/gpt.toml", "--data", "{root}/empty.txt", "--out", OUT],
    "train missing data": ["train", "{root}/gpt.toml", "--data", "{root}/nope.txt", "--out", OUT],
    "train resume nothing": ["train", "{root}/gpt.toml", "--out", "{root}/empty_dir", "--resume"],
    "train into existing run": ["train", "{root}/gpt.toml", "--data", C, "--out", G],
    "train strategy without nproc": ["train", "{root}/gpt.toml", "--data", C, "--out", OUT, "--strategy", "fsdp"],
    "train nproc 0": ["train", "{root}/gpt.toml", "--data", C, "--out", OUT, "--nproc", "0"],
    # tokenizer
    "tokenizer vocab 0": ["tokenizer", "train", "--data", C, "--vocab-size", "0", "--out", OUT],
    "tokenizer bad kind": ["tokenizer", "train", "--data", C, "--vocab-size", "300", "--kind", "sentencepiece",
                           "--out", OUT],
    "tokenizer out is a file": ["tokenizer", "train", "--data", C, "--vocab-size", "300", "--out", "{root}/file.txt"],
    "tokenizer replaces": ["tokenizer", "train", "--data", C, "--vocab-size", "300", "--out", G],
    "tokenizer vocab above model": ["tokenizer", "train", "--data", C, "--vocab-size", "1000", "--out",
                                    "{root}/no_tokenizer"],
    # finetune and merge
    "finetune bad method": ["finetune", G, "--method", "dora", "--task", "lm", "--data", C, "--out", OUT],
    "finetune bad task": ["finetune", G, "--method", "lora", "--task", "chat", "--data", C, "--out", OUT],
    "finetune bad jsonl line": ["finetune", G, "--method", "lora", "--task", "classify", "--data",
                                "{root}/bad.jsonl", "--out", OUT],
    "finetune missing field": ["finetune", G, "--method", "lora", "--task", "classify", "--data",
                               "{root}/missing_field.jsonl", "--out", OUT],
    "finetune bad lora target": ["finetune", G, "--method", "lora", "--task", "lm", "--data", C, "--out", OUT,
                                 "--lora-targets", "q,x"],
    "finetune lora rank 0": ["finetune", G, "--method", "lora", "--task", "lm", "--data", C, "--out", OUT,
                             "--lora-rank", "0"],
    "finetune instruct on bert": ["finetune", B, "--method", "lora", "--task", "instruct", "--data",
                                  "{root}/bad.jsonl", "--out", OUT],
    "finetune out is the base": ["finetune", G, "--method", "lora", "--task", "lm", "--data", C, "--out", G],
    "merge a plain model": ["merge", G, "--out", OUT],
    # compression
    "quantize bad scheme": ["quantize", G, "--scheme", "int3", "--out", OUT],
    "quantize group 7": ["quantize", G, "--scheme", "int4", "--group-size", "7", "--out", OUT],
    "quantize int8 with group": ["quantize", G, "--scheme", "int8", "--group-size", "32", "--out", OUT],
    "quantize quantized": ["quantize", Q, "--scheme", "int8", "--out", OUT],
    "quantize out is the model": ["quantize", G, "--scheme", "int8", "--out", G],
    "quantize bad method": ["quantize", G, "--scheme", "int8", "--method", "awq", "--out", OUT],
    "prune bad method": ["prune", G, "--method", "random", "--out", OUT],
    "prune sparsity 1.5": ["prune", G, "--method", "magnitude", "--sparsity", "1.5", "--out", OUT],
    "prune bad pattern": ["prune", G, "--method", "magnitude", "--pattern", "4:2", "--out", OUT],
    "prune quantized": ["prune", Q, "--method", "magnitude", "--out", OUT],
    "prune out is the model": ["prune", G, "--method", "magnitude", "--out", G],
    "distill quantized teacher": ["distill", "--teacher", Q, "--out", OUT],
    "distill no teacher": ["distill", "--out", OUT],
    "distill alpha 2": ["distill", "--teacher", G, "--alpha", "2", "--out", OUT],
    "distill other family": ["distill", "--teacher", G, "--student", "{root}/bert.toml", "--out", OUT],
    # conversion
    "from-hf missing": ["convert", "from-hf", "{root}/nope", OUT],
    "from-hf a file": ["convert", "from-hf", "{root}/file.txt", OUT],
    "from-hf llmcli dir": ["convert", "from-hf", G, OUT],
    "to-hf missing": ["convert", "to-hf", "{root}/nope", OUT],
    "to-hf quantized": ["convert", "to-hf", Q, OUT],
    # memory-estimate and bench
    "memory bad mode": ["memory-estimate", "gpt2-small", "--mode", "serve"],
    "memory bad dtype": ["memory-estimate", "gpt2-small", "--dtype", "fp7"],
    "memory batch 0": ["memory-estimate", "gpt2-small", "--batch-size", "0"],
    "memory seq too long": ["memory-estimate", "gpt2-small", "--seq-len", "5000"],
    "memory bad optimizer": ["memory-estimate", "gpt2-small", "--optimizer", "lion"],
    "memory int4 bad group": ["memory-estimate", "gpt-mini", "--mode", "infer", "--dtype", "int4"],
    "memory zero stage 5": ["memory-estimate", "gpt2-small", "--zero-stage", "5", "--gpus", "2"],
    "memory measure too big": ["memory-estimate", "gpt3-175b", "--device", "cpu", "--measure"],
    "memory of a broken dir": ["memory-estimate", "{root}/bad_config"],
    "bench bad mode": ["bench", "gpt-nano", "--mode", "serve"],
    "bench reps 0": ["bench", "gpt-nano", "--reps", "0"],
    "bench threads 0": ["bench", "gpt-nano", "--threads", "0", "--mode", "prefill", "--seq-len", "8"],
    "bench bad list": ["bench", "gpt-nano", "--seq-len", "8,x"],
    "bench bad peer": ["bench", "gpt-nano", "--compare", "vllm"],
    "bench broken dir": ["bench", "{root}/truncated", "--mode", "prefill", "--seq-len", "8"],
    # scaling
    "sweep no budget": ["scaling", "sweep", "--models", "gpt-nano", "--out", OUT],
    "sweep bad budget": ["scaling", "sweep", "--models", "gpt-nano", "--tokens", "lots", "--out", OUT],
    "sweep empty models": ["scaling", "sweep", "--models", ",", "--tokens", "1e4", "--out", OUT],
    "fit missing": ["scaling", "fit", "{root}/nope.jsonl"],
    "fit bad bootstrap": ["scaling", "fit", "{root}/bad.jsonl", "--bootstrap", "-1"],
    "plan negative compute": ["scaling", "plan", "--compute", "-5"],
    # outputs inside the input
    "quantize into the model": ["quantize", G, "--scheme", "int8", "--out", G + "/q"],
    "prune into the model": ["prune", G, "--method", "magnitude", "--out", G + "/p"],
    "train into the model": ["train", G, "--data", C, "--out", G + "/run", "--steps", "1"],
    "finetune into the base": ["finetune", G, "--method", "lora", "--task", "lm", "--data", C, "--out", G + "/ft"],
    "distill into the teacher": ["distill", "--teacher", G, "--out", G + "/student"],
    "to-hf into the model": ["convert", "to-hf", G, G + "/hf"],
}
BROKEN = ("truncated", "bad_config", "pickle", "nope", "file.txt", "empty_dir")
COMMANDS = {  # every command that reads a model directory, against each broken one
    "embed": ["embed", "{dir}", "one text", "another"],
    "attention": ["attention", "{dir}", "--text", "hello there"],
    "quantize": ["quantize", "{dir}", "--scheme", "int8", "--out", OUT],
    "prune": ["prune", "{dir}", "--method", "magnitude", "--out", OUT],
    "finetune": ["finetune", "{dir}", "--method", "lora", "--task", "lm", "--data", C, "--out", OUT],
    "distill": ["distill", "--teacher", "{dir}", "--out", OUT],
    "to-hf": ["convert", "to-hf", "{dir}", OUT],
    "memory-estimate": ["memory-estimate", "{dir}", "--mode", "infer", "--seq-len", "32"],
}
CASES.update({f"{command} {broken}": [a.replace("{dir}", f"{{root}}/{broken}") for a in args]
              for command, args in COMMANDS.items() for broken in BROKEN
              # the estimate reads config.json alone: broken weights do not concern it
              if not (command == "memory-estimate" and broken in ("truncated", "pickle"))})


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(name, root, tmp_path, cli):
    args = [str(a).format(root=root, tmp=tmp_path) for a in CASES[name]]
    before = digest(root)
    result = cli(*args)
    message = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (args, result.exit_code, result.stderr[-1500:], repr(result.exception))
    assert "Traceback" not in result.stderr
    errors = [line for line in message if line.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) > len("error: ") + 10, message
    assert digest(root) == before, "an input file changed"
