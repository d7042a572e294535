"""Training the three tokenizer kinds (GPT byte-level BPE, BERT WordPiece, T5 Unigram) and reading their specials.

Everything is a Hugging Face `tokenizers.Tokenizer`, so a model directory's tokenizer.json loads in
`transformers` too. Training is made deterministic here because the `tokenizers` trainers iterate
Rust hash maps, whose order changes from run to run: same texts must give the same tokenizer.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from llmcli.errors import UserError

KINDS = ("bpe", "wordpiece", "unigram")
BYTE_ALPHABET = 256  # byte-level BPE starts from every byte value (Radford et al. 2019, 2.2)
T5_SENTINELS = 100  # <extra_id_0> ... <extra_id_99> (Raffel et al. 2020, 3.1.4)
SENTINELS_PER_VOCAB = 20  # at most one sentinel per 20 vocabulary entries, so tiny vocabularies still train

SPECIAL_TOKENS: dict[str, list[str]] = {
    "bpe": ["<|endoftext|>"],  # GPT-2's only special token; also the padding token
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "unigram": ["<pad>", "</s>", "<unk>"],  # <pad> is id 0, T5's decoder start token
}


def sentinel_tokens(vocab_size: int) -> list[str]:
    """T5's span-corruption sentinels that fit a unigram vocabulary of this size."""
    return [f"<extra_id_{i}>" for i in range(min(T5_SENTINELS, vocab_size // SENTINELS_PER_VOCAB))]


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int) -> Tokenizer:
    """Train a `kind` tokenizer of exactly `vocab_size` entries (fewer only if the corpus runs out)."""
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(KINDS)}")
    texts = list(texts)
    try:
        if kind == "bpe":
            tokenizer = _train_bpe(texts, vocab_size)
        elif kind == "wordpiece":
            tokenizer = _train_wordpiece(texts, vocab_size)
        else:
            tokenizer = _train_unigram(texts, vocab_size)
    except Exception as e:  # the Rust unigram trainer raises a bare Exception when the alphabet does not fit
        if "not large enough" not in str(e):
            raise
        tokenizer = None
    if tokenizer is None or tokenizer.get_vocab_size() > vocab_size:
        # The trainers never drop the alphabet: an oversized result means that it did not fit.
        need = minimum_vocab_size(texts, kind)
        raise UserError(f"--vocab-size {vocab_size} is too small for a {kind} tokenizer of this corpus: its special "
                        f"tokens and alphabet take {need} entries; use --vocab-size {need} or more")
    return tokenizer


def minimum_vocab_size(texts: list[str], kind: str) -> int:
    """The smallest vocabulary that holds the special tokens and every character of `texts`."""
    if kind == "bpe":
        return len(SPECIAL_TOKENS["bpe"]) + BYTE_ALPHABET
    words = _words(_pipeline(kind), texts)
    alphabet = {c for word in words for c in word}
    if kind == "wordpiece":
        return len(SPECIAL_TOKENS["wordpiece"]) + len(alphabet) + len(_continuations(words))
    # The unigram trainer needs one entry more than it keeps (its own unknown piece, during training),
    # and a larger vocabulary also holds more sentinels.
    need = base = len(SPECIAL_TOKENS["unigram"]) + len(alphabet) + 1
    while need < base + len(sentinel_tokens(need)):
        need += 1
    return need


def _pipeline(kind: str) -> Tokenizer:
    """An untrained tokenizer: model type, normaliser, pre-tokenizer and decoder of GPT-2, BERT or T5."""
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
    return tokenizer


def _words(tokenizer: Tokenizer, texts: list[str]) -> list[str]:
    """The words the trainer counts: normalised and pre-tokenized texts."""
    normalize, split = tokenizer.normalizer.normalize_str, tokenizer.pre_tokenizer.pre_tokenize_str
    return [word for text in texts for word, _ in split(normalize(text))]


def _continuations(words: list[str]) -> list[str]:
    """WordPiece's "##x" pieces: every character that occurs inside a word."""
    return sorted({"##" + c for word in words for c in word[1:]})


def _train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = _pipeline("bpe")
    # Every byte is in the initial alphabet, so ids are fixed before training and there are no unknowns.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS["bpe"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _train_wordpiece(texts: list[str], vocab_size: int) -> Tokenizer:
    specials = SPECIAL_TOKENS["wordpiece"]
    tokenizer = _pipeline("wordpiece")
    # The trainer numbers the "##x" pieces in hash-map order, and merge ties are broken by id, so the
    # result would change from run to run. Registering them up front, sorted, fixes their ids.
    continuations = _continuations(_words(tokenizer, texts))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials + continuations,
                                        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer = _drop_added_tokens(tokenizer, keep=specials)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer


def _drop_added_tokens(tokenizer: Tokenizer, keep: list[str]) -> Tokenizer:
    """The same vocabulary, with only `keep` left as added (special) tokens."""
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in keep]
    return Tokenizer.from_str(json.dumps(data))


