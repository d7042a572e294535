"""Autoregressive decoding for GPT and T5, with or without the KV cache.

Greedy (temperature 0), temperature, top-k and top-p sampling; a seeded generator makes
sampling reproducible. GPT batches are left-padded: position ids skip the padding.
`generate_text` is the text-in, text-out layer over `generate_ids` that `llmcli generate` calls.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from llmcli.errors import UserError
from llmcli.finetune.saving import load_finetuned
from llmcli.model_dir import load_tokenizer
from llmcli.models.base import LanguageModel
from llmcli.models import gemv
from llmcli.models.quantized import QuantizedLinear
from llmcli.runtime import resolve_device, torch_dtype
from llmcli.tokenizer import encode_texts, special_ids


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy."""
    if temperature == 0:
        return gemv.argmax(logits)
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
                 eos_id: int | list[int] | None = None, pad_id: int = 0, seed: int | None = None,
                 use_cache: bool = True, on_token: Callable[[torch.Tensor], None] | None = None,
                 finished_by: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Generate up to max_new_tokens per row; returns (B, n) new ids (pad after a row's end).

    eos_id: the id, or ids, that end a row. finished_by(token) -> (B,) bool: rows the caller ends after this token
    (a stop string)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    step = _t5_steps if model.config.family == "t5" else _gpt_steps
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    ends = torch.tensor([eos_id] if isinstance(eos_id, int) else eos_id or [], dtype=torch.long,
                        device=input_ids.device)
    logits_iter = step(model, input_ids, attention_mask, max_new_tokens, use_cache, pad_id)
    logits = next(logits_iter)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        token = token.masked_fill(finished, pad_id)
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
        finished |= torch.isin(token, ends)
        if finished_by is not None:
            finished |= finished_by(token)
        if finished.all() or len(new_tokens) == max_new_tokens:
            break
        logits = logits_iter.send(token)
    return torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_zeros(batch, 0)


def _gpt_steps(model, input_ids, attention_mask, max_new_tokens, use_cache, pad_id):
    """Yields next-token logits; receives each chosen token.

    Without padding the mask and position ids say nothing the model does not assume anyway:
    leaving them out spares a bias tensor per step and lets SDPA run unmasked.
    """
    mask = None if bool(attention_mask.all()) else attention_mask
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    if use_cache:
        cache = model.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        logits = model(input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                       last_only=True).logits[:, -1]
        while True:
            token = yield logits
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                positions = positions[:, -1:] + 1
            logits = (model.decode_forward or model)(token[:, None], attention_mask=mask, position_ids=positions,
                                                     cache=cache).logits[:, -1]
    ids = input_ids
    while True:
        token = yield model(ids, attention_mask=mask, position_ids=positions, last_only=True).logits[:, -1]
        ids = torch.cat([ids, token[:, None]], dim=1)
        if mask is not None:
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
    return generate_text(model, tokenizer, [prompt], max_new_tokens, **sampling)[0].completion


# ---------------------------------------------------------------- text in, text out


def load_for_inference(ref: str | os.PathLike, device: str = "auto", precision: str = "fp32"):
    """A model directory's model (eval mode, on `device`) and tokenizer, checked against each other. precision
    bf16 runs a float model in bf16 (a quantized one keeps its integers and computes in bf16 already)."""
    tokenizer = load_tokenizer(ref)  # first: a missing tokenizer.json fails before the weights are read
    model = load_finetuned(ref, device=str(resolve_device(device)))  # a fine-tuning run: base + its adapter
    if precision != "fp32" and not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        model.to(torch_dtype(precision))
    if next(model.parameters()).device.type == "cpu":
        gemv.prepare_for_decode(model)  # our single-row kernels, or the order torch's read fastest
    if not isinstance(model, LanguageModel):
        raise UserError(f"{ref}: a prompt-tuned or classification run has no plain language-model output to "
                        f"generate from; use `llmcli finetune` with --method lora, adapter or full and --task "
                        f"lm or instruct")
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise UserError(f"{ref}: tokenizer has {tokenizer.get_vocab_size()} tokens, the model only "
                        f"{model.config.vocab_size}; the directory mixes files from different models")
    return model, tokenizer


def pad_batch(rows: list[list[int]], pad_id: int, left: bool,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention_mask), padded on the left (GPT generation) or the right."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def check_context(config, lengths: list[int], max_new_tokens: int, what: str = "prompt") -> None:
    """Learned and sinusoidal positions end at max_seq_len; RoPE and relative positions have no hard end."""
    if config.position not in ("learned", "sinusoidal"):
        return
    limit = config.max_seq_len
    for i, n in enumerate(lengths, 1):
        name = f"{what} {i}" if len(lengths) > 1 else what
        if config.family == "gpt" and n + max_new_tokens > limit:
            fix = (f"use --max-new-tokens {limit - n} or less, or a shorter {what}" if n < limit
                   else f"the {what} alone fills the context: shorten it to fewer than {limit} tokens")
            raise UserError(f"{name} is {n} tokens and --max-new-tokens is {max_new_tokens}: {n + max_new_tokens} "
                            f"positions, more than {config.name}'s context (max_seq_len {limit}); {fix}")
        if config.family != "gpt" and n > limit:
            raise UserError(f"{name} is {n} tokens, more than {config.name}'s context (max_seq_len {limit}); "
                            f"shorten it to {limit} tokens or fewer")
    if config.family == "t5" and max_new_tokens > limit:
        raise UserError(f"--max-new-tokens {max_new_tokens} is more than {config.name}'s decoder context "
                        f"(max_seq_len {limit}); use --max-new-tokens {limit} or less")


class TextStreamer:
    """Turns token ids into text as they arrive, for printing while the model generates.

    Decodes everything so far and emits what is new, because a byte-level BPE token may hold
    part of a UTF-8 character: text that ends in U+FFFD waits for the rest of its bytes. With stop
    strings, text that may be the start of one waits too, and nothing from a stop string on is emitted.
    """

    def __init__(self, tokenizer, emit: Callable[[str], None], stops: list[str] | tuple = ()) -> None:
        self.tokenizer = tokenizer
        self.emit = emit
        self.stops = stops
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            cut = before_stop(text, self.stops)
            held = 0 if cut < len(text) else max((n for stop in self.stops for n in range(1, len(stop))
                                                  if text.endswith(stop[:n])), default=0)
            self._emit(text[:cut - held])

    def flush(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._emit(text[:before_stop(text, self.stops)])

    def _emit(self, text: str) -> None:
        if len(text) > self.printed:
            self.emit(text[self.printed:])
            self.printed = len(text)


def before_stop(text: str, stops) -> int:
    """Where the first stop string in `text` starts (its length when there is none)."""
    return min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))


