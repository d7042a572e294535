"""How many bytes training or inference needs, from the config alone (the model is built on the meta device).

Model states follow the mixed-precision convention of Micikevicius et al. 2018 as counted by the ZeRO paper
(Rajbhandari et al. 2020, sec. 3.1): 16-bit weights and gradients, fp32 master weights and fp32 optimizer
states, i.e. 2 + 2 + 4 + 8 = 16 bytes per parameter for AdamW. llmcli's own trainer (torch.autocast over
fp32 parameters) holds the same bytes: its fp32 parameters are the master weights, the 16-bit copies autocast
makes of every matrix live from the forward into the backward, and its fp32 gradients (4 bytes) take the place
of the 16-bit weights and gradients by the time the optimizer steps.

Activations are counted tensor by tensor from what autograd saves for the backward in *our* blocks
(tests/test_memory.py checks the sum against `saved_tensors_hooks`); Korthikanti et al. 2022
(34·s·b·h + 5·a·s²·b bytes per layer in 16-bit) is reported beside it as the reference formula.

A training step has two peaks and the estimate is the larger one:
- forward/backward: weights, master weights and optimizer states, every saved activation, and the logits
  with their gradient (gradients are set to None between steps and fill in as activations are freed);
- optimizer step: weights, gradients, master weights, optimizer states and the step's temporaries.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field

from llmcli.charts import write_png
from llmcli.config import ModelConfig, config_from_dict
from llmcli.errors import UserError
from llmcli.finetune.lora import DEFAULT_TARGETS, parse_targets
from llmcli.model_dir import QUANTIZATION_FILE, resolve_config, stored_tensor_bytes
from llmcli.models import build_on_meta
from llmcli.models.layout import PROJECTIONS, block_linears, blocks
from llmcli.models.positions import rotary_dim
from llmcli.models.quantized import DEFAULT_GROUP_SIZE, quantized_state_bytes
from llmcli.profiling.counts import count, kv_cache_bytes
from llmcli.runtime import DTYPES as RUNTIME_DTYPES
from llmcli.runtime import cross_entropy_chunk_rows, resolve_device

MODES = ("train", "infer")
DTYPES = {**{name: dtype.itemsize for name, dtype in RUNTIME_DTYPES.items()}, "int8": 1, "int4": 0.5}  # bytes
OPTIMIZERS = ("adamw", "sgd", "adafactor", "adamw8bit")
ATTENTIONS = ("sdpa", "eager")
DEVICES = ("cpu", "cuda")
COMPONENTS = ("weights", "gradients", "optimizer", "master_weights", "activations", "logits", "kv_cache")
BNB_BLOCK = 2048  # 8-bit optimizer states: block-wise quantization, block of 2048 (Dettmers et al. 2022)
BNB_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit states for tensors smaller than this (min_8bit_size)

SOURCES = {
    "model_states": "Rajbhandari et al. 2020 (ZeRO), sec. 3.1 and 5; mixed precision: Micikevicius et al. 2018",
    "activations": "what autograd saves in llmcli's blocks, checked with saved_tensors_hooks; "
                   "reference: Korthikanti et al. 2022, eq. 1-2 (34·s·b·h + 5·a·s²·b per layer, 16-bit)",
    "logits": "the logits and their gradient in the compute dtype; the chunked loss upcasts one chunk of "
              "rows at a time (llmcli.runtime.ChunkedCrossEntropy)",
    "kv_cache": "2 (K and V) · layers · batch · positions · kv_heads · d_head · bytes",
    "adafactor": "Shazeer & Stern 2018: factored second moment, one row and one column vector per matrix",
    "adamw8bit": f"Dettmers et al. 2022: 8-bit block-wise states, fp32 absmax per {BNB_BLOCK} values",
    "lora": "Hu et al. 2021: frozen base, trained A (r×in) and B (out×r)",
    "quantization": "weight-only, as `llmcli quantize` stores it: the blocks' projections in int8 with an fp32 "
                    "scale per output channel, or int4 (two per byte) with an fp32 scale per group of input "
                    "features; embeddings, norms, biases and heads in fp32",
}


@dataclass
class MemoryEstimate:
    """Bytes one device needs. With gpus > 1 every figure is per rank (what one device holds)."""

    params: int  # every parameter the model holds (heads included)
    trainable_params: int
    total_bytes: int  # the peak: the larger phase in training
    breakdown: dict[str, int]  # bytes of each component, keys COMPONENTS
    bytes_per_param: dict[str, float]  # the convention for the model-state components
    live_at_peak: list[str]  # components that are resident during the peak phase
    phases: dict[str, dict[str, int]]  # phase -> {component: bytes, ..., "total": bytes}
    peak_phase: str
    activations_per_layer: dict[str, int]  # stack -> bytes saved by one block
    reference_per_layer: dict[str, int]  # Korthikanti et al. 2022 for the same block
    attention_kernel: str  # fused (flash / memory-efficient), math (SDPA's fallback) or eager
    inputs: dict
    sharding: dict | None = None
    kv_bytes_per_token: int = 0  # per sequence: K and V of every (decoder) layer at one position
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # the formulas this estimate used, and whence

    @property
    def model_state_bytes(self) -> int:
        return sum(self.breakdown[k] for k in ("weights", "gradients", "master_weights", "optimizer"))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["model_state_bytes"] = self.model_state_bytes
        return data


# ---------------------------------------------------------------- what the meta model tells us


@dataclass
class _ParamStats:
    total: int
    matrices: int  # parameters of >= 2-D tensors (weight-decay group; AdamW's foreach temporary)
    largest: int  # elements of the largest tensor
    lora: int  # parameters LoRA adds (A and B on the targets)
    small_tensors: int  # parameters in tensors < BNB_MIN_SIZE (8-bit optimizers keep them in 32-bit)
    factored: int  # Adafactor state elements: rows + columns per matrix, full vectors
    largest_block: int  # parameters of the largest block (ZeRO-3 gathers one block at a time)


def _param_stats(config: ModelConfig, lora_rank: int, lora_targets: tuple[str, ...]) -> tuple[int, _ParamStats]:
    """(every parameter, as counts.py counts them; the details the estimate needs), cached per config."""
    return _cached_stats(json.dumps(config.to_dict(), sort_keys=True), lora_rank, lora_targets)


@functools.lru_cache(maxsize=64)
def _cached_stats(config_json: str, lora_rank: int, lora_targets: tuple[str, ...]) -> tuple[int, _ParamStats]:
    config = config_from_dict(json.loads(config_json), "<config>")
    model = build_on_meta(config)
    params = list(model.parameters())
    lora = sum(lora_rank * (layer.in_features + layer.out_features)
               for layer in block_linears(model, lora_targets).values()) if lora_rank else 0
    largest_block = max((sum(p.numel() for p in block.parameters()) for block in blocks(model).values()), default=0)
    factored = sum(p.shape[-1] + p.shape[:-1].numel() if p.dim() >= 2 else p.numel() for p in params)
    stats = _ParamStats(total=sum(p.numel() for p in params),
                        matrices=sum(p.numel() for p in params if p.dim() >= 2),
                        largest=max(p.numel() for p in params), lora=lora,
                        small_tensors=sum(p.numel() for p in params if p.numel() < BNB_MIN_SIZE),
                        factored=factored, largest_block=largest_block)
    return count(config).params_with_heads, stats


# ---------------------------------------------------------------- activations saved for the backward


@dataclass
class _Precision:
    """Element sizes of the tensors our training step creates."""

    residual: int  # the residual stream and stored weights: fp32 under autocast, 16-bit for a 16-bit base
    compute: int  # matmul inputs and outputs (autocast's dtype)
    device: str

    def mask(self, element: int) -> int:
        """Dropout keeps a bool mask on CUDA (native_dropout); on CPU a scaled mask of the input's dtype."""
        return 1 if self.device == "cuda" else element

    @property
    def cast(self) -> bool:
        """Autocast makes a separate 16-bit copy of a fp32 input for every linear that reads it."""
        return self.residual != self.compute


