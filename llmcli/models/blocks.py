"""The shared blocks every family is built from: norms, feed-forward, attention (with its KV cache), the
transformer block and the stack of blocks. Positions (rotary, relative, sinusoidal) are models/positions.py.

Read top to bottom: each piece uses only what stands above it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.models.positions import (RelativePositionBias, TransformerXLPosition, apply_rope, rope_cos_sin,
                                     sinusoidal_table)

# ---------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): no mean subtraction, no bias; stats in fp32.

    unit_offset (Gemma): the scale is 1 + w with w starting at zero, applied in fp32 before the cast back.
    """

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over the last `dim` features (default d_model)."""
    if cfg.norm in ("rmsnorm", "gemma_rmsnorm"):
        return RMSNorm(dim or cfg.d_model, cfg.norm_eps, unit_offset=cfg.norm == "gemma_rmsnorm")
    return nn.LayerNorm(dim or cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


# ---------------------------------------------------------------- feed-forward

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "swiglu": F.silu,  # Shazeer 2020: SiLU-gated
    "geglu": lambda x: F.gelu(x, approximate="tanh"),  # as T5 v1.1's "gated-gelu"
}


class FeedForward(nn.Module):
    """down(act(up(x))), or down(act(gate(x)) * up(x)) for the gated variants (SwiGLU, GeGLU)."""

    def __init__(self, cfg: ModelConfig, width: int | None = None) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        bias, width = cfg.projection_bias("up"), width or cfg.d_ff
        self.up = nn.Linear(cfg.d_model, width, bias=bias)
        self.gate = nn.Linear(cfg.d_model, width, bias=bias) if cfg.activation in ("swiglu", "geglu") else None
        self.down = nn.Linear(width, cfg.d_model, bias=bias)

    # models.gemv.prepare_for_decode sets this per instance: (gate(x), up(x)) in one kernel call
    fused_gate_up = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        gate, up = self.fused_gate_up(x) if self.fused_gate_up is not None else (self.gate(x), self.up(x))
        return self.down(self.act(gate) * up)


class MixtureOfExperts(nn.Module):
    """A router and `n_experts` feed-forwards; each token goes to its top-k experts, weighted by the router's
    softmax probabilities (renormalised over the k with norm_topk_prob: Mixtral, Qwen3-MoE; not: OLMoE). With
    d_shared_expert, a shared expert also runs on every token, its output scaled by sigmoid(w·x) (Qwen2-MoE).

    Tokens are grouped by expert and each expert runs once over its tokens. After each call `expert_load` (tokens
    routed to each expert) stays on the module for the load statistics, and, when autograd is on (training),
    `router_logits` ((tokens, n_experts), fp32) and `chosen` ((tokens, k)) for the router's losses."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg, cfg.expert_width) for _ in range(cfg.n_experts))
        shared = cfg.d_shared_expert is not None
        self.shared = FeedForward(cfg, cfg.d_shared_expert) if shared else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if shared else None
        self.router_logits: torch.Tensor | None = None
        self.chosen: torch.Tensor | None = None
        self.expert_load: torch.Tensor | None = None

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits in fp32, the k weights per token in the tokens' dtype, the k experts per token)."""
        logits = self.router(tokens).float()
        weights, chosen = logits.softmax(-1).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(tokens.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        logits, weights, chosen = self.route(tokens)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)  # the (token, slot) pairs grouped by expert
        load = torch.bincount(flat, minlength=len(self.experts))
        token_of = order // self.top_k
        out = torch.zeros_like(tokens)
        start = 0
        for expert, count in zip(self.experts, load.tolist()):
            if count:
                rows = token_of[start:start + count]
                routed = expert(tokens[rows]) * weights.reshape(-1)[order[start:start + count], None]
                out.index_add_(0, rows, routed)
                start += count
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(tokens)) * self.shared(tokens)
        self.router_logits, self.chosen = (logits, chosen) if torch.is_grad_enabled() else (None, None)
        self.expert_load = load.detach()
        return out.reshape(x.shape)