@dataclass
class Generation:
    """One generated sequence: the JSON object of `llmcli generate --json`."""

    prompt: str
    sample: int  # 0 .. num_samples-1
    text: str  # prompt and completion
    completion: str  # up to a stop string (not included)
    tokens: list[int]  # the generated ids, up to and including the one that ended the sequence
    prompt_text: str  # what the model was fed, as text (a chat template's rendering of the messages)
    prompt_ids: list[int]  # and as ids
    prompt_tokens: int
    new_tokens: int
    time: float  # seconds for the batch this sequence was generated in, prefill included
    tokens_per_s: float  # new_tokens / time: the rate at which this sequence came out

    def to_dict(self) -> dict:
        return asdict(self)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   num_samples: int) -> None:
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if temperature < 0:
        raise UserError(f"--temperature {temperature} must be 0 (greedy) or more")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k {top_k} must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p} must be in (0, 1]")
    if num_samples < 1:
        raise UserError(f"--num-samples {num_samples} must be at least 1")


def require_family(model, families: tuple[str, ...], command: str, hint: str) -> None:
    family = model.config.family
    if family not in families:
        wanted = " or ".join(f.upper() for f in families)
        raise UserError(f"{model.config.name} is a {family.upper()} model and {command} needs a {wanted} model; "
                        f"{hint}")


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  num_samples: int = 1, use_cache: bool = True, on_text: Callable[[str], None] | None = None,
                  on_step: Callable[[], None] | None = None, stop: list[str] | tuple = (),
                  prompt_ids: list[list[int]] | None = None, echo_prompt: bool = True) -> list[Generation]:
    """Complete every prompt num_samples times in one batch (GPT left-padded, T5 right-padded).

    Rows are prompt-major: prompt 1 samples 1..n, then prompt 2. on_text receives the `text` of the
    result piece by piece, the prompt first (unless not echo_prompt), then the completion as it is generated
    (one sequence only); on_step is called once per decoding step. A sequence ends at any of the model's end
    ids or at any `stop` string. prompt_ids: the prompts already as ids (a rendered chat), fed as they are.
    """
    require_family(model, ("gpt", "t5"), "generate", "use `llmcli fill-mask` or `llmcli embed` on BERT models")
    check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples)
    if not prompts:
        raise UserError("no prompt given; pass --prompt TEXT (once per prompt)")
    for i, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            name = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            raise UserError(f"{name} is empty; pass the text to continue, e.g. --prompt 'Once upon a time'")
    if any(not text for text in stop):
        raise UserError("--stop needs a non-empty text")
    family = model.config.family
    special = special_ids(tokenizer, model.config)
    # The tokenizer's post-processor: T5 inputs end with </s>, and a converted Llama-style checkpoint (it names its
    # BOS) starts prompts with <s> as its tokenizer says; other GPT prompts are continued as they are.
    bos_first = family == "gpt" and model.config.bos_token_id is not None
    encoded = prompt_ids or encode_texts(tokenizer, prompts, add_special_tokens=family == "t5" or bos_first)
    check_context(model.config, [len(ids) for ids in encoded], max_new_tokens)
    rows = [ids for ids in encoded for _ in range(num_samples)]
    if on_text is not None and len(rows) != 1:
        raise ValueError("streaming (on_text) needs exactly one prompt and one sample")
    device = next(model.parameters()).device
    input_ids, mask = pad_batch(rows, special.pad, left=family == "gpt", device=device)
    separator = " " if family == "t5" else ""  # a T5 output is a new sequence, not a continuation
    streamer = None
    if on_text is not None:
        if echo_prompt:
            on_text(prompts[0] + separator)
        streamer = TextStreamer(tokenizer, on_text, stop)
    generated: list[list[int]] = [[] for _ in rows]
    stopped_at: list[int | None] = [None] * len(rows)  # how many tokens it took to complete a stop string

    def finished_by(token: torch.Tensor) -> torch.Tensor:
        for row, t in enumerate(token.tolist()):
            generated[row].append(t)
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            if stopped_at[row] is None and before_stop(text, stop) < len(text):
                stopped_at[row] = len(generated[row])
        return torch.tensor([at is not None for at in stopped_at], device=token.device)

    def on_token(token: torch.Tensor) -> None:
        if streamer is not None:
            streamer.push(int(token[0]))
        if on_step is not None:
            on_step()

    start = time.perf_counter()
    new = generate_ids(model, input_ids, max_new_tokens, attention_mask=mask, temperature=temperature,
                       top_k=top_k, top_p=top_p, eos_id=special.ends(), pad_id=special.pad, seed=seed,
                       use_cache=use_cache, on_token=on_token, finished_by=finished_by if stop else None).tolist()
    elapsed = time.perf_counter() - start
    if streamer is not None:
        streamer.flush()

    results = []
    for row, tokens in enumerate(new):
        prompt = prompts[row // num_samples]
        tokens = _until_end(tokens, special.ends(), stopped_at[row])
        completion = tokenizer.decode(tokens, skip_special_tokens=True)
        completion = completion[:before_stop(completion, stop)]
        results.append(Generation(prompt=prompt, sample=row % num_samples, text=prompt + separator + completion,
                                  completion=completion, tokens=tokens,
                                  prompt_text=prompt if prompt_ids else tokenizer.decode(rows[row],
                                                                                         skip_special_tokens=False),
                                  prompt_ids=rows[row], prompt_tokens=len(rows[row]), new_tokens=len(tokens),
                                  time=elapsed, tokens_per_s=len(tokens) / elapsed))
    return results


def _until_end(tokens: list[int], ends: list[int], stopped_at: int | None) -> list[int]:
    """Drop the padding generate_ids puts after a row's end (keeping the token that ended it)."""
    return tokens[:min([tokens.index(i) + 1 for i in ends if i in tokens] + [stopped_at or len(tokens)])]
