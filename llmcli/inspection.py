"""Looking inside a model: BERT's masked-token predictions, sentence embeddings, attention maps, a mixture of
experts' routing.

Each function takes a loaded model and tokenizer and returns plain data; `llmcli fill-mask`,
`llmcli embed`, `llmcli attention` and `llmcli experts` render it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from llmcli.charts import write_png
from llmcli.errors import UserError
from llmcli.generation import check_context, generate_ids, pad_batch, require_family
from llmcli.models.blocks import MixtureOfExperts
from llmcli.tokenizer import encode_texts, special_ids

ATTENTION_KINDS = ("self", "decoder-self", "cross")
TARGET_TOKENS = 24  # greedy decoder tokens drawn for T5 decoder maps without --target: a readable heatmap


def _encode_checked(model, tokenizer, texts: list[str], what: str) -> list[list[int]]:
    """Ids with the family's special tokens (BERT [CLS] ... [SEP], T5 ... </s>, none for GPT)."""
    for i, text in enumerate(texts, 1):
        if not text.strip():
            name = f"{what} {i}" if len(texts) > 1 else what
            raise UserError(f"{name} is empty; pass some text")
    rows = encode_texts(tokenizer, texts, add_special_tokens=model.config.family != "gpt")
    check_context(model.config, [len(ids) for ids in rows], 0, what)
    return rows


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- fill-mask


@dataclass
class Candidate:
    token: str
    id: int
    probability: float


