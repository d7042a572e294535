"""llama.cpp as a bench peer: the same weights exported to GGUF at the matching type, timed by llama.cpp's own
`llama-bench` (its JSON output), one repetition per call so that bench interleaves it with llmcli's.

llama-bench times prompt processing (`-p N -n 0`: N tokens in one pass, logits for the last) and generation
(`-p 0 -n N`: N tokens one at a time) of a single sequence, so it is a peer for batch-1 prefill and decode rows.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import torch

from llmcli.errors import UserError
from llmcli.interop.to_gguf import convert_to_gguf
from llmcli.model_dir import read_quantization_spec

BUILD_HINT = ("build it from the llama-cpp-python source package (about 3 minutes on 2 cores): pip download "
              "--no-deps --no-binary :all: llama-cpp-python==0.3.36, unpack it, then in vendor/llama.cpp: cmake -B "
              "build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-bench -j; put "
              "build/bin on PATH (see the README)")


def llama_bench_path() -> str:
    path = shutil.which("llama-bench")
    if path is None:
        raise UserError(f"--compare llama.cpp runs llama.cpp's llama-bench, which is not on PATH; {BUILD_HINT}")
    return path


def gguf_type_for(directory: Path, dtype: str) -> str:
    """The GGUF type that matches what llmcli runs: f32/bf16/f16 as --dtype, Q8_0 for int8, Q4_0 for int4 in
    groups of 32 (both with the LM head quantized when llmcli's is)."""
    spec = read_quantization_spec(directory)
    if spec is None:
        return {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[dtype]
    scheme, group = spec.get("scheme"), spec.get("group_size")
    if scheme == "int8":
        return "q8_0"
    if scheme == "int4" and group == 32:
        return "q4_0"
    raise UserError(f"{directory}: {scheme} (group size {group}) has no llama.cpp twin; --compare llama.cpp matches "
                    f"int8 with Q8_0 and int4 --group-size 32 with Q4_0")


class LlamaCppRunner:
    """The bench runner interface for an external program: each step returns the seconds llama-bench measured."""

    name = "llama.cpp"
    external = True

    def __init__(self, directory: Path, dtype: str, workdir: Path) -> None:
        self.binary = llama_bench_path()
        self.gguf_type = gguf_type_for(directory, dtype)
        self.path = workdir / f"model-{self.gguf_type}.gguf"
        convert_to_gguf(directory, self.path, self.gguf_type)
        self.build = None

    def supports(self, mode: str, batch_size: int) -> bool:
        return mode in ("prefill", "decode") and batch_size == 1

    def prepare(self, mode: str):
        return contextlib.nullcontext

    def weight_bytes(self) -> int:
        return self.path.stat().st_size

    def finish(self) -> None:
        pass

    def step(self, mode: str, ids: torch.Tensor, new_tokens: int) -> float:
        tokens = ["-p", str(ids.shape[1]), "-n", "0"] if mode == "prefill" else ["-p", "0", "-n", str(new_tokens)]
        command = [self.binary, "-m", str(self.path), "-t", str(torch.get_num_threads()), "-r", "1", "-o", "json",
                   *tokens]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"llama-bench failed (exit {done.returncode}) on {self.path.name}: "
                            f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}")
        row = json.loads(done.stdout)[0]
        self.build = {"build_commit": row.get("build_commit"), "cpu_info": row.get("cpu_info"),
                      "backends": row.get("backends"), "n_threads": row.get("n_threads"),
                      "type": self.gguf_type, "flash_attn": row.get("flash_attn")}
        return row["samples_ns"][0] / 1e9
