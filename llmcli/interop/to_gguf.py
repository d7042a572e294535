"""`llmcli convert to-gguf`: a GPT-2 or Llama-style model directory (or zoo model) as one GGUF file, the format
llama.cpp runs, written with the `gguf` package (the llama.cpp project's own writer).

Tensor names follow llama.cpp's (token_embd, blk.N.attn_q, ...). Llama-style q and k rows are reordered from the
half-split rotary layout (ours and Hugging Face's) to llama.cpp's interleaved pairs, as its own converter does.
Weight matrices take the requested type (Q8_0 and Q4_0 in blocks of 32); norms, biases, position embeddings and
matrices whose rows are not whole blocks stay in F32. A model llmcli quantized is written from its dequantized
weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.interop.gpt2 import GPT2
from llmcli.interop.llama import LLAMA, specials
from llmcli.interop.tables import Rule, params, stack
from llmcli.model_dir import check_outside, load_model, load_tokenizer
from llmcli.models.quantized import QuantizedLinear
from llmcli.tokenizer import tokenizer_kind

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # Q8_0 and Q4_0 quantize rows in blocks of 32 weights with one scale

GPT2_BLOCK = [
    *params("attn_norm", "attn_norm"),
    *params(("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn_qkv"),
    *params("attn.o_proj", "attn_output"),
    *params("ff_norm", "ffn_norm"),
    *params("ff.up", "ffn_up"),
    *params("ff.down", "ffn_down"),
]
LLAMA_BLOCK = [
    *params("attn_norm", "attn_norm", bias=False),
    *params("attn.q_proj", "attn_q", bias=False),
    *params("attn.k_proj", "attn_k", bias=False),
    *params("attn.v_proj", "attn_v", bias=False),
    *params("attn.o_proj", "attn_output", bias=False),
    *params("ff_norm", "ffn_norm", bias=False),
    *params("ff.gate", "ffn_gate", bias=False),
    *params("ff.up", "ffn_up", bias=False),
    *params("ff.down", "ffn_down", bias=False),
]


# What llama.cpp's two layouts need beyond the Hugging Face layout each mirrors (GPT-2's, Llama's)
GGUF_LAYOUTS = (("gpt2", GPT2, {"family": "gpt", "activation": "gelu_tanh", "n_experts": 0}),
                ("llama", LLAMA, {"family": "gpt", "activation": "swiglu", "bias": False, "attention_bias": None,
                                  "mlp_bias": None, "qkv_bias": None, "rope_scaling": None, "sliding_window": None,
                                  "n_experts": 0}))


def gguf_architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture for this config: gpt2 or llama; anything else is refused by name."""
    for name, spec, extra in GGUF_LAYOUTS:
        wanted = {**spec.requires, **extra}
        if config.position == wanted["position"]:
            misfits = [f"{key} = {getattr(config, key)!r}" for key, value in wanted.items()
                       if getattr(config, key) != value]
            misfits += [f"{key} = {getattr(config, key)!r}" for key in sorted(specials(config))]
            if not misfits:
                return name
            raise UserError(f"{config.name}: llama.cpp's {name} layout has no place for {'; '.join(misfits)}; "
                            f"to-gguf writes GPT-2 and plain Llama-style models")
    raise UserError(f"{config.name}: to-gguf writes GPT-2 (learned positions) and Llama-style (rotary) decoders; "
                    f"this one has {config.family} with {config.position} positions")


def _rules(arch: str, config: ModelConfig) -> list[Rule]:
    rules = [*params("tok_emb", "token_embd", bias=False)]
    if arch == "gpt2":
        rules += params("decoder.pos_emb", "position_embd", bias=False)
        rules += stack("decoder.blocks.", "blk.", config.n_layers, GPT2_BLOCK)
        rules += params("decoder.final_norm", "output_norm")
    else:
        rules += stack("decoder.blocks.", "blk.", config.n_layers, LLAMA_BLOCK)
        rules += params("decoder.final_norm", "output_norm", bias=False)
    if not config.tie_embeddings:  # tied: llama.cpp reads the token embedding as the output projection
        rules += params("lm_head", "output", bias=False)
    return rules


def interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows from the half-split rotary layout (rotate_half) to llama.cpp's interleaved pairs."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's names, in llama.cpp's layout (float32)."""
    config = model.config
    state = {name: tensor.float() for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    for name, module in model.named_modules():  # an llmcli-quantized model: its weights as they compute
        if isinstance(module, QuantizedLinear):
            state[f"{name}.weight"] = module.dequantized_weight()
    tensors = {}
    for rule in _rules(arch, config):
        tensor = rule.to_hf(state)
        if arch == "llama" and rule.hf.endswith(("attn_q.weight", "attn_k.weight")):
            tensor = interleave_rotary_rows(tensor, config.n_heads if "attn_q" in rule.hf else config.n_kv_heads)
        tensors[rule.hf] = tensor
    return tensors


def convert_to_gguf(src: str | os.PathLike, out: str | os.PathLike, gguf_type: str = "f16",
                    force: bool = False) -> dict:
    """Write a model (directory, zoo name or TOML) as a GGUF file; returns what was written."""
    try:
        import gguf
    except ImportError:
        raise UserError("to-gguf writes with the gguf package: pip install 'llmcli[gguf]'") from None
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another name or pass --force to replace it")
    if Path(src).is_dir():
        check_outside(Path(src), out, "OUT")
    model = load_model(src)
    config = model.config
    arch = gguf_architecture(config)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[gguf_type]
    file_type = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}[gguf_type]  # llama.cpp's LLAMA_FTYPE_*

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _write_metadata(writer, gguf, arch, config, file_type)
        _write_vocab(writer, gguf, Path(src) if Path(src).is_dir() else None, config)
        types = {}
        for name, tensor in gguf_tensors(model, arch).items():
            array = tensor.numpy()
            matrix = array.ndim == 2 and name != "position_embd.weight"  # positions stay exact, as llama.cpp keeps them
            kind = qtype if matrix and array.shape[1] % BLOCK == 0 else gguf.GGMLQuantizationType.F32
            if kind == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, array.astype(np.float16))
            elif kind == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, array.astype(np.float32))
            else:
                writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
            types[kind.name] = types.get(kind.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except OSError as e:
        raise UserError(f"{out}: cannot write ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "architecture": arch, "type": gguf_type, "tensors": types,
            "bytes": out.stat().st_size}


def _write_metadata(writer, gguf, arch: str, config: ModelConfig, file_type: int) -> None:
    writer.add_name(config.name)
    writer.add_file_type(file_type)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_heads)
    writer.add_vocab_size(config.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_base)
        writer.add_rope_dimension_count(config.d_head)
        writer.add_key_length(config.d_head)
        writer.add_value_length(config.d_head)


def _write_vocab(writer, gguf, directory: Path | None, config: ModelConfig) -> None:
    """A byte-level BPE tokenizer.json's vocabulary and merges; a model without one (a zoo model with random
    weights, for benchmarks) gets placeholder tokens, enough for llama.cpp to load and time it."""
    tokens, merges, control = None, [], set()
    if directory is not None and (directory / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(directory)
        if tokenizer_kind(tokenizer) == "bpe" and "ByteLevel" in tokenizer.to_str():
            vocab = tokenizer.get_vocab(with_added_tokens=True)
            tokens = [None] * max(config.vocab_size, len(vocab))
            for token, i in vocab.items():
                tokens[i] = token
            control = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
            merges = [" ".join(m) if isinstance(m, list) else m
                      for m in json.loads(tokenizer.to_str())["model"].get("merges", [])]
    if tokens is None:
        alphabet = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + \
            [chr(c) for c in range(174, 256)] + [chr(c) for c in range(256, 324)]  # GPT-2's byte-level alphabet
        tokens = alphabet[:config.vocab_size]
    tokens = [t if t is not None else f"<unused_{i}>" for i, t in enumerate(tokens)][:config.vocab_size]
    tokens += [f"<unused_{i}>" for i in range(len(tokens), config.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in control else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges or [f"{tokens[0]} {tokens[1]}"])  # llama.cpp refuses a BPE vocab without merges
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    if config.eos_token_id is not None:
        writer.add_eos_token_id(config.eos_token_id)