def load_balancing_loss(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4): E · Σ_e f_e · P_e, with f_e the share of
    the routed (token, slot) pairs that went to expert e (no gradient) and P_e the mean router probability of e.
    1 when tokens and probability spread evenly, E when one expert takes everything."""
    n_experts = logits.shape[-1]
    share = torch.bincount(chosen.reshape(-1), minlength=n_experts).to(logits.dtype) / chosen.numel()
    return n_experts * (share * logits.softmax(-1).mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of logsumexp(logits)², which keeps
    the router's logits small."""
    return logits.logsumexp(-1).square().mean()


def router_losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The load-balancing and z losses of the last forward with autograd, each averaged over the mixtures of
    experts; None for a model without experts."""
    layers = [m for m in model.modules() if isinstance(m, MixtureOfExperts) and m.router_logits is not None]
    if not layers:
        return None
    balance = torch.stack([load_balancing_loss(m.router_logits, m.chosen) for m in layers]).mean()
    return balance, torch.stack([router_z_loss(m.router_logits) for m in layers]).mean()


def expert_loads(model: nn.Module) -> list[list[float]]:
    """Per mixture of experts (in forward order), the share of the last forward's routed tokens each expert took."""
    return [(m.expert_load / m.expert_load.sum().clamp(min=1)).tolist() for m in model.modules()
            if isinstance(m, MixtureOfExperts) and m.expert_load is not None]


# ---------------------------------------------------------------- KV cache


