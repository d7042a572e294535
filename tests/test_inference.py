"""Inference: greedy parity with transformers, batching, streaming, fill-mask, embeddings, attention maps,
and the CLI's answers to bad input."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import one_thread, tiny_config
from llmcli.generation import generate_ids, generate_text, load_for_inference
from llmcli.inspection import attention_map, cosine_similarity, embed, fill_mask
from llmcli.model_dir import build_model_dir, load_model



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


def _randomise(model: torch.nn.Module, std: float, seed: int = 1) -> None:
    """Weights of our own drawing, whatever transformers' init did (it depends on what ran before).

    A fresh init makes a tiny model repeat one token. Large position weights (GPT-2's wpe, T5's
    relative bias) and small embeddings make greedy choices change from step to step, so the
    cached decoding path is really exercised.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "ln" in name or "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif "wpe" in name or "relative_attention_bias" in name:
                p.copy_(3.0 * noise)
            elif "wte" in name or "shared" in name or "lm_head" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)


# ---------------------------------------------------------------- parity with transformers

NEW_TOKENS = 24

GPT2_SHAPES = {
    "gelu_new-tied": dict(n_embd=32, n_head=4, n_layer=2, vocab_size=101),
    "relu-untied": dict(n_embd=48, n_head=3, n_layer=3, vocab_size=257, n_inner=80, activation_function="relu",
                        tie_word_embeddings=False),
}


def _greedy_config(transformers, **extra):
    """Plain greedy decoding of exactly max_new_tokens: no eos stop, no penalties, no minimum length."""
    return transformers.GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS, min_length=0,
                                         min_new_tokens=0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                         eos_token_id=None, bos_token_id=None, pad_token_id=0, use_cache=True,
                                         **extra)


@pytest.mark.parametrize("shape", GPT2_SHAPES)
def test_gpt2_greedy_matches_transformers_generate(tmp_path, shape):
    from llmcli.interop.hf import convert_from_hf

    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=64, bos_token_id=None, eos_token_id=None,
                                                              **GPT2_SHAPES[shape]))
    _randomise(hf, std=0.1)
    hf.eval().save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    for seed, length in ((0, 7), (1, 3)):
        ids = torch.randint(1, hf.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids),
                               generation_config=_greedy_config(transformers))[:, length:]
        got = generate_ids(ours, ids, NEW_TOKENS, temperature=0)
        assert got.tolist() == want.tolist()
        assert len(set(want[0].tolist())) >= 4  # not a model stuck on one token


T5_SHAPES = {
    "v1.0-relu-tied": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "v1.1-gated-gelu-shallower-decoder": dict(d_model=48, d_kv=16, d_ff=40, num_layers=3, num_decoder_layers=2,
                                           num_heads=3, feed_forward_proj="gated-gelu"),
}


@pytest.mark.parametrize("shape", T5_SHAPES)
def test_t5_greedy_matches_transformers_generate_batched(tmp_path, shape):
    from llmcli.interop.hf import convert_from_hf

    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.T5Config(vocab_size=120, relative_attention_num_buckets=16,
                                   relative_attention_max_distance=20, **T5_SHAPES[shape])
    hf = transformers.T5ForConditionalGeneration(hf_cfg)
    _randomise(hf, std=0.3)
    hf.eval().save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    # Right padding: row 2 is shorter, its encoder padding is masked out.
    ids = torch.randint(2, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids = ids * mask
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask,
                           generation_config=_greedy_config(transformers, decoder_start_token_id=0))
    assert (want[:, 0] == 0).all()  # T5 starts the decoder from the pad id
    got = generate_ids(ours, ids, NEW_TOKENS, attention_mask=mask, temperature=0)
    assert got.tolist() == want[:, 1:].tolist()
    assert len(set(got.flatten().tolist())) >= 4  # not a model stuck on one token


# ---------------------------------------------------------------- generate_text

PROMPTS = ["The function", "A list is a mutable sequence of items, and"]


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_batched_prompts_get_the_tokens_they_get_alone(model_dirs, family):
    model, tokenizer = load_for_inference(model_dirs[family], "cpu")
    together = generate_text(model, tokenizer, PROMPTS, 12, temperature=0)
    alone = [generate_text(model, tokenizer, [p], 12, temperature=0)[0] for p in PROMPTS]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.completion for r in together] == [r.completion for r in alone]
    assert together[0].prompt_tokens < together[1].prompt_tokens  # the batch really was padded


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_cache_and_no_cache_give_the_same_text(model_dirs, family):
    model, tokenizer = load_for_inference(model_dirs[family], "cpu")
    cached = generate_text(model, tokenizer, PROMPTS, 16, temperature=0)
    uncached = generate_text(model, tokenizer, PROMPTS, 16, temperature=0, use_cache=False)
    assert [r.tokens for r in cached] == [r.tokens for r in uncached]


