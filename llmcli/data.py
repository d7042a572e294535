"""Corpora, the held-out split, and the three pre-training objectives.

The objectives are pure functions of their tensors and an explicit `torch.Generator`, and a training
batch is a pure function of (seed, step): a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from llmcli.errors import UserError
from llmcli.tokenizer import SpecialIds, encode_plain, special_ids

DOCUMENT_CHARS = 20_000  # a single .txt file is cut into documents of at most this many characters
ENCODE_CHUNK = 256  # documents per encode_batch call, to bound memory
VAL_EVERY = 10  # every 10th document is held out for validation
IGNORE_INDEX = -100  # labels torch.nn.functional.cross_entropy ignores by default
MLM_PROBABILITY = 0.15  # Devlin et al. 2019, 3.1: 15% of tokens, of which 80% [MASK], 10% random, 10% kept
MLM_MASK, MLM_RANDOM = 0.8, 0.1
T5_NOISE_DENSITY = 0.15  # Raffel et al. 2020, 3.1.4: corrupt 15% of tokens ...
T5_MEAN_SPAN = 3.0  # ... in spans of mean length 3
EVAL_SEED = 0  # validation masking/corruption is the same for every run and every step
TEXT_SUFFIXES = (".txt", ".text", ".md", "")
DEFAULT_CORPUS_PIECE = 4000  # characters
DATA_HELP = "pass --data a .txt file, a folder of .txt files or a .jsonl file, or leave it out for the built-in corpus"


# ---------------------------------------------------------------- corpora


def default_corpus() -> list[str]:
    """Python's own documentation topics: shipped with every Python, so training works offline."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("this Python lacks pydoc_data, the built-in corpus; pass --data a .txt file, "
                        "a folder of .txt files or a .jsonl file") from None
    # Topics vary from 200 to 40k characters; pieces of at most 4k make every-10th-document
    # validation hold out about a tenth of the text instead of whichever topics happen to be 10th.
    return [piece for name in sorted(topics) for piece in split_text(topics[name], DEFAULT_CORPUS_PIECE)]


def read_corpus(path: str | Path | None) -> list[str]:
    """The documents of --data: None -> the built-in corpus, a text file, a folder of .txt files, or .jsonl."""
    if path is None:
        return default_corpus()
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"{path}: the folder holds no .txt files; {DATA_HELP}")
        docs = [doc for file in files for doc in split_text(_read_text(file))]
    elif path.is_file() and path.suffix == ".jsonl":
        docs = _read_jsonl(path)
    elif path.is_file() and path.suffix in TEXT_SUFFIXES:
        docs = split_text(_read_text(path))
    elif path.is_file():
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; {DATA_HELP}")
    else:
        raise UserError(f"{path}: no such file or folder; {DATA_HELP}")
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise UserError(f"{path}: the corpus holds no text; {DATA_HELP}")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8 or {DATA_HELP}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{number}: not a JSON object with a string 'text' field; "
                            f'every line must look like {{"text": "..."}}')
        docs.append(record["text"])
    return docs


def split_text(text: str, limit: int = DOCUMENT_CHARS) -> list[str]:
    """Cut one long text into documents of at most `limit` characters, at paragraph breaks where possible.

    Without this a single-file corpus (tinyshakespeare) would be one document and have no held-out split.
    The pieces concatenate back to `text` exactly.
    """
    docs = []
    while len(text) > limit:
        head = text[:limit]
        cut = next((i + len(sep) for sep in ("\n\n", "\n", " ") if (i := head.rfind(sep)) > 0), limit)
        docs.append(text[:cut])
        text = text[cut:]
    return docs + [text]


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, validation): every 10th document, or the last ~10% of a corpus of fewer than 10 documents.

    Fixed, with no randomness, so validation loss is comparable across runs, seeds and resumes.
    """
    if not docs:
        raise UserError(f"the corpus holds no documents; {DATA_HELP}")
    if len(docs) >= VAL_EVERY:
        train = [doc for i, doc in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
        return train, docs[VAL_EVERY - 1::VAL_EVERY]
    last = docs[-1].rstrip()
    if len(last) < 2:
        raise UserError(f"the corpus is too small to hold out a validation split; {DATA_HELP}")
    cut = len(last) - max(1, len(last) // VAL_EVERY)
    line = last.rfind("\n", 0, cut) + 1
    if line > 0.8 * len(last):  # prefer a line break, if one is near
        cut = line
    return docs[:-1] + [last[:cut]], [last[cut:]]


def tokens_from_documents(tokenizer, docs: list[str], eos_id: int | None) -> torch.Tensor:
    """One 1-D int64 stream of all documents, each followed by `eos_id` (if any) to mark the boundary.

    Encoded ENCODE_CHUNK documents at a time: the Encoding objects of a batch take ~100 bytes per token.
    """
    end = [] if eos_id is None else [eos_id]
    parts = [torch.tensor([i for ids in encode_plain(tokenizer, docs[start:start + ENCODE_CHUNK]) for i in ids + end],
                          dtype=torch.long) for start in range(0, len(docs), ENCODE_CHUNK)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def document_stream(tokenizer, docs: list[str], special: SpecialIds | None = None) -> torch.Tensor:
    """The token stream a family trains on: documents separated by eos (GPT, T5) or [SEP] (BERT)."""
    special = special or special_ids(tokenizer)
    return tokens_from_documents(tokenizer, docs, special.eos if special.eos is not None else special.sep)


# ---------------------------------------------------------------- objectives


def text_bytes_per_token(docs: list[str], tokens: torch.Tensor) -> float:
    """UTF-8 bytes of the documents over their tokens (separators included): bits per byte's denominator."""
    return sum(len(doc.encode("utf-8")) for doc in docs) / max(len(tokens), 1)