class LayerKVCache:
    """Preallocated keys and values of one self-attention layer: (B, n_kv_heads, max_len, d_head).

    A sliding-window layer keeps only its last `window - 1` positions, in order (all that the next query can
    see besides itself): a call attends to those and its own new keys. `length` counts every position seen.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, d_head: int,
                 device: torch.device | str, dtype: torch.dtype, window: int | None = None) -> None:
        self.window = window
        kept = max_len if window is None else min(window - 1, max_len)
        self.k = torch.zeros(batch, n_kv_heads, kept, d_head, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.max_len = max_len
        self.length = 0

    @classmethod
    def holding(cls, k: torch.Tensor, v: torch.Tensor, length: int) -> LayerKVCache:
        """A cache without a window over the tensors of another (a compiled decode step's inputs), `length` filled."""
        cache = cls.__new__(cls)
        cache.window, cache.k, cache.v, cache.max_len, cache.length = None, k, v, k.shape[2], length
        return cache

    def room(self, new: int) -> bool:
        """Whether `new` more positions fit."""
        return self.length + new <= self.max_len

    def kept(self) -> int:
        """How many positions the cache holds now."""
        return self.length if self.window is None else min(self.length, self.window - 1)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if not self.room(k.shape[2]):
            raise UserError(f"KV cache full: {end} positions needed, {self.max_len} allocated; "
                            f"ask for fewer new tokens")
        if self.window is not None:
            k_all = torch.cat((self.k[:, :, :self.kept()], k), dim=2)
            v_all = torch.cat((self.v[:, :, :self.kept()], v), dim=2)
            keep = min(self.window - 1, k_all.shape[2])
            start = k_all.shape[2] - keep
            self.k[:, :, :keep], self.v[:, :, :keep] = k_all[:, :, start:], v_all[:, :, start:]
            self.length = end
            return k_all, v_all
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CrossKVCache:
    """Cross-attention keys/values: computed once from the encoder output, then reused."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None


class KVCache:
    """The caches of one stack for one generation run."""

    def __init__(self, cfg: ModelConfig, n_layers: int, batch: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype, cross: bool = False) -> None:
        self.layers = [LayerKVCache(batch, cfg.n_kv_heads, max_len, cfg.d_head, device, dtype,
                                    None if cross else cfg.window(i)) for i in range(n_layers)]
        self.cross = [CrossKVCache() for _ in range(n_layers)] if cross else [None] * n_layers

    @classmethod
    def holding(cls, layers: list[LayerKVCache]) -> KVCache:
        cache = cls.__new__(cls)
        cache.layers, cache.cross = layers, [None] * len(layers)
        return cache

    @property
    def length(self) -> int:
        return self.layers[0].length


# ---------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention (self or cross) with GQA/MQA, RoPE, Transformer-XL positions and a KV cache.

    Runs through scaled_dot_product_attention; set `record_weights` to take the eager path and
    keep the attention probabilities in `.weights` (for visualisation).
    """

    # F.scaled_dot_product_attention's signature; models.gemv.prepare_for_decode swaps in its decode kernel
    sdpa = staticmethod(F.scaled_dot_product_attention)
    # and, for self-attention, this: (q_proj(x), k_proj(x), v_proj(x)) in one kernel call
    fused_qkv = None

    def __init__(self, cfg: ModelConfig, cross: bool = False, scale: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        qkv_bias = cfg.projection_bias("q")
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_attn, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.d_attn, cfg.d_model, bias=cfg.projection_bias("o"))
        # QK-norm: per head, over d_head (Qwen3, Gemma 3), or over each whole projection (OLMo 2)
        self.qk_norm = cfg.qk_norm if not cross else None
        norm_dims = {"head": (cfg.d_head, cfg.d_head), "projection": (cfg.d_attn, cfg.n_kv_heads * cfg.d_head)}
        self.q_norm, self.k_norm = ((make_norm(cfg, dim) for dim in norm_dims[self.qk_norm]) if self.qk_norm
                                    else (None, None))
        self.cross = cross
        self.scale = scale if scale is not None else cfg.attention_multiplier or 1.0 / math.sqrt(cfg.d_head)
        self.dropout = cfg.dropout
        self.softcap = cfg.attention_softcap  # SDPA cannot cap scores: such a model takes the eager path
        self.xl = TransformerXLPosition(cfg) if cfg.position == "transformer_xl" and not cross else None
        self.record_weights = False
        self.weights: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], n, self.d_head).transpose(1, 2)

    def _normed(self, projected: torch.Tensor, norm: nn.Module | None, n: int) -> torch.Tensor:
        """q or k as heads, QK-normed where the config asks (before rotary)."""
        if self.qk_norm == "projection":
            projected = norm(projected)
        heads = self._heads(projected, n)
        return norm(heads) if self.qk_norm == "head" else heads

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                positions: tuple[torch.Tensor, torch.Tensor] | None = None,
                memory: torch.Tensor | None = None,
                cache: LayerKVCache | CrossKVCache | None = None) -> torch.Tensor:
        """x: (B, T, d). bias: additive (B|1, H|1, T, S) or None. memory: encoder output for cross-attention."""
        projected = self.fused_qkv(x) if self.fused_qkv is not None else None  # self-attention only
        q = self._normed(projected[0] if projected else self.q_proj(x), self.q_norm, self.n_heads)
        if self.cross and cache is not None and cache.k is not None:
            k, v = cache.k, cache.v
        else:
            source = memory if self.cross else x
            k = self._normed(projected[1] if projected else self.k_proj(source), self.k_norm, self.n_kv_heads)
            v = self._heads(projected[2] if projected else self.v_proj(source), self.n_kv_heads)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if isinstance(cache, LayerKVCache):
                k, v = cache.update(k, v)
            elif cache is not None:
                cache.k, cache.v = k, v
        if self.xl is not None:
            xl = self.xl(q, k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1), *positions)
            bias = xl * self.scale if bias is None else bias + xl * self.scale
        dropout = self.dropout if self.training else 0.0
        if self.record_weights or self.softcap is not None:
            out = self._eager(q, k, v, bias, is_causal, dropout)
        else:
            out = self.sdpa(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=is_causal, scale=self.scale,
                            enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def _eager(self, q, k, v, bias, is_causal, dropout):
        repeat = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if is_causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        if bias is not None:
            scores = scores + bias.float()
        weights = scores.softmax(-1)
        if self.record_weights:
            self.weights = weights.detach()
        return F.dropout(weights, dropout).to(v.dtype) @ v


# ---------------------------------------------------------------- block and stack


class Block(nn.Module):
    """One layer: self-attention, optional cross-attention, feed-forward, each with a residual.

    Pre-norm (GPT-2, T5), post-norm (BERT), output-norm (OLMo 2: x + n(attn(x))), sandwich (Gemma:
    x + n2(attn(n1(x)))) or parallel (GPT-J, PaLM: x + attn(n(x)) + ff(n(x))).
    """

    def __init__(self, cfg: ModelConfig, cross: bool = False, attn_scale: float | None = None) -> None:
        super().__init__()
        self.norm_position = cfg.norm_position
        self.parallel = cfg.parallel_block
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, scale=attn_scale)
        self.cross_norm = make_norm(cfg) if cross else None
        self.cross_attn = Attention(cfg, cross=True, scale=attn_scale) if cross else None
        self.ff_norm = None if self.parallel else make_norm(cfg)
        self.ff = MixtureOfExperts(cfg) if cfg.n_experts else FeedForward(cfg)
        sandwich = cfg.norm_position == "sandwich"  # Gemma: each sublayer's output normed too, before the add
        self.attn_post_norm = make_norm(cfg) if sandwich else None
        self.ff_post_norm = make_norm(cfg) if sandwich else None
        self.drop = nn.Dropout(cfg.dropout)
        self.residual = cfg.residual_multiplier

    def forward(self, x, bias, is_causal, rope, positions, memory=None, memory_bias=None,
                cache=None, cross_cache=None):
        def attend(h):
            return self.attn(h, bias, is_causal, rope, positions, cache=cache)

        def cross_attend(h):
            return self.cross_attn(h, memory_bias, memory=memory, cache=cross_cache)

        def residual(out):  # what a sublayer adds to the stream: dropped out, scaled (Granite)
            out = self.drop(out)
            return out * self.residual if self.residual != 1.0 else out

        if self.parallel:
            h = self.attn_norm(x)
            return x + residual(attend(h)) + residual(self.ff(h))
        if self.norm_position == "sandwich":
            x = x + residual(self.attn_post_norm(attend(self.attn_norm(x))))
            return x + residual(self.ff_post_norm(self.ff(self.ff_norm(x))))
        if self.norm_position == "output":
            x = x + residual(self.attn_norm(attend(x)))
            return x + residual(self.ff_norm(self.ff(x)))
        if self.norm_position == "post":
            x = self.attn_norm(x + residual(attend(x)))
            if self.cross_attn is not None:
                x = self.cross_norm(x + residual(cross_attend(x)))
            return self.ff_norm(x + residual(self.ff(x)))
        x = x + residual(attend(self.attn_norm(x)))
        if self.cross_attn is not None:
            x = x + residual(cross_attend(self.cross_norm(x)))
        return x + residual(self.ff(self.ff_norm(x)))


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> additive bias: 0 where allowed, the dtype's most negative value elsewhere.

    A finite minimum (not -inf) keeps fully masked rows (left padding) free of NaN.
    """
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class TransformerStack(nn.Module):
    """Positions, the blocks and the final norm: everything the three families share.

    Takes embedded tokens, returns final hidden states. Builds one attention bias per call and window (causal +
    padding + relative position bias, + the window for sliding layers) and one set of rotary angles per base, and
    hands each block its own.
    """

    def __init__(self, cfg: ModelConfig, n_layers: int, causal: bool, cross: bool = False,
                 attn_scale: float | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.rel_bias = RelativePositionBias(cfg, bidirectional=not causal) if cfg.position == "relative" else None
        self.emb_norm = make_norm(cfg) if cfg.norm_position == "post" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cross, attn_scale) for _ in range(n_layers))
        self.final_norm = None if cfg.norm_position == "post" else make_norm(cfg)
        # Gemma 3's sliding layers rotate with their own base, unscaled
        self.local_rope = (dataclasses.replace(cfg, rope_base=cfg.rope_local_base, rope_scaling=None)
                           if cfg.rope_local_base is not None and cfg.position == "rope" else None)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        batch, length = x.shape[:2]
        offset = cache.length if cache is not None else 0
        cfg = self.cfg
        if not self.positions_fit(offset + length):
            raise UserError(f"sequence of {offset + length} tokens is longer than the model's "
                            f"max_seq_len ({cfg.max_seq_len}); shorten the input")
        seq_pos = torch.arange(offset, offset + length, device=x.device)
        if position_ids is None:
            position_ids = seq_pos[None].expand(batch, -1)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_table(position_ids, cfg.d_model).to(x.dtype)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)

        key_pos = torch.arange(offset + length, device=x.device)
        rope = rope_cos_sin(position_ids, cfg) if cfg.position == "rope" else None
        local_rope = rope_cos_sin(position_ids, self.local_rope) if self.local_rope is not None else rope
        positions = (seq_pos, key_pos) if cfg.position == "transformer_xl" else None
        masks = {None: self._attention_bias(seq_pos, key_pos, attention_mask, x.dtype)}
        memory_bias = None if memory_mask is None else additive_bias(memory_mask[:, None, None, :] != 0, x.dtype)

        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            cross_cache = cache.cross[i] if cache is not None else None
            window = cfg.window(i) if self.causal else None
            if window not in masks:  # a sliding layer: its cache holds only the window before these positions
                held = min(offset, window - 1) if cache is not None else offset
                local_keys = torch.arange(offset - held, offset + length, device=x.device)
                masks[window] = self._attention_bias(seq_pos, local_keys, attention_mask, x.dtype, window)
            bias, is_causal = masks[window]
            layer_rope = local_rope if window is not None else rope  # Gemma 3: its own base on local layers
            if cfg.nope_layers and i in cfg.nope_layers:  # NoPE layers: no positions
                layer_rope = None
            args = (x, bias, is_causal, layer_rope, positions, memory, memory_bias, layer_cache, cross_cache)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return self.final_norm(x) if self.final_norm is not None else x

    def positions_fit(self, end: int) -> bool:
        """Whether positions up to `end` have embeddings (learned and sinusoidal ones stop at max_seq_len)."""
        return self.cfg.position not in ("learned", "sinusoidal") or end <= self.cfg.max_seq_len

    def _attention_bias(self, q_pos, k_pos, attention_mask, dtype, window: int | None = None):
        """One additive bias for all layers (of a window), or None with is_causal=True where SDPA can mask by
        itself. A window lets a query see the keys at most window - 1 positions back (k > q - window), counted
        in cache slots as transformers counts them (left padding included)."""
        window = window if window is not None and int(q_pos[-1] - k_pos[0]) >= window else None  # else all fit
        needs_bias = (attention_mask is not None or self.rel_bias is not None or window is not None
                      or self.cfg.position == "transformer_xl")
        causal_rows = True if self.causal and len(q_pos) > 1 else False  # a bool, not a traced one (torch.compile)
        if not needs_bias and (not causal_rows or len(q_pos) == len(k_pos)):
            return None, causal_rows
        allowed = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
        if self.causal:
            allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, k_pos][:, None, None, :] != 0)
        bias = additive_bias(allowed, dtype)
        if self.rel_bias is not None:
            bias = (bias + self.rel_bias(q_pos, k_pos).to(dtype)).clamp(min=torch.finfo(dtype).min)
        return bias, False