def test_seeded_sampling_is_reproducible_and_samples_differ(model_dirs):
    model, tokenizer = load_for_inference(model_dirs["gpt"], "cpu")
    a = generate_text(model, tokenizer, PROMPTS[:1], 16, temperature=1.0, top_p=0.95, seed=5, num_samples=3)
    b = generate_text(model, tokenizer, PROMPTS[:1], 16, temperature=1.0, top_p=0.95, seed=5, num_samples=3)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.sample for r in a] == [0, 1, 2]
    assert len({tuple(r.tokens) for r in a}) > 1


def test_generation_stops_at_eos(model_dirs):
    model, tokenizer = load_for_inference(model_dirs["t5"], "cpu")
    eos = tokenizer.token_to_id("</s>")
    with torch.no_grad():  # make </s> the only likely token: generation must stop after one step
        model.tok_emb.weight[eos] *= 100
    result = generate_text(model, tokenizer, ["stop here"], 20, temperature=0)[0]
    assert result.tokens == [eos] and result.completion == ""


# ---------------------------------------------------------------- the generate command


def test_generate_json_has_the_documented_keys(cli, model_dirs):
    result = cli("generate", model_dirs["gpt"], "--prompt", "The function", "--max-new-tokens", "10",
                 "--temperature", "0", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"text", "completion", "tokens", "tokens_per_s", "prompt_tokens", "new_tokens", "time"} <= set(data)
    assert data["text"] == "The function" + data["completion"]
    assert len(data["tokens"]) == data["new_tokens"] <= 10 and data["tokens_per_s"] > 0


def test_generate_several_prompts_and_samples_give_a_list(cli, model_dirs):
    result = cli("generate", model_dirs["t5"], "--prompt", "one", "--prompt", "two", "--num-samples", "2",
                 "--max-new-tokens", "5", "--seed", "0", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["prompt"], r["sample"]) for r in rows] == [("one", 0), ("one", 1), ("two", 0), ("two", 1)]


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_streamed_text_equals_the_json_text(cli, model_dirs, family):
    # Sampling from a random byte-level model produces partial UTF-8 characters: the streamer must hold them.
    args = ("generate", model_dirs[family], "--prompt", "Lists and", "--max-new-tokens", "40", "--seed", "3",
            "--temperature", "1.5")
    streamed = cli(*args)
    assert streamed.exit_code == 0, streamed.stderr
    data = json.loads(cli(*args, "--json").stdout)
    assert streamed.stdout == data["text"] + "\n"
    assert "tokens/s" in streamed.stderr


# ---------------------------------------------------------------- fill-mask