def attention_kernel(attention: str, device: str, training: bool, dropout: float, bias_needs_grad: bool,
                     capped: bool = False) -> str:
    """Which attention runs: 'fused' (flash / memory-efficient), 'math' (SDPA's fallback) or 'eager'.

    On CPU, SDPA's flash kernel takes no dropout and no attention bias that needs a gradient (T5's
    relative bias), so training falls back to the math kernel, which keeps the s×s probabilities.
    Capped scores (Gemma 2's attention softcap) always take the eager path.
    """
    if attention == "eager" or capped:
        return "eager"
    if device == "cpu" and training and (dropout > 0 or bias_needs_grad):
        return "math"
    return "fused"


def _norm_saved(cfg: ModelConfig, elements: int, rows: int, p: _Precision, trainable: bool,
                held: int | None = None) -> int:
    """LayerNorm keeps its input and fp32 mean and rstd; our RMSNorm keeps its fp32 input, rsqrt and,
    for the weight's gradient, the normalised tensor (in the input's dtype, `held` bytes; Gemma's in fp32,
    with its 1 + w)."""
    held = p.residual if held is None else held
    if cfg.norm == "layernorm":
        return held * elements + 8 * rows
    if cfg.norm == "gemma_rmsnorm":
        return 4 * elements + 4 * rows + (4 * elements if trainable else 0) + 4 * (elements // rows)
    return 4 * elements + 4 * rows + (held * elements if trainable else 0)


def _linear_inputs(elements: int, readers: int, p: _Precision) -> int:
    """Bytes the trainable linears reading one tensor save: one copy each under autocast, else shared."""
    if readers == 0:
        return 0
    return readers * p.compute * elements if p.cast else p.residual * elements


def _attention_saved(cfg: ModelConfig, b: int, t: int, s: int, kernel: str, causal: bool, p: _Precision,
                     dropout: bool, o_trainable: bool) -> int:
    """The attention core, from q, k, v (already projected) to the input of o_proj."""
    c, a = p.compute, cfg.n_heads
    q_el, kv_el, full_kv_el, scores = b * t * cfg.d_attn, b * s * cfg.n_kv_heads * cfg.d_head, b * s * cfg.d_attn, b * a * t * s
    o_input = c * q_el if o_trainable else 0
    if kernel == "fused":  # q, k, v, output and the fp32 logsumexp; o_proj reads the output in place
        return c * (2 * q_el + 2 * kv_el) + 4 * b * a * t
    if kernel == "math":  # CPU math kernel computes in fp32: scaled q and k, v, softmax (+ dropout mask, output)
        return 4 * (q_el + 2 * full_kv_el) + 4 * scores * (3 if dropout else 1) + o_input
    # eager: q, k and v copies (k and v repeated for GQA), causal bool mask, fp32 softmax, dropout mask and
    # output in fp32, the probabilities cast to the compute dtype for the matmul with v
    saved = c * (q_el + 2 * full_kv_el) + (scores if causal else 0) + 4 * scores
    if cfg.attention_softcap is not None:  # tanh keeps its fp32 output
        saved += 4 * scores
    if dropout:
        saved += (1 if p.device == "cuda" else 4) * scores + (4 if c == 4 else c) * scores
    elif c != 4:
        saved += c * scores
    return saved + o_input


def _block_saved(cfg: ModelConfig, b: int, t: int, p: _Precision, kernel: str, cross_kernel: str, causal: bool,
                 cross_len: int | None, dropout: bool, trainable: set[str], lora_rank: int) -> int:
    """Bytes autograd saves for one block (pre-norm, post-norm or parallel; optional cross-attention)."""
    e, rows = b * t * cfg.d_model, b * t
    ff = rows * cfg.experts_per_token * cfg.expert_width if cfg.n_experts else rows * cfg.d_ff  # hidden elements
    norm = _norm_saved(cfg, e, rows, p, "norm" in trainable)
    gated = cfg.activation in ("swiglu", "geglu")
    attn_readers = sum(n in trainable for n in ("q_proj", "k_proj", "v_proj"))
    ff_readers = ("up" in trainable) + (gated and "gate" in trainable)
    # LoRA: B keeps A's output (b, t, r) for every adapted linear
    attn_lora = lora_rank * b * t * p.compute * len(trainable & {"q_proj", "k_proj", "v_proj", "o_proj"})
    ff_lora = lora_rank * b * t * p.compute * len(trainable & {"up", "gate", "down"})
    o_trainable = "o_proj" in trainable
    drop_mask = p.mask(p.compute) * e if dropout else 0  # dropout after attention and after the feed-forward

    saved = _attention_saved(cfg, b, t, t, kernel, causal, p, dropout, o_trainable) + attn_lora + ff_lora
    saved += drop_mask
    saved += _qk_norms_saved(cfg, b, t, p, trainable, ("q_proj", "k_proj"))
    saved += _hidden_saved(cfg, ff, p, trainable) + drop_mask
    if cfg.parallel_block:  # one norm feeds attention and feed-forward
        return saved + norm + _linear_inputs(e, attn_readers + ff_readers, p)
    # norms of the residual stream (before or, post-norm, after each sublayer's sum) and of a sublayer's output,
    # which is in the compute dtype (OLMo 2's output norms; Gemma's sandwich has both)
    stream_norms = 0 if cfg.norm_position == "output" else 2
    output_norms = 2 if cfg.norm_position in ("output", "sandwich") else 0
    saved += stream_norms * norm + output_norms * _norm_saved(cfg, e, rows, p, "norm" in trainable, held=p.compute)
    saved += _linear_inputs(e, attn_readers, p)
    saved += _experts_saved(cfg, rows, p, trainable, ff_readers) if cfg.n_experts else _linear_inputs(e, ff_readers, p)
    if cross_len is not None:  # T5 decoder: norm, q from x, k and v from the encoder output
        memory = b * cross_len * cfg.d_model
        saved += norm + _linear_inputs(e, "q_proj" in trainable, p) + drop_mask
        saved += _attention_saved(cfg, b, t, cross_len, cross_kernel, False, p, dropout, o_trainable) + attn_lora
        if p.cast:  # else the encoder output is shared by all layers (counted once per model)
            saved += _linear_inputs(memory, ("k_proj" in trainable) + ("v_proj" in trainable), p)
    return saved


def _hidden_saved(cfg: ModelConfig, hidden: int, p: _Precision, trainable: set[str]) -> int:
    """What a feed-forward keeps of its `hidden` (tokens x width) elements."""
    if cfg.activation in ("swiglu", "geglu"):  # act(gate(x)) * up(x): the activation's input, both factors, product
        return p.compute * hidden * (3 + ("down" in trainable))
    if cfg.activation == "relu":  # relu keeps its output, which is also down's input
        return p.compute * hidden
    return p.compute * hidden * (1 + ("down" in trainable))  # gelu keeps its input; down keeps gelu's output


def _experts_saved(cfg: ModelConfig, rows: int, p: _Precision, trainable: set[str], ff_readers: int) -> int:
    """A mixture of experts besides its experts' hidden states: the router's input, its fp32 softmax, the top-k
    indices and routing order (int64), each routed copy of a token (what an expert's up and gate read), each expert
    output and its weight (the product's inputs), and the weighted outputs index_add_ sums (it keeps its source).
    The router logits the layer keeps for its losses (4 bytes per token and expert) are not autograd's: left out."""
    routed, shared = rows * cfg.experts_per_token, cfg.d_shared_expert is not None
    # the tokens feed the router, and a shared expert's gate, up and gate projections
    readers = ("router" in trainable) * (2 if shared else 1) + (ff_readers if shared else 0)
    saved = _linear_inputs(rows * cfg.d_model, readers, p) + 4 * rows * cfg.n_experts
    if shared:  # its hidden states; sigmoid(gate) and its output, the product's inputs
        saved += _hidden_saved(cfg, rows * cfg.d_shared_expert, p, trainable) + p.compute * rows * (1 + cfg.d_model)
    saved += 3 * 8 * routed  # top-k indices, the order grouping them by expert, each routed pair's token
    if cfg.norm_topk_prob:  # weights / their sum keeps both
        saved += 4 * routed + 4 * rows
    saved += _linear_inputs(routed * cfg.d_model, ff_readers, p)
    return saved + (p.compute + p.residual) * routed * cfg.d_model + p.residual * routed


def _qk_norms_saved(cfg: ModelConfig, b: int, t: int, p: _Precision, trainable: set[str],
                    projections: tuple[str, ...]) -> int:
    """QK-norm: q and k normed (per head or over the projection) from the projections' outputs."""
    if cfg.qk_norm is None:
        return 0
    saved = 0
    for name in projections:
        width = cfg.d_attn if name == "q_proj" else cfg.n_kv_heads * cfg.d_head
        rows = b * t * width // cfg.d_head if cfg.qk_norm == "head" else b * t
        saved += _norm_saved(cfg, b * t * width, rows, p, "norm" in trainable, held=p.compute)
    return saved


def _first_block_unsaved(cfg: ModelConfig, b: int, t: int, p: _Precision, kernel: str, dropout: bool,
                         trainable: set[str]) -> int:
    """What the first block does not save when its input needs no gradient (frozen embeddings, LoRA).

    Its first norm keeps nothing, nor does a parallel block's feed-forward, nor the QK-norm of a frozen
    projection; with k_proj frozen, q @ k^T keeps no copy of q. (A post-norm stack's embedding norm is left out in _stack_saved.)
    """
    e, q_el = b * t * cfg.d_model, b * t * cfg.d_attn
    unsaved = 0
    if cfg.norm_position in ("pre", "sandwich"):
        unsaved += _norm_saved(cfg, e, b * t, p, "norm" in trainable)
    if cfg.parallel_block and not trainable & {"up", "gate", "down"}:
        ff = b * t * cfg.d_ff
        unsaved += p.compute * ff * (3 if cfg.activation in ("swiglu", "geglu") else 1)
        unsaved += p.mask(p.compute) * e if dropout else 0
    if "k_proj" not in trainable and kernel != "fused":
        unsaved += (4 if kernel == "math" else p.compute) * q_el
    unsaved += _qk_norms_saved(cfg, b, t, p, trainable, tuple(n for n in ("q_proj", "k_proj") if n not in trainable))
    return unsaved


def _korthikanti(cfg: ModelConfig, b: int, s: int) -> int:
    """Korthikanti et al. 2022, eq. 1: activation bytes per layer, 16-bit, with dropout, no recomputation."""
    return s * b * cfg.d_model * (34 + 5 * cfg.n_heads * s // cfg.d_model)


# ---------------------------------------------------------------- the estimate


def _check(config: ModelConfig, mode: str, batch_size: int, seq_len: int, dtype: str, optimizer: str,
           lora_rank: int, zero_stage: int, gpus: int, attention: str, device: str, new_tokens: int,
           target_len: int) -> None:
    where = config.name
    if mode not in MODES:
        raise UserError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if attention not in ATTENTIONS:
        raise UserError(f"--attention {attention!r} is not one of {', '.join(ATTENTIONS)}")
    if device not in DEVICES:
        raise UserError(f"--device {device!r}: estimates are for cpu or cuda")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if not 1 <= seq_len <= config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} is outside {where}'s context of 1..{config.max_seq_len} tokens; "
                        f"use --seq-len {config.max_seq_len} or less")
    if config.family == "t5" and not 1 <= target_len <= config.max_seq_len:
        raise UserError(f"target length {target_len} is outside {where}'s context of 1..{config.max_seq_len}")
    if mode == "infer" and config.family == "gpt" and not 0 <= new_tokens < seq_len:
        raise UserError(f"--new-tokens {new_tokens} must be below --seq-len {seq_len} (the prompt plus the "
                        f"generated tokens fill the context); lower --new-tokens or raise --seq-len")
    if mode == "infer" and config.family == "t5" and not 0 <= new_tokens < config.max_seq_len:
        raise UserError(f"--new-tokens {new_tokens} must be in 0..{config.max_seq_len - 1} for {where}")
    if lora_rank < 0:
        raise UserError(f"--lora-rank must be >= 0, got {lora_rank}")
    if lora_rank and mode != "train":
        raise UserError("--lora-rank describes fine-tuning; use it with --mode train")
    if mode == "train" and dtype in ("int8", "int4") and not lora_rank:
        raise UserError(f"--dtype {dtype} cannot be trained directly; add --lora-rank R for a frozen quantized "
                        f"base (QLoRA), or train in bf16")
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    if zero_stage not in (0, 1, 2, 3):
        raise UserError(f"--zero-stage {zero_stage} is not one of 0, 1, 2, 3")
    if zero_stage and gpus < 2:
        raise UserError(f"--zero-stage {zero_stage} shards across data-parallel ranks; add --gpus N with N > 1")
    if zero_stage and mode != "train":
        raise UserError("--zero-stage shards training state; use it with --mode train")


