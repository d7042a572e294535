"""Decoding: the KV cache changes nothing, seeds reproduce, left padding changes nothing."""

import pytest
import torch

from conftest import tiny_config
from llmcli.generation import generate_ids, sample_next
from llmcli.models import build_model


def prompt(length=5, seed=0):
    return torch.randint(1, 97, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family, overrides", [("gpt", {}), ("gpt", {"position": "rope", "n_kv_heads": 1}),
                                               ("t5", {})])
def test_greedy_with_and_without_cache_is_identical(family, overrides):
    model = build_model(tiny_config(family, **overrides), seed=0).eval()
    ids = prompt()
    cached = generate_ids(model, ids, 20, temperature=0)
    uncached = generate_ids(model, ids, 20, temperature=0, use_cache=False)
    assert cached.shape == (1, 20)
    assert torch.equal(cached, uncached)


def test_seeded_sampling_is_reproducible():
    model = build_model(tiny_config("gpt"), seed=0).eval()
    a = generate_ids(model, prompt(), 15, temperature=1.0, top_k=20, seed=7)
    b = generate_ids(model, prompt(), 15, temperature=1.0, top_k=20, seed=7)
    c = generate_ids(model, prompt(), 15, temperature=1.0, top_k=20, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_left_padded_batch_gives_each_prompt_its_own_tokens():
    model = build_model(tiny_config("gpt"), seed=0).eval()
    short, long = prompt(3, seed=1), prompt(7, seed=2)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 3)], 1), torch.ones(1, 7)]).long()
    together = generate_ids(model, batch, 10, attention_mask=mask, temperature=0)
    assert torch.equal(together[0:1], generate_ids(model, short, 10, temperature=0))
    assert torch.equal(together[1:2], generate_ids(model, long, 10, temperature=0))


def test_eos_stops_and_pads():
    model = build_model(tiny_config("gpt"), seed=0).eval()
    first = generate_ids(model, prompt(), 1, temperature=0)[0, 0].item()
    out = generate_ids(model, prompt(), 10, temperature=0, eos_id=first, pad_id=0)
    assert out.shape == (1, 1) and out[0, 0] == first


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)} == {0, 1}
    # softmax of the logits: 0.636, 0.234, 0.086, ... -> top_p 0.8 keeps tokens 0 and 1
    assert {sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(200)} == {0, 1}
    assert sample_next(logits, 0.0).item() == 0


def test_a_gpt_prompt_gets_no_end_of_text_from_a_unigram_tokenizer():
    """llmcli's unigram tokenizer appends </s> to every text; a GPT prompt is continued, not ended."""
    from llmcli.generation import generate_text
    from llmcli.models import build_model
    from llmcli.tokenizer import encode_plain, train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on the mat and looked around"] * 40, "unigram", 60)
    model = build_model(tiny_config("gpt", vocab_size=64), seed=0).eval()
    result = generate_text(model, tokenizer, ["the cat sat"], max_new_tokens=3, temperature=0.0)[0]
    assert result.prompt_tokens == len(encode_plain(tokenizer, ["the cat sat"])[0])