def test_fill_mask_gives_sorted_probabilities(cli, model_dirs):
    result = cli("fill-mask", model_dirs["bert"], "The [MASK] returns a list.", "--top-k", "7", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    probs = [c["probability"] for c in data["candidates"]]
    assert len(probs) == 7 and probs == sorted(probs, reverse=True)
    assert 0 < sum(probs) <= 1 + 1e-6
    assert data["position"] == 2  # [CLS] the [MASK]


def test_fill_mask_two_masks_and_table(cli, model_dirs):
    model, tokenizer = load_for_inference(model_dirs["bert"], "cpu")
    predictions = fill_mask(model, tokenizer, "[MASK] is a [MASK].", top_k=3)
    assert [p.position for p in predictions] == [1, 4]
    result = cli("fill-mask", model_dirs["bert"], "[MASK] is a [MASK].")
    assert result.exit_code == 0 and "probability" in result.stdout and "mask 2 of 2" in result.stdout


# ---------------------------------------------------------------- embed


def test_embed_cosine_matrix_is_symmetric_with_unit_diagonal(cli, model_dirs):
    texts = ["a list of numbers", "the function returns", "a list of strings"]
    result = cli("embed", model_dirs["bert"], *texts, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    sim = torch.tensor(data["similarity"])
    emb = torch.tensor(data["embeddings"])
    assert emb.shape == (3, data["dim"])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(sim, sim.T, atol=1e-6) and torch.allclose(sim.diagonal(), torch.ones(3), atol=1e-5)
    table = cli("embed", model_dirs["bert"], *texts)
    assert table.exit_code == 0 and "cosine similarity" in table.stdout


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_embedding_does_not_depend_on_padding(model_dirs, family):
    model, tokenizer = load_for_inference(model_dirs[family], "cpu")
    short, long = "a list", "a much longer sentence about the sort method of lists in Python"
    alone = embed(model, tokenizer, [short])
    batched = embed(model, tokenizer, [long, short])
    assert torch.allclose(alone[0], batched[1], atol=1e-5)
    assert torch.allclose(cosine_similarity(batched).diagonal(), torch.ones(2), atol=1e-5)


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("family, kind, target", [
    ("bert", "self", None), ("gpt", "self", None), ("t5", "self", None),
    ("t5", "decoder-self", "ein Satz"), ("t5", "cross", "ein Satz"), ("t5", "cross", None),
])
@pytest.mark.parametrize("head", [None, 1])
def test_attention_rows_are_probabilities(model_dirs, family, kind, target, head):
    model, tokenizer = load_for_inference(model_dirs[family], "cpu")
    amap = attention_map(model, tokenizer, "The cat sat on the mat", layer=0, head=head, kind=kind, target=target)
    assert amap.weights.shape == (len(amap.queries), len(amap.keys))
    assert torch.allclose(amap.weights.sum(-1), torch.ones(len(amap.queries)), atol=1e-5)
    if family == "gpt" or kind == "decoder-self":  # causal: nothing attends to a later token
        assert amap.weights.triu(1).abs().max() == 0
    if kind != "self":
        assert amap.queries[0] == "<pad>"  # T5's decoder start token
    assert all(not m.record_weights for m in model.modules() if hasattr(m, "record_weights"))


def test_attention_command_draws_a_heatmap(cli, model_dirs):
    result = cli("attention", model_dirs["bert"], "--text", "The cat sat on the mat", "--head", "0")
    assert result.exit_code == 0, result.stderr
    assert "[CLS]" in result.stdout and "layer 1 of layers 0-1, head 0" in result.stdout
    assert "each row sums to 1" in result.stdout and "\x1b[" not in result.stdout  # not a terminal: no colour codes


def test_attention_png(cli, model_dirs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "map.png"
    result = cli("attention", model_dirs["t5"], "--text", "The cat sat", "--kind", "cross", "--png", out)
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_png_without_matplotlib_says_what_to_install(cli, model_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = cli("attention", model_dirs["gpt"], "--text", "The cat", "--png", tmp_path / "map.png")
    assert result.exit_code == 2
    assert "pip install 'llmcli[plot]'" in result.stderr and not (tmp_path / "map.png").exists()


# ---------------------------------------------------------------- bad input


BAD_INPUT = [
    (["generate", "{gpt}", "--prompt", ""], "the prompt is empty"),
    (["generate", "{gpt}", "--prompt", "ok", "--prompt", "  "], "prompt 2 is empty"),
    (["generate", "{gpt}", "--prompt", "The function returns", "--max-new-tokens", "62"],
     "prompt is 14 tokens and --max-new-tokens is 62: 76 positions, more than tiny-gpt's context "
     "(max_seq_len 64); use --max-new-tokens 50 or less"),
    (["generate", "{gpt}", "--prompt", "word " * 80],
     "the prompt alone fills the context: shorten it to fewer than 64 tokens"),
    (["generate", "{bert}", "--prompt", "hello"], "is a BERT model and generate needs a GPT or T5 model"),
    (["generate", "{gpt}", "--prompt", "hello", "--temperature", "-1"], "--temperature -1.0 must be 0"),
    (["generate", "{gpt}", "--prompt", "hello", "--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    (["generate", "{notok}", "--prompt", "hello"], "no tokenizer.json"),
    (["fill-mask", "{bert}", "no mask here"], "no [MASK] in the text"),
    (["fill-mask", "{gpt}", "The [MASK] sat."], "is a GPT model and fill-mask needs a BERT model"),
    (["embed", "{bert}", "fine", ""], "text 2 is empty"),
    (["attention", "{bert}", "--text", "hi", "--layer", "2"], "--layer 2 is out of range"),
    (["attention", "{gpt}", "--text", "hi", "--head", "4"], "--head 4 is out of range"),
    (["attention", "{gpt}", "--text", "hi", "--kind", "cross"], "needs an encoder-decoder (T5) model"),
    (["attention", "{t5}", "--text", "hi", "--kind", "diagonal"], "--kind 'diagonal' is not one of"),
    (["attention", "{t5}", "--text", "hi", "--target", "x"], "--target is the decoder's text"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[m for _, m in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(cli, model_dirs, tmp_path, args, message):
    build_model_dir(tiny_config("gpt"), tmp_path / "notok", seed=0)
    dirs = {**model_dirs, "notok": str(tmp_path / "notok")}
    result = cli(*[a.format(**dirs) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") <= 2
