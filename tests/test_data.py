"""Corpora, the held-out split and the pre-training objectives: statistics, invariants, determinism, errors."""

import math

import pytest
import torch

from llmcli.data import (DOCUMENT_CHARS, PretrainingData, clm_example, default_corpus, mask_tokens, read_corpus,
                         span_corrupt, span_corruption_lengths, split_documents, tokens_from_documents,
                         unigram_perplexity)
from llmcli.errors import UserError
from llmcli.tokenizer import SpecialIds, train_tokenizer

VOCAB = 1000
BERT = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
T5 = SpecialIds(pad=0, eos=1, unk=2, sentinels=list(range(3, 103)))
GPT = SpecialIds(pad=0, eos=0)


def stream(n: int, seed: int = 0) -> torch.Tensor:
    """Random non-special token ids."""
    return torch.randint(103, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- corpora


def paragraphs(n: int) -> str:
    return "\n\n".join(f"Paragraph {i}. " + "word " * 60 for i in range(n))


def test_a_long_txt_file_becomes_documents_at_paragraph_breaks(tmp_path):
    text = paragraphs(400)  # about 130k characters
    (tmp_path / "corpus.txt").write_text(text)
    docs = read_corpus(tmp_path / "corpus.txt")
    assert len(docs) >= 7 and all(len(d) <= DOCUMENT_CHARS for d in docs)
    assert "".join(docs) == text
    assert all(d.startswith("Paragraph") for d in docs)


def test_a_folder_reads_every_txt_file_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("not a .txt file")
    (tmp_path / "empty.txt").write_text("  \n")
    assert read_corpus(tmp_path) == ["first", "second"]


def test_jsonl_reads_the_text_field(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    assert read_corpus(tmp_path / "c.jsonl") == ["one", "two"]


@pytest.mark.parametrize("bad_line", ['{"txt": "x"}', "not json", '{"text": 3}', '["text"]'])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line):
    (tmp_path / "c.jsonl").write_text(f'{{"text": "one"}}\n{{"text": "two"}}\n{bad_line}\n')
    with pytest.raises(UserError, match=r"c\.jsonl:3: not a JSON object with a string 'text' field"):
        read_corpus(tmp_path / "c.jsonl")


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.txt", "no such file or folder"),
    (lambda p: (p / "blank.txt").write_text(" \n\n\t") and p / "blank.txt", "holds no text"),
    (lambda p: (p / "d").mkdir() or p / "d", "holds no .txt files"),
    (lambda p: (p / "x.parquet").write_bytes(b"PAR1") and p / "x.parquet", "unsupported file type '.parquet'"),
    (lambda p: (p / "x.txt").write_bytes(b"\xff\xfe\x00") and p / "x.txt", "not UTF-8 text"),
])
def test_bad_corpus_is_a_user_error_with_a_fix(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as error:
        read_corpus(make(tmp_path))
    assert "--data" in str(error.value) or "UTF-8" in str(error.value)


def test_default_corpus_is_python_docs_in_topic_order():
    from pydoc_data.topics import topics

    docs = default_corpus()
    assert "".join(docs) == "".join(topics[k] for k in sorted(topics)) and len(docs) >= 10
    assert read_corpus(None) == docs


def test_split_of_the_default_corpus_is_fixed_and_disjoint():
    docs = default_corpus()
    train, val = split_documents(docs)
    assert split_documents(docs) == (train, val)
    assert val == docs[9::10] and len(train) + len(val) == len(docs)
    assert train == [d for i, d in enumerate(docs) if i % 10 != 9]  # disjoint by position
    assert 0.07 < sum(map(len, val)) / sum(map(len, docs)) < 0.13  # about a tenth of the text


def test_split_of_a_single_short_file_holds_out_its_end(tmp_path):
    text = paragraphs(10)  # 3k characters: one document
    (tmp_path / "one.txt").write_text(text)
    docs = read_corpus(tmp_path / "one.txt")
    train, val = split_documents(docs)
    assert len(docs) == 1 and train[0] and val[0].strip()
    assert train[0] + val[0] == text.rstrip()
    assert 0.05 < len(val[0]) / len(text) < 0.2


def test_tokens_from_documents_ends_each_document_with_eos():
    docs = default_corpus()[:3]
    tokenizer = train_tokenizer(docs, "bpe", 300)
    tokens = tokens_from_documents(tokenizer, docs, eos_id=0)
    assert tokens.dtype == torch.long and tokens.dim() == 1
    ends = (tokens == 0).nonzero().squeeze(1)
    assert len(ends) == 3 and ends[-1] == len(tokens) - 1
    assert tokenizer.decode(tokens[: ends[0]].tolist()) == docs[0]
    assert len(tokens_from_documents(tokenizer, docs, eos_id=None)) == len(tokens) - 3


# ---------------------------------------------------------------- objectives


def test_clm_labels_are_inputs_shifted_by_one():
    window = stream(2 * 9).view(2, 9)
    example = clm_example(window)
    assert example["input_ids"].shape == example["labels"].shape == (2, 8)
    assert torch.equal(example["input_ids"][:, 1:], example["labels"][:, :-1])


def test_mlm_statistics_follow_devlin_et_al():
    ids = stream(64 * 256).view(64, 256)
    ids[:, 0], ids[:, -1], ids[:, -20:-1] = BERT.cls, BERT.sep, BERT.pad  # specials that must never be chosen
    ids[::7, 100] = BERT.unk
    out = mask_tokens(ids, BERT, VOCAB, torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(BERT.all()))
    chosen = out["labels"] != -100
    assert not (chosen & special).any()
    assert torch.equal(out["labels"][chosen], ids[chosen])
    assert torch.equal(out["input_ids"][~chosen], ids[~chosen])
    assert chosen.sum() / (~special).sum() == pytest.approx(0.15, abs=0.01)
    masked = out["input_ids"][chosen] == BERT.mask
    kept = out["input_ids"][chosen] == ids[chosen]
    replaced = ~masked & ~kept
    n = chosen.sum()
    assert masked.sum() / n == pytest.approx(0.8, abs=0.02)
    assert replaced.sum() / n == pytest.approx(0.1, abs=0.02)
    assert kept.sum() / n == pytest.approx(0.1, abs=0.02)
    assert not torch.isin(out["input_ids"][chosen][replaced], torch.tensor(BERT.all())).any()


def test_mlm_is_a_function_of_the_generator():
    ids = stream(4 * 64).view(4, 64)
    a, b, c = (mask_tokens(ids, BERT, VOCAB, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])


def reconstruct(inputs: torch.Tensor, targets: torch.Tensor, special: SpecialIds) -> tuple[list[int], list[int]]:
    """The original sequence (each sentinel in the inputs replaced by its span) and the span lengths."""
    assert inputs[-1] == special.eos and targets[-1] == special.eos
    spans, current, sentinels = {}, None, set(special.sentinels)
    for token in targets[:-1].tolist():
        if token in sentinels:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    original = [t for token in inputs[:-1].tolist() for t in (spans[token] if token in spans else [token])]
    return original, [len(span) for span in spans.values()]


def test_span_corruption_reconstructs_and_matches_t5_statistics():
    generator = torch.Generator().manual_seed(0)
    noise, total, lengths = 0, 0, []
    for i in range(80):
        tokens = stream(50 + 7 * i, seed=i)  # 50 to 603 tokens
        inputs, targets = span_corrupt(tokens, T5, generator)
        original, span_lengths = reconstruct(inputs, targets, T5)
        assert original == tokens.tolist()
        sentinels = [t for t in inputs.tolist() if t in T5.sentinels]
        assert sentinels == T5.sentinels[: len(sentinels)]  # <extra_id_0>, <extra_id_1>, ... in order
        assert [t for t in targets.tolist() if t in T5.sentinels] == sentinels
        assert min(span_lengths) >= 1
        assert abs(sum(span_lengths) - 0.15 * len(tokens)) <= 0.5  # round(L * noise_density) noise tokens
        noise, total, lengths = noise + sum(span_lengths), total + len(tokens), lengths + span_lengths
    assert noise / total == pytest.approx(0.15, abs=0.01)
    assert sum(lengths) / len(lengths) == pytest.approx(3.0, abs=0.3)
    assert len(set(lengths)) > 3  # spans are randomly segmented, not all of one length


def test_span_corruption_lengths_give_exact_input_lengths():
    generator = torch.Generator().manual_seed(0)
    for target in [*range(3, 80), 128, 512, 1024]:
        raw, targets_len = span_corruption_lengths(target)
        inputs, targets = span_corrupt(stream(raw), T5, generator)
        assert (len(inputs), len(targets)) == (target, targets_len)
    assert span_corruption_lengths(512)[0] > 512 * 1.1  # corrupting shortens: more raw tokens than inputs


def test_span_corruption_needs_enough_sentinels():
    few = SpecialIds(pad=0, eos=1, unk=2, sentinels=[3, 4])
    with pytest.raises(UserError, match="needs 9 sentinels, the tokenizer has 2"):
        span_corrupt(stream(180), few, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- batches


def data(family: str, **overrides) -> PretrainingData:
    special = {"gpt": GPT, "bert": BERT, "t5": T5}[family]
    args = dict(family=family, train_tokens=stream(5000), special=special, vocab_size=VOCAB, seq_len=32,
                batch_size=4, seed=7)
    return PretrainingData(**{**args, **overrides})


@pytest.mark.parametrize("family, keys", [
    ("gpt", {"input_ids": (4, 32), "labels": (4, 32)}),
    ("bert", {"input_ids": (4, 32), "labels": (4, 32), "attention_mask": (4, 32)}),
    ("t5", {"input_ids": (4, 32), "labels": (4, 8), "decoder_input_ids": (4, 8)}),
])
def test_batch_is_a_pure_function_of_seed_and_step(family, keys):
    source = data(family)
    batch = source.batch(3)
    assert {k: tuple(v.shape) for k, v in batch.items()} == keys
    assert all(torch.equal(v, data(family).batch(3)[k]) for k, v in batch.items())
    assert not torch.equal(batch["input_ids"], source.batch(4)["input_ids"])
    assert not torch.equal(batch["input_ids"], data(family, seed=8).batch(3)["input_ids"])
    assert source.tokens_per_batch == 4 * 32


def test_batches_follow_each_family_objective():
    gpt = data("gpt").batch(0)
    assert torch.equal(gpt["input_ids"][:, 1:], gpt["labels"][:, :-1])
    bert = data("bert").batch(0)
    assert (bert["input_ids"][:, 0] == BERT.cls).all() and (bert["input_ids"][:, -1] == BERT.sep).all()
    assert (bert["labels"][:, [0, -1]] == -100).all() and (bert["attention_mask"] == 1).all()
    t5 = data("t5").batch(0)
    assert (t5["decoder_input_ids"][:, 0] == T5.pad).all()  # T5's decoder start token
    assert torch.equal(t5["decoder_input_ids"][:, 1:], t5["labels"][:, :-1])
    assert (t5["input_ids"][:, -1] == T5.eos).all() and (t5["labels"][:, -1] == T5.eos).all()


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_corpus_shorter_than_a_window_is_a_user_error(family):
    with pytest.raises(UserError, match="corpus too small for --seq-len 32.*shorter --seq-len"):
        data(family, train_tokens=stream(20))


def test_eval_batches_are_fixed_consecutive_windows():
    source, val = data("gpt"), stream(300, seed=1)
    batches = source.eval_batches(val, max_batches=10)
    assert len(batches) == 3 and [len(b["input_ids"]) for b in batches] == [4, 4, 1]  # (300 - 1) // 32 windows
    inputs = torch.cat([b["input_ids"] for b in batches]).flatten()
    labels = torch.cat([b["labels"] for b in batches]).flatten()
    assert torch.equal(inputs, val[: len(inputs)]) and torch.equal(labels, val[1: len(inputs) + 1])
    assert len(source.eval_batches(val, max_batches=2)) == 2
    for family in ("bert", "t5"):
        first, second = data(family).eval_batches(val, 5), data(family, seed=99).eval_batches(val, 5)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second) for k in a)


def test_unigram_perplexity_by_hand():
    # Add-one counts over a vocabulary of 3: token 0 -> 3/6, token 1 -> 2/6, token 2 -> 1/6.
    ppl = unigram_perplexity(torch.tensor([0, 0, 1]), torch.tensor([0, 2]), vocab_size=3)
    assert ppl == pytest.approx(math.sqrt(12))
