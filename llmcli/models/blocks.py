"""The shared blocks every family is built from: norms, feed-forward, positions,
attention (with its KV cache), the transformer block and the stack of blocks.

Read top to bottom: each piece uses only what stands above it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from llmcli.config import ModelConfig
from llmcli.errors import UserError

# ---------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): no mean subtraction, no bias; stats in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


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

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        bias = cfg.projection_bias("up")
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias) if cfg.activation in ("swiglu", "geglu") else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


# ---------------------------------------------------------------- positions


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                         * (-math.log(10000.0) / dim))
    angles = positions.float()[..., None] * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def rope_cos_sin(positions: torch.Tensor, d_head: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding angles (Su et al. 2021), half-split layout as in GPT-NeoX and LLaMA.

    positions: (B, T) -> cos, sin of shape (B, 1, T, d_head).
    """
    inv_freq = 1.0 / base ** (torch.arange(0, d_head, 2, device=positions.device, dtype=torch.float32) / d_head)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucketing of key-minus-query distances (Raffel et al. 2020, sec. 2.1).

    Half the buckets are exact small distances, the rest grow logarithmically up to
    max_distance; bidirectional splits the buckets between the two directions.
    """
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head) added to attention scores; one per stack, shared by its layers."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_buckets
        self.max_distance = cfg.relative_max_distance
        self.embedding = nn.Embedding(cfg.relative_buckets, cfg.n_heads)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(Tq,), (Tk,) -> (1, H, Tq, Tk)."""
        buckets = relative_position_bucket(k_pos[None, :] - q_pos[:, None], self.bidirectional,
                                           self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1)[None]


class TransformerXLPosition(nn.Module):
    """Relative attention of Dai et al. 2019 (Transformer-XL, used by Gopher), eq. 3 terms (b)-(d):

    scores += q.W_R.R(i-j) + u.k_j + v.W_R.R(i-j), with sinusoidal R and learned u, v per head.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.r_proj = nn.Linear(cfg.d_model, cfg.d_attn, bias=False)
        self.u = nn.Parameter(torch.zeros(cfg.n_heads, cfg.d_head))
        self.v = nn.Parameter(torch.zeros(cfg.n_heads, cfg.d_head))

    def forward(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q: (B, H, Tq, dh), k: (B, H, Tk, dh) -> unscaled score terms (B, H, Tq, Tk)."""
        distance = q_pos[:, None] - k_pos[None, :]
        lo = int(distance.min())
        table = sinusoidal_table(torch.arange(lo, int(distance.max()) + 1, device=q.device), self.d_model)
        r = self.r_proj(table.to(q.dtype)).view(-1, self.n_heads, self.d_head).transpose(0, 1)  # (H, R, dh)
        pos_scores = torch.einsum("bhqd,hrd->bhqr", q + self.v[:, None].to(q.dtype), r)
        index = (distance - lo).expand(q.shape[0], self.n_heads, -1, -1)
        content_bias = torch.einsum("hd,bhkd->bhk", self.u.to(q.dtype), k)[:, :, None, :]
        return pos_scores.gather(-1, index) + content_bias


# ---------------------------------------------------------------- KV cache


