"""Where a token is: sinusoidal tables, rotary embeddings (with their context-extension scalings), T5's bucketed
relative bias and Transformer-XL's relative attention terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from llmcli.config import ModelConfig


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                         * (-math.log(10000.0) / dim))
    angles = positions.float()[..., None] * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def rotary_dim(cfg: ModelConfig) -> int:
    """How many of each head's dimensions rotate (all, or the leading `rotary_fraction` of them: Phi-4-mini)."""
    return int(cfg.d_head * cfg.rotary_fraction)


def rope_frequencies(cfg: ModelConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """The inverse frequencies of the rotating dimensions and the factor cos and sin are scaled by, for a call
    whose furthest position is seq_len - 1. Each scaling as transformers computes it (modeling_rope_utils.py):

    - linear (Chen et al. 2023): every frequency / factor.
    - dynamic (NTK-aware): past the context, the base grows with the length: base · (f·L/L0 - (f-1))^(d/(d-2)).
    - llama3: long wavelengths (> L0 / low_freq_factor) / factor, short ones (< L0 / high_freq_factor) kept, a
      smooth blend between.
    - yarn (Peng et al. 2023): interpolated and original frequencies blended by a ramp over the dimensions that
      turn beta_slow..beta_fast times within L0; cos and sin scaled by 0.1·ln(factor) + 1.
    - longrope (Phi-3): per-dimension divisors, the short set up to L0 and the long one past it; cos and sin
      scaled by sqrt(1 + ln(factor) / ln(L0)).
    """
    dim, base = rotary_dim(cfg), cfg.rope_base
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("type")
    if kind == "dynamic":
        length = torch.tensor(max(seq_len, cfg.max_seq_len))  # float32 arithmetic, as transformers does it
        base = base * ((scaling["factor"] * length / cfg.max_seq_len) - (scaling["factor"] - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** exponents
    if kind is None or kind == "dynamic":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    original = scaling["original_max_seq_len"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < original / high) * ~(wavelength > original / low)
        return torch.where(medium, blended, scaled), 1.0
    factor = scaling.get("factor") or cfg.max_seq_len / original
    if kind == "yarn":
        attention = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        low, high = (dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_base))
                     for turns in (scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1))
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
        return inv_freq / factor * ramp + inv_freq * (1 - ramp), attention
    # longrope
    attention = scaling.get("attention_factor") or (
        math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)
    divisors = torch.tensor(scaling["long_factor" if seq_len > original else "short_factor"], dtype=torch.float32)
    return 1.0 / (divisors * cfg.rope_base ** exponents), attention


def rope_cos_sin(positions: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding angles (Su et al. 2021), half-split layout as in GPT-NeoX and LLaMA.

    positions: (B, T) -> cos, sin of shape (B, 1, T, rotary_dim), in fp32.
    """
    scaling = cfg.rope_scaling or {}
    varies = scaling.get("type") in ("dynamic", "longrope")  # frequencies that depend on the furthest position
    inv_freq, attention = rope_frequencies(cfg, int(positions.max()) + 1 if varies else 0)
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos() * attention, angles.sin() * attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading cos.shape[-1] dimensions of each head; the rest pass unchanged."""
    rotating, passing = x[..., :cos.shape[-1]], x[..., cos.shape[-1]:]
    x1, x2 = rotating.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = (rotating.float() * cos + rotated.float() * sin).to(x.dtype)
    if not passing.shape[-1]:
        return out
    whole = torch.empty_like(x)  # x's layout (torch.cat's would not be), so attention's output reshapes as a view
    whole[..., :cos.shape[-1]], whole[..., cos.shape[-1]:] = out, passing
    return whole


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