def estimate_memory_of(model_ref: str, mode: str = "train", device: str = "auto",
                       **options) -> tuple[ModelConfig, MemoryEstimate, str]:
    """`llmcli memory-estimate`: the estimate for a zoo name, TOML file or model directory, and the device it is
    for (auto: cuda where available). A quantized directory's weights count as stored (infer)."""
    config, directory = resolve_config(model_ref)
    quantized = directory is not None and (directory / QUANTIZATION_FILE).is_file()
    stored = stored_tensor_bytes(directory) if quantized and mode == "infer" else None
    device = resolve_device(device).type if device == "auto" else device
    return config, estimate_memory(config, mode, device=device, stored_weight_bytes=stored, **options), device


def estimate_memory(config: ModelConfig, mode: str = "train", batch_size: int = 1, seq_len: int | None = None,
                    dtype: str = "fp32", optimizer: str = "adamw", grad_checkpointing: bool = False,
                    lora_rank: int = 0, lora_targets: tuple[str, ...] = DEFAULT_TARGETS, zero_stage: int = 0,
                    gpus: int = 1, attention: str = "sdpa", device: str = "cuda", new_tokens: int = 16,
                    target_len: int | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                    stored_weight_bytes: int | None = None) -> MemoryEstimate:
    """Estimate the peak memory of one training step or of generation (prefill plus new_tokens decode steps).

    seq_len defaults to the model's context. In infer mode seq_len is the whole context the KV cache holds
    (prompt plus generated tokens) for GPT, the encoder input for T5; T5 targets default to seq_len.
    batch_size is per device. stored_weight_bytes (infer): the weights as a quantized directory stores them,
    counted instead of the dtype's convention.
    """
    seq_len = config.max_seq_len if seq_len is None else seq_len
    target_len = seq_len if target_len is None else target_len
    device = device.split(":")[0]
    _check(config, mode, batch_size, seq_len, dtype, optimizer, lora_rank, zero_stage, gpus, attention, device,
           new_tokens, target_len)
    lora_targets = tuple(parse_targets(list(lora_targets)))
    params, stats = _param_stats(config, lora_rank, lora_targets)
    inputs = dict(model=config.name, mode=mode, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                  optimizer=optimizer if mode == "train" else None, grad_checkpointing=grad_checkpointing,
                  lora_rank=lora_rank, lora_targets=list(lora_targets) if lora_rank else None,
                  zero_stage=zero_stage, gpus=gpus, attention=attention, device=device,
                  new_tokens=new_tokens if mode == "infer" else None,
                  target_len=target_len if config.family == "t5" else None)
    if mode == "infer":
        return _infer(config, stats, params, batch_size, seq_len, dtype, attention, device, new_tokens,
                      group_size, inputs, stored_weight_bytes)
    return _train(config, stats, params, batch_size, seq_len, target_len, dtype, optimizer, grad_checkpointing,
                  lora_rank, lora_targets, zero_stage, gpus, attention, device, group_size, inputs)


