"""Autoregressive decoding for GPT and T5, with or without the KV cache.

Greedy (temperature 0), temperature, top-k and top-p sampling; a seeded generator makes
sampling reproducible. GPT batches are left-padded: position ids skip the padding.
"""

from __future__ import annotations

from typing import Callable

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_id: int | None = None, pad_id: int = 0, seed: int | None = None, use_cache: bool = True,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Generate up to max_new_tokens per row; returns (B, n) new ids (pad after a row's eos)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    step = _t5_steps if model.config.family == "t5" else _gpt_steps
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    logits_iter = step(model, input_ids, attention_mask, max_new_tokens, use_cache, pad_id)
    logits = next(logits_iter)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        token = token.masked_fill(finished, pad_id)
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
        if eos_id is not None:
            finished |= token == eos_id
        if finished.all() or len(new_tokens) == max_new_tokens:
            break
        logits = logits_iter.send(token)
    return torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_zeros(batch, 0)


def _gpt_steps(model, input_ids, attention_mask, max_new_tokens, use_cache, pad_id):
    """Yields next-token logits; receives each chosen token."""
    mask = attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if use_cache:
        cache = model.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        logits = model(input_ids, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]
        while True:
            token = yield logits
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits = model(token[:, None], attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]
    ids = input_ids
    while True:
        token = yield model(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)


def _t5_steps(model, input_ids, attention_mask, max_new_tokens, use_cache, pad_id):
    """T5: encode once; the decoder starts from the pad id (T5's decoder start token)."""
    memory = model.encode(input_ids, attention_mask)
    decoded = input_ids.new_full((input_ids.shape[0], 1), pad_id)
    cache = model.new_cache(input_ids.shape[0], max_new_tokens + 1) if use_cache else None
    step_input = decoded
    while True:
        logits = model(attention_mask=attention_mask, decoder_input_ids=step_input, encoder_hidden_states=memory,
                       cache=cache).logits[:, -1]
        token = yield logits
        decoded = torch.cat([decoded, token[:, None]], dim=1)
        step_input = token[:, None] if use_cache else decoded


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 64, **sampling) -> str:
    """Text in, completion text out (one prompt). GPT gets the prompt as context, T5 as encoder input."""
    from llmcli.tokenizer import special_ids

    special = special_ids(tokenizer)
    ids = tokenizer.encode(prompt, add_special_tokens=model.config.family == "t5").ids
    device = next(model.parameters()).device
    new = generate_ids(model, torch.tensor([ids], device=device), max_new_tokens, eos_id=special.eos,
                       pad_id=special.pad, **sampling)
    return tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