class LayerKVCache:
    """Preallocated keys and values of one self-attention layer: (B, n_kv_heads, max_len, d_head)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, d_head: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.k = torch.zeros(batch, n_kv_heads, max_len, d_head, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise UserError(f"KV cache full: {end} positions needed, {self.k.shape[2]} allocated; "
                            f"ask for fewer new tokens")
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
        self.layers = [LayerKVCache(batch, cfg.n_kv_heads, max_len, cfg.d_head, device, dtype)
                       for _ in range(n_layers)]
        self.cross = [CrossKVCache() for _ in range(n_layers)] if cross else [None] * n_layers

    @property
    def length(self) -> int:
        return self.layers[0].length


# ---------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention (self or cross) with GQA/MQA, RoPE, Transformer-XL positions and a KV cache.

    Runs through scaled_dot_product_attention; set `record_weights` to take the eager path and
    keep the attention probabilities in `.weights` (for visualisation).
    """

    def __init__(self, cfg: ModelConfig, cross: bool = False, scale: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        qkv_bias = cfg.projection_bias("q")
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_attn, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.d_attn, cfg.d_model, bias=cfg.projection_bias("o"))
        self.cross = cross
        self.scale = scale if scale is not None else 1.0 / math.sqrt(cfg.d_head)
        self.dropout = cfg.dropout
        self.xl = TransformerXLPosition(cfg) if cfg.position == "transformer_xl" and not cross else None
        self.record_weights = False
        self.weights: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], n, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                positions: tuple[torch.Tensor, torch.Tensor] | None = None,
                memory: torch.Tensor | None = None,
                cache: LayerKVCache | CrossKVCache | None = None) -> torch.Tensor:
        """x: (B, T, d). bias: additive (B|1, H|1, T, S) or None. memory: encoder output for cross-attention."""
        q = self._heads(self.q_proj(x), self.n_heads)
        if self.cross and cache is not None and cache.k is not None:
            k, v = cache.k, cache.v
        else:
            source = memory if self.cross else x
            k = self._heads(self.k_proj(source), self.n_kv_heads)
            v = self._heads(self.v_proj(source), self.n_kv_heads)
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
        if self.record_weights:
            out = self._eager(q, k, v, bias, is_causal, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=is_causal,
                                                 scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def _eager(self, q, k, v, bias, is_causal, dropout):
        repeat = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() * self.scale
        if is_causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        if bias is not None:
            scores = scores + bias.float()
        weights = scores.softmax(-1)
        self.weights = weights.detach()
        return F.dropout(weights, dropout).to(v.dtype) @ v


# ---------------------------------------------------------------- block and stack


class Block(nn.Module):
    """One layer: self-attention, optional cross-attention, feed-forward, each with a residual.

    Pre-norm (GPT-2, T5), post-norm (BERT) or parallel (GPT-J, PaLM: x + attn(n(x)) + ff(n(x))).
    """

    def __init__(self, cfg: ModelConfig, cross: bool = False, attn_scale: float | None = None) -> None:
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.parallel = cfg.parallel_block
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, scale=attn_scale)
        self.cross_norm = make_norm(cfg) if cross else None
        self.cross_attn = Attention(cfg, cross=True, scale=attn_scale) if cross else None
        self.ff_norm = None if self.parallel else make_norm(cfg)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, bias, is_causal, rope, positions, memory=None, memory_bias=None,
                cache=None, cross_cache=None):
        def attend(h):
            return self.drop(self.attn(h, bias, is_causal, rope, positions, cache=cache))

        def cross_attend(h):
            return self.drop(self.cross_attn(h, memory_bias, memory=memory, cache=cross_cache))

        if self.parallel:
            h = self.attn_norm(x)
            return x + attend(h) + self.drop(self.ff(h))
        if self.post_norm:
            x = self.attn_norm(x + attend(x))
            if self.cross_attn is not None:
                x = self.cross_norm(x + cross_attend(x))
            return self.ff_norm(x + self.drop(self.ff(x)))
        x = x + attend(self.attn_norm(x))
        if self.cross_attn is not None:
            x = x + cross_attend(self.cross_norm(x))
        return x + self.drop(self.ff(self.ff_norm(x)))


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> additive bias: 0 where allowed, the dtype's most negative value elsewhere.

    A finite minimum (not -inf) keeps fully masked rows (left padding) free of NaN.
    """
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class TransformerStack(nn.Module):
    """Positions, the blocks and the final norm: everything the three families share.

    Takes embedded tokens, returns final hidden states. Builds one attention bias per call
    (causal + padding + relative position bias) and hands it to every block.
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
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        batch, length = x.shape[:2]
        offset = cache.length if cache is not None else 0
        cfg = self.cfg
        if cfg.position in ("learned", "sinusoidal") and offset + length > cfg.max_seq_len:
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
        rope = rope_cos_sin(position_ids, cfg.d_head, cfg.rope_base) if cfg.position == "rope" else None
        positions = (seq_pos, key_pos) if cfg.position == "transformer_xl" else None
        bias, is_causal = self._attention_bias(seq_pos, key_pos, attention_mask, x.dtype)
        memory_bias = None if memory_mask is None else additive_bias(memory_mask[:, None, None, :] != 0, x.dtype)

        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            cross_cache = cache.cross[i] if cache is not None else None
            args = (x, bias, is_causal, rope, positions, memory, memory_bias, layer_cache, cross_cache)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return self.final_norm(x) if self.final_norm is not None else x

    def _attention_bias(self, q_pos, k_pos, attention_mask, dtype):
        """One additive bias for all layers, or None with is_causal=True where SDPA can mask by itself."""
        needs_bias = (attention_mask is not None or self.rel_bias is not None
                      or self.cfg.position == "transformer_xl")
        causal_rows = self.causal and len(q_pos) > 1
        if not needs_bias and (not causal_rows or len(q_pos) == len(k_pos)):
            return None, causal_rows
        allowed = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
        if self.causal:
            allowed = k_pos[None, :] <= q_pos[:, None]
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, None, :] != 0)
        bias = additive_bias(allowed, dtype)
        if self.rel_bias is not None:
            bias = (bias + self.rel_bias(q_pos, k_pos).to(dtype)).clamp(min=torch.finfo(dtype).min)
        return bias, False