def logit_bytes(config: ModelConfig, positions: int, compute: int) -> int:
    """The training loss's logits: the head's output and its gradient (compute dtype), plus one chunk of rows in
    fp32 for the softmax (and its fp32 copy of the chunk when the logits are 16-bit)."""
    chunk = min(positions, cross_entropy_chunk_rows(config.vocab_size)) * config.vocab_size
    return 2 * compute * positions * config.vocab_size + (1 if compute == 4 else 2) * 4 * chunk


def _optimizer_bytes(optimizer: str, stats: _ParamStats, trainable: int, lora: bool,
                     fused: bool) -> tuple[float, float]:
    """(state bytes, step-temporary bytes) for the trainable parameters, fp32 states."""
    if optimizer == "adamw":  # m and v; fused AdamW (one device) steps in place, foreach (under torchrun)
        # computes sqrt(v) out of place
        return 8 * trainable, 0 if fused else 4 * (trainable if lora else stats.matrices)
    if optimizer == "sgd":  # momentum; foreach SGD adds weight decay to the gradients out of place
        return 4 * trainable, 4 * (trainable if lora else stats.matrices)
    if optimizer == "adafactor":  # factored second moment, no first moment (torch's default beta1=None)
        states = 4 * (trainable if lora else stats.factored)
        return states, 4 * (trainable if lora else stats.largest)  # one tensor's estimate at a time
    # adamw8bit: 2 bytes of state per parameter plus an fp32 absmax per block and state
    if lora:
        return (2 + 8 / BNB_BLOCK) * trainable, 0
    big = stats.total - stats.small_tensors
    return (2 + 8 / BNB_BLOCK) * big + 8 * stats.small_tensors, 0