def clm_example(window: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPT: predict each next token. A (B, T+1) window gives T inputs and T labels."""
    return {"input_ids": window[:, :-1], "labels": window[:, 1:]}


def mask_tokens(input_ids: torch.Tensor, special: SpecialIds, vocab_size: int, generator: torch.Generator,
                probability: float = MLM_PROBABILITY) -> dict[str, torch.Tensor]:
    """BERT's masked language model (Devlin et al. 2019, 3.1) on a (B, T) batch.

    Exactly round(probability * n) of each row's n non-special tokens are chosen (at least one, so that no
    row contributes a 0/0 loss); of those 80% become [MASK], 10% a random non-special token, 10% stay.
    """
    if special.mask is None:
        raise UserError("masked language modelling needs a [MASK] token; use a wordpiece tokenizer")
    specials = torch.tensor(special.all(), dtype=input_ids.dtype)
    candidate = ~torch.isin(input_ids, specials)
    rows, length = input_ids.shape
    scores = torch.rand(rows, length, generator=generator).masked_fill(~candidate, 2.0)  # specials rank last
    ranks = torch.empty_like(input_ids)
    ranks.scatter_(1, scores.argsort(dim=1), torch.arange(length).expand(rows, length))
    n_candidates = candidate.sum(dim=1, keepdim=True)
    n_chosen = (n_candidates * probability).round().clamp(min=1).minimum(n_candidates)
    chosen = ranks < n_chosen
    action = torch.rand(rows, length, generator=generator)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[specials[specials < vocab_size]] = False
    pool = allowed.nonzero().squeeze(1)
    random_ids = pool[torch.randint(len(pool), (rows, length), generator=generator)]
    masked = input_ids.clone()
    masked = torch.where(chosen & (action < MLM_MASK), special.mask, masked)
    masked = torch.where(chosen & (action >= MLM_MASK) & (action < MLM_MASK + MLM_RANDOM), random_ids, masked)
    return {"input_ids": masked, "labels": torch.where(chosen, input_ids, IGNORE_INDEX)}


def _span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length` tokens; at least one of each, one kept token per span."""
    noise = min(max(1, round(length * noise_density)), length - 1)
    spans = min(max(1, round(noise / mean_span_length)), length - noise)
    return noise, spans