def _train_unigram(texts: list[str], vocab_size: int) -> Tokenizer:
    specials = SPECIAL_TOKENS["unigram"] + sentinel_tokens(vocab_size)
    tokenizer = _pipeline("unigram")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.model = _canonical_unigram(json.loads(tokenizer.to_str())["model"], len(specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    return tokenizer


def _canonical_unigram(model: dict, n_special: int) -> models.Unigram:
    """Scores and order independent of the trainer's hash-map order.

    The trainer sums expected counts in a random order (last-bit differences), gives characters that EM
    dropped the scores min, min + 1e-4, min + 2e-4, ... in a random order, and sorts ties by that order.
    Those characters all get the minimum score here, scores are rounded, and ties sorted by the piece.
    """
    specials, pieces = model["vocab"][:n_special], model["vocab"][n_special:]
    low = min(score for _, score in pieces)
    penalty = 1e-4  # the trainer's min_score_penalty_delta

    def canonical(piece: str, score: float) -> float:
        steps = (score - low) / penalty
        if len(piece) == 1 and abs(steps - round(steps)) < 1e-6:
            return low
        return score

    scored = [(piece, round(canonical(piece, score), 8)) for piece, score in pieces]
    scored.sort(key=lambda item: (-item[1], item[0]))
    return models.Unigram([tuple(s) for s in specials] + scored, unk_id=model["unk_id"], byte_fallback=False)


@dataclass
class SpecialIds:
    """The ids the objectives need. None where the kind has no such token (GPT has no [MASK])."""

    pad: int
    eos: int | None = None
    unk: int | None = None
    cls: int | None = None
    sep: int | None = None
    mask: int | None = None
    sentinels: list[int] = field(default_factory=list)  # <extra_id_0>, <extra_id_1>, ... (T5)
    stops: list[int] = field(default_factory=list)  # more ids that end generation (the rest of an EOS list)

    def all(self) -> list[int]:
        """Every special id: the objectives never mask or corrupt these."""
        ids = [self.pad, self.eos, self.unk, self.cls, self.sep, self.mask, *self.sentinels, *self.stops]
        return sorted({i for i in ids if i is not None})

    def ends(self) -> list[int]:
        """Every id that ends a generated sequence."""
        return [i for i in (self.eos, *self.stops) if i is not None]


def tokenizer_kind(tokenizer: Tokenizer) -> str:
    """bpe, wordpiece or unigram, from the tokenizer's model type."""
    name = type(tokenizer.model).__name__
    kinds = {"BPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram"}
    if name not in kinds:
        raise UserError(f"tokenizer model type {name} is not supported; train one with `llmcli tokenizer train`")
    return kinds[name]


def special_ids(tokenizer: Tokenizer, config=None) -> SpecialIds:
    """The special ids: a converted checkpoint's own BOS/EOS where its config names them (Llama-style
    models, whose tokenizers have no <|endoftext|>), else found in the tokenizer by token string."""
    kind = tokenizer_kind(tokenizer)
    if kind == "bpe" and config is not None and config.eos_token_id is not None:
        return SpecialIds(pad=config.eos_token_id, eos=config.eos_token_id, stops=list(config.stop_token_ids or []))
    missing = [t for t in SPECIAL_TOKENS[kind] if tokenizer.token_to_id(t) is None]
    if missing:
        converted = " (a converted checkpoint names its own: set eos_token_id in config.json)" if kind == "bpe" else ""
        raise UserError(f"the {kind} tokenizer lacks {', '.join(missing)}{converted}; "
                        f"or retrain it with `llmcli tokenizer train --kind {kind}`")
    get = tokenizer.token_to_id
    if kind == "bpe":
        eos = get("<|endoftext|>")
        return SpecialIds(pad=eos, eos=eos)
    if kind == "wordpiece":
        return SpecialIds(pad=get("[PAD]"), unk=get("[UNK]"), cls=get("[CLS]"), sep=get("[SEP]"), mask=get("[MASK]"))
    sentinels = []
    while (i := get(f"<extra_id_{len(sentinels)}>")) is not None:
        sentinels.append(i)
    return SpecialIds(pad=get("<pad>"), eos=get("</s>"), unk=get("<unk>"), sentinels=sentinels)


def encode_plain(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids without the post-processor's [CLS]/[SEP]/</s>: the objectives add their own."""
    return encode_texts(tokenizer, texts, add_special_tokens=False)


def encode_texts(tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Every token of every text, unpadded; add_special_tokens runs the post-processor ([CLS] ... [SEP], ... </s>)."""
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        # A converted tokenizer may truncate to 512: that would silently drop most of each document.
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> Path:
    """Write directory/tokenizer.json under a temporary name, then rename it into place."""
    path = Path(directory) / "tokenizer.json"
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(path)
    return path