def _train(config, stats, params, batch, seq_len, target_len, dtype, optimizer, checkpointing, lora_rank,
           lora_targets, zero_stage, gpus, attention, device, group_size, inputs) -> MemoryEstimate:
    notes = []
    lora = lora_rank > 0
    trainable = stats.lora if lora else params
    mixed = dtype != "fp32"
    compute = 4 if dtype == "fp32" else 2
    # model states per parameter (ZeRO convention): 16-bit weights and gradients + fp32 master in mixed precision
    if lora:
        base = quantized_state_bytes(config, dtype, group_size) if dtype in ("int8", "int4") else DTYPES[dtype] * params
        weights = base + compute * trainable
        notes.append(f"LoRA rank {lora_rank} on {', '.join(lora_targets)}: the frozen base stored in {dtype} "
                     f"(as PEFT and QLoRA load it), {trainable:,} trained parameters")
    else:
        weights = compute * params
    gradients = compute * trainable
    master = 4 * trainable if mixed else 0
    opt_states, step_temp = _optimizer_bytes(optimizer, stats, trainable, lora, fused=gpus == 1)
    if optimizer == "adamw8bit":
        notes.append("adamw8bit as bitsandbytes: tensors under 4096 values keep 32-bit states")

    # sharding: stage 1 optimizer states (with the master weights), 2 also gradients, 3 also weights
    shard = {k: (gpus if zero_stage >= s else 1) for k, s in
             (("optimizer", 1), ("master_weights", 1), ("gradients", 2), ("weights", 3))}
    weights, gradients = weights / shard["weights"], gradients / shard["gradients"]
    master, opt_states, step_temp = master / shard["master_weights"], opt_states / shard["optimizer"], \
        step_temp / shard["optimizer"]

    # activations
    residual = compute if (lora and dtype != "fp32") else 4
    p = _Precision(residual=residual, compute=compute, device=device)
    names = {"q_proj", "k_proj", "v_proj", "o_proj", "up", "gate", "down", "norm", "embedding", "head", "router"}
    train_set = {PROJECTIONS[t] for t in lora_targets} if lora else names
    dropout = config.dropout > 0
    bias_grad = config.position in ("relative", "transformer_xl") and not lora
    capped = config.attention_softcap is not None
    kernel = attention_kernel(attention, device, True, config.dropout, bias_grad, capped)
    cross_kernel = attention_kernel(attention, device, True, config.dropout, False, capped)
    if config.position == "transformer_xl":
        notes.append("Transformer-XL position terms are not counted in the activations")
    stacks = _stacks(config, seq_len, target_len)
    per_layer, reference, activations = {}, {}, 0.0
    for name, (layers, t, causal, cross_len) in stacks.items():
        causal_mask = causal and config.position not in ("relative", "transformer_xl")  # else a bias masks
        block = _block_saved(config, batch, t, p, kernel, cross_kernel, causal_mask, cross_len, dropout, train_set,
                             lora_rank)
        per_layer[name], reference[name] = int(block), _korthikanti(config, batch, t)
        block_input = p.residual * batch * t * config.d_model
        activations += layers * block_input + block if checkpointing else layers * block
        if "embedding" not in train_set and not checkpointing:  # the first block's input needs no gradient
            activations -= _first_block_unsaved(config, batch, t, p, kernel, dropout, train_set)
        activations += _stack_saved(config, batch, t, p, kernel, dropout, train_set)
    activations += _head_saved(config, batch, stacks, p, train_set)
    out_len = target_len if config.family == "t5" else seq_len
    logits = logit_bytes(config, batch * out_len, compute)
    if checkpointing:
        notes.append("grad checkpointing: each block keeps its input; one block is recomputed at a time")

    breakdown = dict(weights=weights, gradients=gradients, optimizer=opt_states, master_weights=master,
                     activations=activations, logits=logits, kv_cache=0)
    forward = dict(weights=weights, master_weights=master, optimizer=opt_states, activations=activations,
                   logits=logits)
    if gpus > 1:  # data-parallel gradient buffers (DDP buckets, ZeRO's partitions) stay allocated
        forward["gradients"] = gradients
    if zero_stage == 3:  # the current and the prefetched block, gathered in 16-bit
        forward["gathered_weights"] = 2 * stats.largest_block * compute
    step = dict(weights=weights, gradients=gradients, master_weights=master, optimizer=opt_states,
                step_temporaries=step_temp)
    if attention == "eager":  # the eager path keeps each layer's probabilities on the module (visualisation)
        kept = sum(layers * 4 * batch * config.n_heads * t * t for layers, t, _, _ in stacks.values())
        step["kept_attention_weights"] = kept
    phases = {"forward_backward": _phase(forward), "optimizer_step": _phase(step)}
    sharding = None
    if gpus > 1:
        sharded = [k for k in ("optimizer", "master_weights", "gradients", "weights") if shard[k] > 1]
        sharding = dict(zero_stage=zero_stage, gpus=gpus, sharded=sharded,
                        source="Rajbhandari et al. 2020: stage 1 P_os, stage 2 P_os+g, stage 3 P_os+g+p")
    per_param = dict(weights=_per(weights * shard["weights"], params),
                     gradients=_per(gradients * shard["gradients"], trainable),
                     master_weights=_per(master * shard["master_weights"], trainable),
                     optimizer=_per(opt_states * shard["optimizer"], trainable))
    return _finish(params, trainable, breakdown, per_param, phases, per_layer, reference, kernel, inputs,
                   sharding, notes)