def _segment(total: int, parts: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random split of `total` items into `parts` runs of length >= 1."""
    cuts = (torch.randperm(total - 1, generator=generator)[: parts - 1] + 1).sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).diff()


def span_corrupt(tokens: torch.Tensor, special: SpecialIds, generator: torch.Generator,
                 noise_density: float = T5_NOISE_DENSITY,
                 mean_span_length: float = T5_MEAN_SPAN) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's span corruption of one sequence (Raffel et al. 2020, 3.1.4): (inputs, targets).

    "a b c d e f" -> inputs "a <extra_id_0> d e <extra_id_1> </s>", targets "<extra_id_0> b c <extra_id_1> f </s>".
    As in T5, kept and noise runs alternate, starting with a kept run and ending with a noise span.
    """
    length = tokens.numel()
    if length < 2:
        raise UserError(f"span corruption needs at least 2 tokens, got {length}; use a longer --seq-len")
    if special.eos is None:
        raise UserError("span corruption needs an end-of-sequence token </s>; use a unigram tokenizer")
    noise, spans = _span_counts(length, noise_density, mean_span_length)
    if spans > len(special.sentinels):
        raise UserError(f"span corruption of {length} tokens needs {spans} sentinels, the tokenizer has "
                        f"{len(special.sentinels)}; use a shorter --seq-len or a larger unigram vocabulary")
    runs = torch.stack([_segment(length - noise, spans, generator), _segment(noise, spans, generator)], 1).flatten()
    is_noise = torch.arange(2 * spans).remainder(2).repeat_interleave(runs).bool()
    sentinel = torch.tensor(special.sentinels[:spans]).repeat_interleave(runs.view(spans, 2).sum(1))
    run_start = torch.zeros(length, dtype=torch.bool)
    run_start[runs.cumsum(0) - runs] = True
    eos = torch.tensor([special.eos])
    inputs = torch.where(is_noise, sentinel, tokens)[~is_noise | run_start]
    targets = torch.where(is_noise, tokens, sentinel)[is_noise | run_start]
    return torch.cat([inputs, eos]), torch.cat([targets, eos])


def span_corruption_lengths(target_input_len: int, noise_density: float = T5_NOISE_DENSITY,
                            mean_span_length: float = T5_MEAN_SPAN) -> tuple[int, int]:
    """(raw tokens, targets length) whose corruption gives inputs of exactly `target_input_len` (with </s>).

    The same idea as T5's `random_spans_helper`, so that every batch has fixed shapes. Adding one raw token
    grows the inputs by 0 or 1, so every length from 3 up is reached exactly.
    """
    def inputs_len(length: int) -> int:
        noise, spans = _span_counts(length, noise_density, mean_span_length)
        return length - noise + spans + 1

    if target_input_len < inputs_len(2):
        raise UserError(f"--seq-len {target_input_len} is too short for span corruption; use 8 or more")
    length = 2
    while inputs_len(length + 1) <= target_input_len:
        length += 1
    noise, spans = _span_counts(length, noise_density, mean_span_length)
    return length, noise + spans + 1


def unigram_perplexity(train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab_size: int) -> float:
    """Validation perplexity of token frequencies fitted on train (add-one smoothing).

    The floor a language model must beat: it knows which tokens are common, nothing about context.
    """
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    return math.exp(-log_probs[val_tokens].mean().item())


# ---------------------------------------------------------------- batches


class PretrainingData:
    """Random windows of the training token stream, turned into batches by the family's objective.

    `vocab_size` is the tokenizer's: MLM draws its random replacement tokens below it.
    """

    def __init__(self, family: str, train_tokens: torch.Tensor, special: SpecialIds, vocab_size: int,
                 seq_len: int, batch_size: int, seed: int) -> None:
        self.family, self.tokens, self.special = family, train_tokens, special
        self.vocab_size, self.seq_len, self.batch_size, self.seed = vocab_size, seq_len, batch_size, seed
        self.targets_len: int | None = None  # t5 only
        if family == "gpt":
            self.window = seq_len + 1  # one more token: the last label
        elif family == "bert":
            if None in (special.cls, special.sep, special.mask):
                raise UserError("bert pre-training needs [CLS], [SEP] and [MASK]; use a wordpiece tokenizer")
            self.window = seq_len - 2  # room for [CLS] and [SEP]
        elif family == "t5":
            self.window, self.targets_len = span_corruption_lengths(seq_len)
            _, spans = _span_counts(self.window, T5_NOISE_DENSITY, T5_MEAN_SPAN)
            if spans > len(special.sentinels):
                raise UserError(f"--seq-len {seq_len} makes {spans} corrupted spans, the tokenizer has only "
                                f"{len(special.sentinels)} sentinels; use a shorter --seq-len or a larger vocabulary")
        else:
            raise UserError(f"unknown family {family!r}; use bert, gpt or t5")
        if self.window < 1:
            raise UserError(f"--seq-len {seq_len} is too short for {family}; use 8 or more")
        if len(train_tokens) < self.window:
            raise UserError(f"corpus too small for --seq-len {seq_len}: {len(train_tokens)} training tokens, one "
                            f"window needs {self.window}; give more data or a shorter --seq-len")

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens per batch: the figure tokens/s is quoted in."""
        return self.batch_size * self.seq_len

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of training step `step`: the same for the same (seed, step), on any machine."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**63)
        offsets = torch.randint(len(self.tokens) - self.window + 1, (self.batch_size, 1), generator=generator)
        return self._objective(self.tokens[offsets + torch.arange(self.window)], generator)

    def eval_batches(self, val_tokens: torch.Tensor, max_batches: int) -> list[dict[str, torch.Tensor]]:
        """The same validation batches every call: consecutive windows, fixed-seed masking or corruption.

        GPT windows overlap by one token, so every validation token after the first is predicted once.
        A validation stream shorter than one window is used whole, as a single shorter row.
        """
        if len(val_tokens) < 2:
            raise UserError(f"the validation split has {len(val_tokens)} tokens; give more data")
        stride = self.window - 1 if self.family == "gpt" else self.window
        starts = list(range(0, len(val_tokens) - self.window + 1, stride))[: max_batches * self.batch_size]
        windows = torch.stack([val_tokens[s:s + self.window] for s in starts]) if starts else val_tokens[None]
        generator = torch.Generator().manual_seed(EVAL_SEED)
        return [self._objective(rows, generator) for rows in windows.split(self.batch_size)][:max_batches]

    def _objective(self, windows: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.family == "gpt":
            return clm_example(windows)
        if self.family == "bert":
            rows = len(windows)
            cls = torch.full((rows, 1), self.special.cls)
            sep = torch.full((rows, 1), self.special.sep)
            batch = mask_tokens(torch.cat([cls, windows, sep], 1), self.special, self.vocab_size, generator)
            return {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
        pairs = [span_corrupt(row, self.special, generator) for row in windows]
        labels = torch.stack([targets for _, targets in pairs])
        decoder_start = torch.full((len(labels), 1), self.special.pad)  # T5 starts decoding from the pad id
        return {"input_ids": torch.stack([inputs for inputs, _ in pairs]), "labels": labels,
                "decoder_input_ids": torch.cat([decoder_start, labels[:, :-1]], 1)}
