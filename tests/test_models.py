"""Model invariants: causality, bidirectionality, the KV cache, padding, GQA, SDPA vs eager."""

import pytest
import torch

from conftest import tiny_config
from llmcli.models import build_model

VARIANTS = {
    "gpt2-like": {},
    "sinusoidal": dict(position="sinusoidal"),
    "rope-gqa-swiglu-rms": dict(position="rope", n_kv_heads=2, activation="swiglu", norm="rmsnorm", bias=False),
    "mqa-parallel-geglu": dict(position="rope", n_kv_heads=1, activation="geglu", parallel_block=True),
    "relative": dict(position="relative", relative_buckets=8, relative_max_distance=16),
    "transformer-xl": dict(position="transformer_xl", norm="rmsnorm"),
    "post-norm-untied-relu": dict(norm_position="post", tie_embeddings=False, activation="relu"),
}


def tokens(batch=2, length=12, vocab=97, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def outputs(model, ids, **kw):
    if model.config.family == "t5":
        return model(ids, decoder_input_ids=ids, **kw).logits
    return model(ids, **kw).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpt_is_causal(variant):
    model = build_model(tiny_config("gpt", **VARIANTS[variant]), seed=0).eval()
    ids = tokens()
    changed = ids.clone()
    t = 7
    changed[:, t] = (changed[:, t] + 1) % 97
    a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_t5_decoder_is_causal_and_sees_the_whole_encoder_input():
    model = build_model(tiny_config("t5"), seed=0).eval()
    src, tgt = tokens(seed=1), tokens(length=9, seed=2)
    t = 5
    tgt2 = tgt.clone()
    tgt2[:, t] = (tgt2[:, t] + 1) % 97
    a = model(src, decoder_input_ids=tgt).logits
    b = model(src, decoder_input_ids=tgt2).logits
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])
    src2 = src.clone()
    src2[:, -1] = (src2[:, -1] + 1) % 97  # the last encoder token reaches the first decoder position
    c = model(src2, decoder_input_ids=tgt).logits
    assert not torch.allclose(a[:, 0], c[:, 0])


@pytest.mark.parametrize("variant", ["gpt2-like", "relative"])
def test_bert_is_bidirectional(variant):
    overrides = {k: v for k, v in VARIANTS[variant].items()}
    model = build_model(tiny_config("bert", **overrides), seed=0).eval()
    ids = tokens()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 97
    a, b = model(ids).hidden_states, model(changed).hidden_states
    assert not torch.allclose(a[:, 0], b[:, 0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpt_kv_cache_matches_full_forward(variant):
    model = build_model(tiny_config("gpt", **VARIANTS[variant]), seed=0).eval()
    ids = tokens(length=14)
    full = model(ids).logits
    cache = model.new_cache(batch=2, max_len=20)
    steps = [model(ids[:, :6], cache=cache).logits]  # prefill
    steps.append(model(ids[:, 6:9], cache=cache).logits)  # a chunk into a non-empty cache
    steps += [model(ids[:, i:i + 1], cache=cache).logits for i in range(9, 14)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_t5_decoder_cache_matches_full_forward():
    model = build_model(tiny_config("t5"), seed=0).eval()
    src, tgt = tokens(seed=3), tokens(length=8, seed=4)
    full = model(src, decoder_input_ids=tgt).logits
    memory = model.encode(src)
    cache = model.new_cache(batch=2, max_len=8)
    steps = [model(decoder_input_ids=tgt[:, i:i + 1], encoder_hidden_states=memory, cache=cache).logits
             for i in range(8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.cross[0].k is not None


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_padding_does_not_change_real_positions(family):
    model = build_model(tiny_config(family), seed=0).eval()
    ids = tokens(batch=1, length=10)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], dim=1).long()
    if family == "t5":
        dec = tokens(batch=1, length=5, seed=9)
        a = model(ids, decoder_input_ids=dec).logits
        b = model(padded, attention_mask=mask, decoder_input_ids=dec).logits
    else:
        a = model(ids).logits
        b = model(padded, attention_mask=mask).logits[:, :10]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_multi_query_equals_multi_head_with_shared_keys_and_values():
    """MQA is MHA whose heads all use the same K/V projection."""
    mqa = build_model(tiny_config("gpt", n_kv_heads=1), seed=0).eval()
    mha = build_model(tiny_config("gpt"), seed=1).eval()
    state = mqa.state_dict()
    for name, tensor in list(state.items()):
        if ".k_proj." in name or ".v_proj." in name:
            state[name] = tensor.repeat(4, *([1] * (tensor.dim() - 1)))
    mha.load_state_dict(state)
    ids = tokens()
    torch.testing.assert_close(mqa(ids).logits, mha(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_eager_attention_equals_sdpa_and_records_probabilities(family):
    model = build_model(tiny_config(family, n_kv_heads=2), seed=0).eval()
    ids = tokens()
    fast = outputs(model, ids)
    attentions = [m for m in model.modules() if m.__class__.__name__ == "Attention"]
    for attn in attentions:
        attn.record_weights = True
    slow = outputs(model, ids)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    weights = attentions[0].weights
    assert weights.shape == (2, 4, 12, 12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 12))
    if family == "gpt":
        assert torch.all(weights.triu(1) == 0)


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_every_parameter_gets_a_gradient(family):
    model = build_model(tiny_config(family, **({"pooler": True} if family == "bert" else {})), seed=0)
    ids = tokens()
    out = model(ids, decoder_input_ids=ids) if family == "t5" else model(ids)
    loss = out.logits.logsumexp(-1).mean() + (out.pooled.sum() if out.pooled is not None else 0)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = build_model(tiny_config("gpt"), seed=0)
        model.decoder.gradient_checkpointing = checkpointing
        model(tokens()).logits.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_input_longer_than_learned_positions_is_a_user_error():
    from llmcli.errors import UserError

    model = build_model(tiny_config("gpt", max_seq_len=8), seed=0)
    with pytest.raises(UserError, match="longer than the model's max_seq_len"):
        model(tokens(length=9))


def test_matrices_stored_transposed_compute_and_save_the_same():
    """The decode-friendly order in memory changes no value, no name and no byte on disk."""
    import torch

    from llmcli.models.layout import store_matrices_transposed

    model = build_model(tiny_config("gpt", tie_embeddings=True), seed=0).eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    logits = model(ids).logits
    parameters = list(model.parameters())
    store_matrices_transposed(model)
    assert not model.tok_emb.weight.is_contiguous() and model.tok_emb.weight.t().is_contiguous()
    assert list(model.parameters()) == parameters  # the same Parameter objects, in place
    assert torch.equal(model(ids).logits, logits)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    store_matrices_transposed(model, transposed=False)
    assert all(p.is_contiguous() for p in model.parameters())