def _infer(config, stats, params, batch, seq_len, dtype, attention, device, new_tokens, group_size,
           inputs, stored_weight_bytes=None) -> MemoryEstimate:
    """Generation: weights, the preallocated KV cache, the prefill's logits and one layer's working tensors."""
    notes = []
    compute = 4 if dtype == "fp32" else 2
    if stored_weight_bytes is not None:
        weights = stored_weight_bytes
        notes.append(f"weights as the quantized directory stores them; {dtype} compute and KV cache")
    elif dtype in ("int8", "int4"):
        weights = quantized_state_bytes(config, dtype, group_size)
        layout = "per output channel" if dtype == "int8" else f"per {group_size} input features"
        notes.append(f"{dtype}: the blocks' projections as `llmcli quantize` stores them (fp32 scale {layout}); "
                     f"embeddings, norms, biases and heads in fp32; 16-bit compute and KV cache")
    else:
        weights = DTYPES[dtype] * params
    kernel = attention_kernel(attention, device, False, 0.0, False, config.attention_softcap is not None)
    kv_per_token = kv_cache_bytes(config, compute, 1)  # below any sliding window
    e = lambda t: batch * t * config.d_model * compute  # noqa: E731
    if config.family == "gpt":
        prompt = seq_len - new_tokens
        kv = kv_cache_bytes(config, compute, seq_len) * batch
        logits = batch * config.vocab_size * compute  # the prefill computes the last position's logits only
        work = _infer_working(config, batch, prompt, prompt, compute, kernel)
    elif config.family == "t5":
        steps = new_tokens + 1  # the decoder's start token plus the generated ones
        kv = kv_per_token * batch * (steps + seq_len)  # self + cross
        logits = batch * config.vocab_size * compute
        work = e(seq_len) + _infer_working(config, batch, seq_len, seq_len, compute, kernel)  # + encoder output
    else:  # bert: one forward (fill-mask, embed); no cache
        kv = 0
        logits = 2 * batch * seq_len * config.vocab_size * compute  # the head's output, then plus its bias
        work = _infer_working(config, batch, seq_len, seq_len, compute, kernel)
    if attention == "eager":  # every (encoder) layer keeps its prefill probabilities on the module
        t = seq_len - new_tokens if config.family == "gpt" else seq_len
        work += config.n_layers * 4 * batch * config.n_heads * t * t
    breakdown = dict(weights=weights, gradients=0, optimizer=0, master_weights=0, activations=work,
                     logits=logits, kv_cache=kv)
    phases = {"forward": _phase({k: v for k, v in breakdown.items() if v})}
    per_param = dict(weights=_per(weights, params), gradients=0, master_weights=0, optimizer=0)
    estimate = _finish(params, 0, breakdown, per_param, phases, {}, {}, kernel, inputs, None, notes)
    if config.family != "bert":
        estimate.kv_bytes_per_token = int(kv_per_token)
    return estimate