@dataclass
class MaskPrediction:
    """The top-k fillers of one [MASK], most probable first."""

    position: int  # token index in the encoded text ([CLS] is 0)
    candidates: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"position": self.position,
                "candidates": [vars(c) for c in self.candidates]}


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[MaskPrediction]:
    """The top_k most probable tokens for each mask token in `text` (BERT's masked-LM head)."""
    require_family(model, ("bert",), "fill-mask", "fill-mask predicts masked tokens with a BERT (masked LM); "
                                                  "use `llmcli generate` for GPT and T5")
    if top_k < 1:
        raise UserError(f"--top-k {top_k} must be at least 1")
    mask_id = special_ids(tokenizer).mask
    if mask_id is None:
        raise UserError(f"{model.config.name}'s tokenizer has no mask token; fill-mask needs a BERT (WordPiece) "
                        f"tokenizer with [MASK]: train one with `llmcli tokenizer train --kind wordpiece`")
    mask_token = tokenizer.id_to_token(mask_id)
    ids = _encode_checked(model, tokenizer, [text], "the text")[0]
    positions = [i for i, token in enumerate(ids) if token == mask_id]
    if not positions:
        raise UserError(f"no {mask_token} in the text {text!r}; put {mask_token} where a word is to be filled in, "
                        f"e.g. 'The {mask_token} sat on the mat.'")
    logits = model(torch.tensor([ids], device=_device(model))).logits[0, positions]
    # Only ids the tokenizer can spell: a model's vocabulary may be padded beyond the tokenizer's.
    probs = logits[:, :tokenizer.get_vocab_size()].float().softmax(-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [MaskPrediction(position, [Candidate(_label(tokenizer, i), i, p)
                                      for p, i in zip(values.tolist(), indices.tolist())])
            for position, values, indices in zip(positions, top.values, top.indices)]


# ---------------------------------------------------------------- embeddings


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average over the non-padding tokens (sentence-transformers' mean pooling): (B, T, d) -> (B, d)."""
    mask = attention_mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """L2-normalised mean-pooled final hidden states (the encoder's for T5), one row per text, in fp32.

    Texts are right-padded into one batch; the attention mask keeps padding out of every token's
    context (and a causal GPT never sees what comes after it), so a text's embedding does not
    depend on the batch it is in.
    """
    if not texts:
        raise UserError("no text given; pass one or more TEXT arguments")
    rows = _encode_checked(model, tokenizer, texts, "text")
    ids, mask = pad_batch(rows, special_ids(tokenizer).pad, left=False, device=_device(model))
    if model.config.family == "t5":
        hidden = model.encode(ids, mask)
    else:
        hidden = model(ids, attention_mask=mask).hidden_states
    return F.normalize(mean_pool(hidden.float(), mask), dim=-1)


def cosine_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of L2-normalised rows."""
    return embeddings @ embeddings.T


# ---------------------------------------------------------------- attention maps


@dataclass
class AttentionMap:
    """Attention probabilities of one layer: rows are queries (the attending tokens), columns keys."""

    weights: torch.Tensor  # (queries, keys), each row sums to 1
    queries: list[str]
    keys: list[str]
    kind: str  # self, decoder-self or cross
    stack: str  # encoder or decoder
    layer: int
    n_layers: int
    head: int | None  # None: the mean over heads
    n_heads: int

    def describe(self) -> str:
        heads = f"head {self.head}" if self.head is not None else f"mean of {self.n_heads} heads"
        what = "cross-attention (decoder -> encoder)" if self.kind == "cross" else f"{self.stack} self-attention"
        return f"{what}, layer {self.layer} of layers 0-{self.n_layers - 1}, {heads}"


@contextlib.contextmanager
def _recording(attention) -> Iterator[None]:
    """Run one attention module on its eager path so that it keeps its probabilities."""
    attention.record_weights = True
    try:
        yield
    finally:
        attention.record_weights = False


@torch.no_grad()
def attention_map(model, tokenizer, text: str, layer: int | None = None, head: int | None = None,
                  kind: str = "self", target: str | None = None) -> AttentionMap:
    """One layer's attention probabilities for `text`, of one head or averaged over heads.

    kind: self (BERT and the T5 encoder: bidirectional; GPT: causal), decoder-self or cross (T5).
    T5 decoder maps run on `target`, or without one on the model's own greedy output.
    layer None is the last layer.
    """
    family = model.config.family
    if kind not in ATTENTION_KINDS:
        raise UserError(f"--kind {kind!r} is not one of {', '.join(ATTENTION_KINDS)}")
    if kind != "self" and family != "t5":
        raise UserError(f"--kind {kind} needs an encoder-decoder (T5) model and {model.config.name} is a "
                        f"{family.upper()} model; use --kind self")
    if target is not None and kind == "self":
        raise UserError("--target is the decoder's text: use it with --kind decoder-self or --kind cross (T5)")
    stack_name = "decoder" if family == "gpt" or kind != "self" else "encoder"
    stack = getattr(model, stack_name)
    n_layers, n_heads = len(stack.blocks), model.config.n_heads
    layer = n_layers - 1 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise UserError(f"--layer {layer} is out of range: {model.config.name}'s {stack_name} has {n_layers} layers; "
                        f"use --layer 0 to {n_layers - 1}")
    if head is not None and not 0 <= head < n_heads:
        raise UserError(f"--head {head} is out of range: {model.config.name} has {n_heads} heads per layer; "
                        f"use --head 0 to {n_heads - 1}, or leave it out for the mean over heads")
    block = stack.blocks[layer]
    module = block.cross_attn if kind == "cross" else block.attn

    ids = _encode_checked(model, tokenizer, [text], "--text")[0]
    input_ids = torch.tensor([ids], device=_device(model))
    queries = keys = [_label(tokenizer, i) for i in ids]
    if family == "t5" and kind != "self":
        decoder_ids = _decoder_input(model, tokenizer, input_ids, target)
        queries = [_label(tokenizer, i) for i in decoder_ids]
        keys = keys if kind == "cross" else queries
        with _recording(module):
            model(input_ids, decoder_input_ids=torch.tensor([decoder_ids], device=input_ids.device))
    else:
        with _recording(module):
            if family == "t5":
                model.encode(input_ids)
            else:
                model(input_ids)
    weights, module.weights = module.weights[0].float().cpu(), None  # (H, queries, keys)
    weights = weights.mean(0) if head is None else weights[head]
    return AttentionMap(weights, queries, keys, kind, stack_name, layer, n_layers, head, n_heads)


def _decoder_input(model, tokenizer, input_ids: torch.Tensor, target: str | None) -> list[int]:
    """T5's decoder input: the start token (pad) and the target's tokens, or the greedy decode."""
    special = special_ids(tokenizer)
    if target is not None:
        if not target.strip():
            raise UserError("--target is empty; pass the decoder text, or leave it out for the greedy decode")
        tokens = encode_texts(tokenizer, [target], add_special_tokens=False)[0]
        check_context(model.config, [len(tokens) + 1], 0, "--target")
    else:
        new = generate_ids(model, input_ids, TARGET_TOKENS, temperature=0, eos_id=special.eos, pad_id=special.pad)
        tokens = new[0].tolist()
        if special.eos in tokens:
            tokens = tokens[:tokens.index(special.eos) + 1]
    return [special.pad, *tokens]


def _label(tokenizer, token_id: int) -> str:
    """A token as text: decoded where it is whole characters, else its vocabulary entry (a byte piece)."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if not text or "\ufffd" in text:
        return tokenizer.id_to_token(token_id) or str(token_id)
    if text.isspace():
        return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
    return text.strip()


def save_attention_png(attention: AttentionMap, path: str | Path, title: str) -> None:
    """Draw the map with matplotlib (the optional `plot` extra); written under a temporary name, then renamed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--png needs matplotlib, which is not installed; pip install 'llmcli[plot]'") from None

    def tex_safe(labels: list[str]) -> list[str]:
        return [label.replace("$", r"\$") for label in labels]  # "$" would start mathtext

    rows, cols = attention.weights.shape
    fig = Figure(figsize=(max(4.0, 0.35 * cols + 2), max(3.0, 0.35 * rows + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(attention.weights.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(cols), tex_safe(attention.keys), rotation=90, fontsize=8)
    ax.set_yticks(range(rows), tex_safe(attention.queries), fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title.replace("$", r"\$"), fontsize=9)
    fig.colorbar(image, ax=ax, label="attention probability")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    except OSError as e:
        raise UserError(f"{path}: cannot write the image ({e.strerror}); choose another --png path") from None
    tmp.replace(path)


# ---------------------------------------------------------------- expert routing


@dataclass
class ExpertRouting:
    """How one text's tokens spread over a mixture of experts: per layer, each expert's share of the routed
    (token, slot) pairs, and the tokens each expert took most often."""

    tokens: list[str]
    load: list[list[float]]  # layer -> expert -> share of routed pairs (a layer sums to 1)
    top_tokens: list[list[list[tuple[str, int]]]]  # layer -> expert -> (token, times), most taken first
    experts_per_token: int

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "load": self.load, "experts_per_token": self.experts_per_token,
                "top_tokens": [[[{"token": t, "count": n} for t, n in expert] for expert in layer]
                               for layer in self.top_tokens]}


def expert_routing(model, tokenizer, text: str, top: int = 5) -> ExpertRouting:
    """Run `text` through a mixture-of-experts model and read each layer's router choices."""
    layers = [m for m in model.modules() if isinstance(m, MixtureOfExperts)]
    if not layers:
        raise UserError(f"{model.config.name} has no mixture of experts (n_experts = 0); this shows routing of "
                        f"models such as moe-micro, Mixtral, Qwen3-MoE or OLMoE")
    ids = _encode_checked(model, tokenizer, [text], "--text")[0]
    chosen: list[torch.Tensor] = []

    def record(module, inputs, output):
        _, _, experts = module.route(inputs[0].reshape(-1, inputs[0].shape[-1]))
        chosen.append(experts.cpu())

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        with torch.no_grad():
            model(torch.tensor([ids], device=_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    tokens = [_label(tokenizer, i) for i in ids]
    load, top_tokens = [], []
    for experts in chosen:
        counts = torch.bincount(experts.reshape(-1), minlength=len(layers[0].experts))
        load.append((counts / counts.sum()).tolist())
        per_expert = []
        for e in range(len(counts)):
            taken: dict[str, int] = {}
            for position in (experts == e).any(-1).nonzero().reshape(-1).tolist():
                taken[tokens[position]] = taken.get(tokens[position], 0) + 1
            per_expert.append(sorted(taken.items(), key=lambda item: -item[1])[:top])
        top_tokens.append(per_expert)
    return ExpertRouting(tokens, load, top_tokens, layers[0].top_k)


def save_routing_png(routing: ExpertRouting, path: str | Path, title: str) -> None:
    """Layers by experts, coloured by share of routed tokens (matplotlib: the optional `plot` extra)."""
    def draw(axes) -> None:
        image = axes.imshow(torch.tensor(routing.load).numpy(), cmap="viridis", vmin=0.0, aspect="auto")
        axes.set_xlabel("expert")
        axes.set_ylabel("layer")
        axes.set_title(title.replace("$", r"\$"), fontsize=9)
        axes.figure.colorbar(image, ax=axes, label="share of routed tokens")

    experts, layers = len(routing.load[0]), len(routing.load)
    write_png(path, draw, size=(max(4.0, 0.3 * experts + 2), max(3.0, 0.3 * layers + 1.5)))