def _infer_working(cfg: ModelConfig, b: int, t: int, s: int, c: int, kernel: str) -> int:
    """The largest set of tensors alive inside one block during a forward without autograd."""
    e = b * t * cfg.d_model
    attn = c * (2 * e + b * t * (2 * cfg.d_attn + 2 * cfg.n_kv_heads * cfg.d_head))  # x, norm(x), q, k, v, output
    if kernel == "eager":  # scores in the compute dtype and in fp32, the causal mask, the softmax
        attn += b * cfg.n_heads * t * s * (c + 4 + 1 + 4)
    gated = cfg.activation in ("swiglu", "geglu")
    if cfg.n_experts:  # x, norm(x), the output being summed, router logits and probabilities, then one expert at a
        # time over its share of the routed tokens: their copies, hidden, activation (and product)
        share = b * t * cfg.experts_per_token / cfg.n_experts
        ff = c * 3 * e + 8 * b * t * cfg.n_experts + c * share * (cfg.d_model + cfg.expert_width * (3 if gated else 2))
        if cfg.d_shared_expert is not None:  # the shared expert over every token, and its output
            ff += c * b * t * (cfg.d_shared_expert * (3 if gated else 2) + cfg.d_model)
    else:
        ff = c * (2 * e + b * t * cfg.d_ff * (3 if gated else 2))  # x, norm(x), hidden, activation (and product)
    bias = c * b * t * s  # the additive bias built from generation's attention mask
    rope = 2 * 4 * b * t * cfg.d_head if cfg.position == "rope" else 0  # fp32 cos and sin
    return max(attn, ff) + bias + rope


def _stacks(config: ModelConfig, seq_len: int, target_len: int) -> dict[str, tuple]:
    """name -> (layers, positions, causal, cross-attention length or None)."""
    if config.family == "t5":
        return {"encoder": (config.n_layers, seq_len, False, None),
                "decoder": (config.n_decoder_layers, target_len, True, seq_len)}
    return {"decoder" if config.family == "gpt" else "encoder": (config.n_layers, seq_len,
                                                                config.family == "gpt", None)}


def _stack_saved(cfg: ModelConfig, b: int, t: int, p: _Precision, kernel: str, dropout: bool,
                 trainable: set[str]) -> float:
    """Per stack, outside the blocks: embedding indices, embedding norm and dropout, positions, final norm."""
    e, rows = b * t * cfg.d_model, b * t
    saved = 0.0
    if "embedding" in trainable:
        saved += 8 * rows  # token ids for the embedding's backward
        if cfg.position == "learned":
            saved += 8 * t  # position ids (one row, broadcast)
        if cfg.family == "bert" and cfg.type_vocab_size:
            saved += 8 * rows  # token type ids
    embeddings_train = "embedding" in trainable
    if dropout and embeddings_train:
        saved += p.mask(p.residual) * e  # embedding dropout
    if cfg.norm_position != "post" or embeddings_train:  # the final norm, or the embedding norm (post-norm)
        saved += _norm_saved(cfg, e, rows, p, "norm" in trainable)
    if cfg.position == "rope":  # cos and sin, shared by the layers (and a second pair for Gemma 3's local base)
        saved += 2 * 4 * b * t * rotary_dim(cfg) * (2 if cfg.rope_local_base is not None else 1)
    windowed = sum(cfg.window(i) is not None for i in range(cfg.n_layers)) if cfg.family == "gpt" else 0
    if windowed and kernel == "fused":  # SDPA keeps the window's additive bias: shared, or cast for each layer
        saved += (p.compute * windowed if p.cast else p.residual) * t * t
    if windowed and kernel == "eager":  # a windowed layer masks by that bias, not by a causal bool mask
        saved -= windowed * b * cfg.n_heads * t * t
    if cfg.position == "relative" and embeddings_train:  # bucket ids; the bias (1, H, T, T) before clamp
        saved += 8 * t * t + p.residual * cfg.n_heads * t * t
    if kernel == "fused" and cfg.position == "relative":  # SDPA keeps the attention bias it was given
        saved += p.residual * cfg.n_heads * t * t
    if kernel == "fused" and cfg.family == "bert":  # the padding mask as a bias (B, 1, T, T)
        saved += p.residual * b * t * t
    return saved


def _head_saved(cfg: ModelConfig, b: int, stacks: dict, p: _Precision, trainable: set[str]) -> float:
    """The LM head's input (and BERT's MLM transform and pooler), the loss targets, T5's encoder output."""
    layers, t, _, _ = list(stacks.values())[-1]
    e = b * t * cfg.d_model
    head = "head" in trainable
    saved = 8 * b * t  # the loss targets
    if cfg.family == "t5":
        enc_t = stacks["encoder"][1]
        if not p.cast:  # the encoder output is read by every cross-attention; saved once
            saved += p.residual * b * enc_t * cfg.d_model
        if cfg.tie_embeddings:  # hidden * d_model**-0.5 before the head: a new tensor
            saved += (p.compute if p.cast else p.residual) * e if head else 0
            return saved
    if cfg.family == "bert":  # dense -> gelu -> LayerNorm, then the vocabulary projection
        saved += _linear_inputs(e, int(head), p) + p.compute * e  # dense input, gelu input
        # the norm's input is gelu's output; CUDA autocast runs layer_norm in fp32 (a copy), CPU autocast does not
        saved += (4 if p.cast and p.device == "cuda" else p.compute) * e + 8 * b * t
        if cfg.pooler:
            saved += (1 + p.cast) * p.compute * b * cfg.d_model  # tanh's output (and the cast [CLS] row)
    if cfg.logits_softcap is not None:  # Gemma 2: tanh keeps its output, the size of the logits
        saved += p.compute * b * t * cfg.vocab_size
    return saved + _linear_inputs(e, int(head), p)


def _phase(parts: dict[str, float]) -> dict[str, int]:
    parts = {k: int(v) for k, v in parts.items()}
    return {**parts, "total": sum(parts.values())}


def _per(nbytes: float, params: int) -> float:
    return round(nbytes / params, 4) if params else 0.0


def _finish(params, trainable, breakdown, per_param, phases, per_layer, reference, kernel, inputs, sharding,
            notes) -> MemoryEstimate:
    peak = max(phases, key=lambda name: phases[name]["total"])
    live = [k for k in COMPONENTS if k in phases[peak]]
    topics = ["model_states", "activations"] if inputs["mode"] == "train" else ["kv_cache"]
    topics += [t for t, used in (("logits", inputs["mode"] == "train"), ("lora", inputs["lora_rank"]),
                                 ("quantization", inputs["dtype"] in ("int8", "int4")),
                                 ("adafactor", inputs["optimizer"] == "adafactor"),
                                 ("adamw8bit", inputs["optimizer"] == "adamw8bit")) if used]
    return MemoryEstimate(params=params, trainable_params=trainable, total_bytes=phases[peak]["total"],
                          breakdown={k: int(math.ceil(v)) for k, v in breakdown.items()},
                          bytes_per_param=per_param, live_at_peak=live, phases=phases, peak_phase=peak,
                          activations_per_layer=per_layer, reference_per_layer=reference,
                          attention_kernel=kernel, inputs=inputs, sharding=sharding, notes=notes,
                          sources={t: SOURCES[t] for t in topics})


def write_memory_png(path, result: dict):
    """Each phase of the estimate as a bar stacked by component, the measured peak beside it when there is one."""
    phases = result["phases"]
    names = [name for name in COMPONENTS + ("step_temporaries", "gathered_weights", "kept_attention_weights")
             if any(phase.get(name) for phase in phases.values())]
    labels = [name.replace("_", "/" if name == "forward_backward" else " ") for name in phases]
    measured = result.get("measured_bytes")
    inputs = result["inputs"]

    def draw(axes) -> None:
        mib = 2**20
        xs = list(range(len(phases)))
        bottoms = [0.0] * len(phases)
        for name in names:
            heights = [phase.get(name, 0) / mib for phase in phases.values()]
            axes.bar(xs, heights, 0.6, bottom=bottoms, label=name.replace("_", " "))
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        ticks = labels + (["measured peak"] if measured is not None else [])
        if measured is not None:
            axes.bar([len(phases)], [measured / mib], 0.6, color="black", label="measured")
            axes.axhline(result["total_bytes"] / mib, color="grey", linestyle="--", linewidth=1,
                         label="estimated peak")
        axes.set_xticks(list(range(len(ticks))), ticks)
        axes.set(ylabel="MiB", title=f"{inputs['model']} {inputs['mode']}: batch {inputs['batch_size']}, "
                                     f"seq {inputs['seq_len']}, {inputs['dtype']}, {inputs['device']}")
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return write_png(path, draw, size=(7.5, 4))
