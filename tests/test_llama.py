"""Llama-style decoders (Llama, Mistral, Qwen2): conversion both ways, exact against transformers, and the
commands downstream on a converted directory."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_thread

from llmcli.generation import generate_ids
from llmcli.interop.hf import convert_from_hf, convert_to_hf, hf_config
from llmcli.model_dir import load_model, resolve_config
from llmcli.profiling.counts import count

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()

CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM",
           "smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM",
           "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
           "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
           "qwen2_moe": "Qwen2MoeForCausalLM"}
SMALL = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
SHAPES = {  # (model_type, config overrides): GQA and MQA, tied and untied, head_dim != d_model / heads, biases
    "llama-gqa-untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0)),
    "llama-mqa-tied-head_dim": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True, head_dim=24)),
    "llama-biases": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "mistral-gqa": ("mistral", dict(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)),
    "qwen2-tied-qkv-bias": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-mha-untied": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=False, head_dim=32)),
    # QK-norm per head (Qwen3) and over the projection with output norms (OLMo 2)
    "qwen3-gqa-tied-head_dim": ("qwen3", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "qwen3-mqa-bias-llama3": ("qwen3", dict(num_key_value_heads=1, attention_bias=True, tie_word_embeddings=False,
                                            rope_parameters=dict(rope_type="llama3", rope_theta=1e6, factor=4.0,
                                                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                                                 original_max_position_embeddings=16))),
    "olmo2-gqa-untied": ("olmo2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "olmo2-mha-bias-tied": ("olmo2", dict(num_key_value_heads=4, attention_bias=True, tie_word_embeddings=True)),
    # Phi-3's fused qkv_proj (GQA: unequal parts) and gate_up_proj; partial rotation with longrope (Phi-4-mini)
    "phi3-gqa-window": ("phi3", dict(num_key_value_heads=2, pad_token_id=0, sliding_window=6)),
    "phi3-partial-longrope": ("phi3", dict(num_key_value_heads=1, pad_token_id=0, tie_word_embeddings=True,
                                           original_max_position_embeddings=16, rope_parameters=dict(
                                               rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                                               short_factor=[1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                                               long_factor=[1.0, 2.0, 4.0, 6.0, 8.0, 12.0]))),
    # SmolLM3's NoPE layers (layer 1 of 2 takes no rotary positions); Granite's four multipliers
    "smollm3-nope": ("smollm3", dict(num_key_value_heads=2, pad_token_id=0, no_rope_layer_interval=2,
                                     tie_word_embeddings=True)),
    "granite-multipliers": ("granite", dict(num_key_value_heads=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                                            attention_multiplier=0.0125, logits_scaling=8.0, attention_bias=True)),
    # Gemma 2: alternating windows, softcapped scores and logits; Gemma 3: five local layers to one global, their own
    # rotary base, per-head QK-norm, a scaled global rotary
    "gemma2-softcap": ("gemma2", dict(num_hidden_layers=4, num_key_value_heads=2, head_dim=24, sliding_window=5,
                                      query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
                                      final_logit_softcapping=3.0, pad_token_id=0)),
    "gemma3-local-global": ("gemma3_text", dict(num_hidden_layers=6, num_key_value_heads=1, sliding_window=4,
                                                query_pre_attn_scalar=24, pad_token_id=0, tie_word_embeddings=False,
                                                rope_parameters={"full_attention": dict(
                                                    rope_type="linear", rope_theta=1e6, factor=4.0),
                                                    "sliding_attention": dict(rope_type="default",
                                                                              rope_theta=10000.0)})),
    # Sliding windows shorter than the prompt: every layer (Mistral), chosen layers (Qwen2, Qwen3)
    "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=4, tie_word_embeddings=False)),
    "qwen2-window-layer-1": ("qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                                           max_window_layers=1)),
    "qwen3-window-layer-0": ("qwen3", dict(num_key_value_heads=4, use_sliding_window=True, sliding_window=3,
                                           layer_types=["sliding_attention", "full_attention"])),
    # Mixtures of experts: top-1 and top-2, 4 and 8 experts, the top-k probabilities renormalised (Mixtral always,
    # Qwen3-MoE and OLMoE by norm_topk_prob) or not, an expert width of its own (Qwen3-MoE)
    "mixtral-8-top2": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=2,
                                       tie_word_embeddings=False)),
    "mixtral-4-top1": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=1, num_key_value_heads=2)),
    "qwen3moe-4-top2-norm": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                               moe_intermediate_size=48, num_key_value_heads=2, head_dim=24)),
    "qwen3moe-8-top1": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=1, norm_topk_prob=False,
                                          moe_intermediate_size=32, num_key_value_heads=2)),
    "olmoe-8-top2": ("olmoe", dict(num_experts=8, num_experts_per_tok=2, num_key_value_heads=2)),
    "olmoe-4-top1-norm": ("olmoe", dict(num_experts=4, num_experts_per_tok=1, norm_topk_prob=True,
                                        num_key_value_heads=4)),
    # Qwen2-MoE: q/k/v biases, a sigmoid-gated shared expert beside the routed ones
    "qwen2moe-8-top2-shared": ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                                 shared_expert_intermediate_size=80, num_key_value_heads=2)),
    "qwen2moe-4-top1-norm-tied": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=1, norm_topk_prob=True,
                                                    moe_intermediate_size=48, shared_expert_intermediate_size=40,
                                                    num_key_value_heads=4, tie_word_embeddings=True)),
    # Rotary scalings, each past its original context (16 positions) in the 40-token batch and in generation
    "llama3-scaled": ("llama", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama-dynamic": ("llama", dict(max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "llama-yarn": ("llama", dict(num_key_value_heads=1, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
    "llama-longrope": ("llama", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=16,
        short_factor=[1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0],
        long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 12.0, 16.0]))),
}

# Per family, what a small model needs besides SMALL (a padding id inside the vocabulary, a short window, ...)
DOWNSTREAM = {"llama": {}, "qwen3": {}, "olmo2": {}, "phi3": dict(pad_token_id=0, sliding_window=8),
              "smollm3": dict(pad_token_id=0, no_rope_layer_interval=2), "granite": dict(residual_multiplier=0.5),
              "gemma2": dict(head_dim=16, pad_token_id=0, sliding_window=8),
              "gemma3_text": dict(head_dim=16, pad_token_id=0, sliding_window=8),
              "mixtral": dict(num_local_experts=4, num_experts_per_tok=2), "olmoe": dict(num_experts=4,
                                                                                      num_experts_per_tok=2)}


def hf_model(model_type: str, overrides: dict, seed: int = 0):
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[model_type])(config).eval()
    with torch.no_grad():  # biases start at zero and norms at one in transformers: spread them, so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
    return model


@pytest.fixture(scope="module", params=sorted(SHAPES))
def converted(request, tmp_path_factory):
    """(transformers model, its directory, the llmcli directory converted from it)."""
    model_type, overrides = SHAPES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = hf_model(model_type, overrides)
    model.save_pretrained(root / "hf")
    convert_from_hf(root / "hf", root / "ours")
    return model, root / "hf", root / "ours"


def padded_batch(vocab: int = 256):
    """40 tokens: past the original context of the scaled rotary shapes."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 40), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0
    mask[2, 11:] = 0
    return ids, mask


def test_logits_equal_transformers_over_a_padded_batch(converted):
    hf, _, ours_dir = converted
    ours = load_model(ours_dir)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max() <= 1e-4


def test_greedy_generation_gives_transformers_tokens(converted):
    hf, _, ours_dir = converted
    ours = load_model(ours_dir)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])  # left-padded, as both generate
    mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                           pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    got = generate_ids(ours, ids, 12, attention_mask=mask, temperature=0.0, eos_id=None, pad_id=0)
    assert torch.equal(got, want)


def test_to_hf_loads_with_from_pretrained_and_round_trips_bit_identically(converted, tmp_path):
    hf, _, ours_dir = converted
    convert_to_hf(ours_dir, tmp_path / "back")
    architecture = json.loads((tmp_path / "back" / "config.json").read_text())["architectures"][0]
    assert architecture == type(hf).__name__
    reloaded = getattr(transformers, architecture).from_pretrained(tmp_path / "back").eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits,
                           hf(input_ids=ids, attention_mask=mask).logits)
    convert_from_hf(tmp_path / "back", tmp_path / "again")
    first, second = load_model(ours_dir).state_dict(), load_model(tmp_path / "again").state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    a, b = (json.loads((d / "config.json").read_text()) for d in (ours_dir, tmp_path / "again"))
    assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}


def test_generation_config_supplies_eos_and_unsupported_fields_are_named(tmp_path, cli):
    model = hf_model("llama", dict(num_key_value_heads=2))
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [7, 2]}))
    result = cli("convert", "from-hf", tmp_path / "hf", tmp_path / "ours")
    assert result.exit_code == 0 and "no tokenizer.json" in result.stderr  # a warning, not a failure
    config = load_model(tmp_path / "ours").config
    assert (config.bos_token_id, config.eos_token_id, config.n_kv_heads) == (1, 7, 2)

    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, named in ((dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 0.7}), "mscale"),
                          (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
                          (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                                sliding_window=8, layer_types=["chunked_attention", "full_attention"]),
                           "chunked_attention"),
                          (dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe"), "LlamaForCausalLM"),
                          (dict(hidden_act="gelu"), "hidden_act")):
        bad = tmp_path / f"bad-{named}"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**hf_cfg, **change}))
        (bad / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
        result = cli("convert", "from-hf", bad, tmp_path / f"out-{named}")
        assert result.exit_code == 2 and named in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / f"out-{named}").exists()


NEW_ENTRIES = ("smollm2-135m", "smollm2-360m", "qwen2.5-0.5b", "tinyllama-1.1b", "llama-2-7b", "llama-3-8b",
               "mistral-7b", "llama-65b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen3-0.6b", "qwen3-1.7b",
               "qwen3-4b", "qwen3-8b", "gemma-2-2b", "gemma-3-1b", "gemma-3-4b", "phi-3-mini", "phi-4-mini",
               "olmo-2-1b", "smollm3-3b", "granite-3.3-2b", "mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b",
               "olmoe-1b-7b", "qwen1.5-moe-a2.7b")


@pytest.mark.parametrize("name", NEW_ENTRIES)
def test_zoo_counts_equal_transformers_and_the_published_figure(name):
    config, _ = resolve_config(name)
    ours = count(config).params_with_heads
    hf_cfg = hf_config(config)
    architecture, model_type = hf_cfg.pop("architectures")[0], hf_cfg.pop("model_type")
    with torch.device("meta"):
        model = getattr(transformers, architecture)(transformers.AutoConfig.for_model(model_type, **hf_cfg))
    assert ours == sum(p.numel() for p in model.parameters())
    assert abs(count(config).params / config.published_params - 1) <= 0.01
    if config.n_experts:  # the active count: within 1%, or within the last digit of a two-digit figure (3.3B, 1.3B:
        # Qwen's card truncates 3.35B, OLMoE's rounds 1.28B)
        active, published = count(config).active_params, config.published_active_params
        last_digit = 10 ** (len(str(published)) - len(str(published).rstrip("0")))  # 3_300_000_000 -> 1e8
        assert abs(active / published - 1) <= 0.01 or abs(active - published) < last_digit


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "olmo2", "phi3", "gemma2", "gemma3_text", "granite",
                                        "smollm3"])
def test_lora_on_all_projections_exports_a_peft_adapter_that_peft_loads(tmp_path, corpus, model_type):
    """Phi-3's fused qkv_proj and gate_up_proj take our separate q, k, v, gate and up factors side by side."""
    peft = pytest.importorskip("peft")
    from llmcli.finetune import load_finetuned
    from llmcli.tokenizer import save_tokenizer, train_tokenizer
    from llmcli.training.finetune import finetune
    from llmcli.training.run import TrainFlags

    model = hf_model(model_type, dict(num_key_value_heads=2, tie_word_embeddings=False,
                                      **DOWNSTREAM.get(model_type, {})))
    model.save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "base")
    docs = open(corpus).read().split("\n\n")
    save_tokenizer(train_tokenizer(docs, "bpe", 320), tmp_path / "base")
    finetune(str(tmp_path / "base"), corpus, str(tmp_path / "lora"),
             TrainFlags(steps=4, batch_size=2, seq_len=32, lr=5e-2, eval_batches=1),
             {"method": "lora", "task": "lm", "lora_targets": "q,k,v,o,gate,up,down", "lora_rank": 4},
             log=lambda *a, **k: None)
    convert_to_hf(tmp_path / "base", tmp_path / "base-hf")
    hf = getattr(transformers, CLASSES[model_type]).from_pretrained(tmp_path / "base-hf").eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        base = hf(input_ids=ids, attention_mask=mask).logits
        with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "lora" / "peft").eval()  # wraps hf in place
        want = load_finetuned(tmp_path / "lora")(ids, attention_mask=mask).logits
        got = with_adapter(input_ids=ids, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max() <= 1e-4
    assert (want - base)[mask.bool()].abs().max() > 1e-4  # the adapter changed the outputs


@pytest.mark.parametrize("model_type", sorted(DOWNSTREAM))
def test_commands_run_on_a_converted_directory(tmp_path, corpus, cli, model_type):
    """eval, generate (KV cache, GQA, windows), quantize, prune heads (whole kv groups, QK-norm weights with them),
    distill, bench and memory-estimate --measure on a converted directory of each decoder family, as on a built one."""
    from llmcli.tokenizer import save_tokenizer, train_tokenizer

    model = hf_model(model_type, dict(num_key_value_heads=2, tie_word_embeddings=False, **DOWNSTREAM[model_type]))
    model.save_pretrained(tmp_path / "hf")
    assert cli("convert", "from-hf", tmp_path / "hf", tmp_path / "m").exit_code == 0
    save_tokenizer(train_tokenizer(open(corpus).read().split("\n\n"), "bpe", 320), tmp_path / "m")
    m = str(tmp_path / "m")
    data = ["--data", corpus, "--seq-len", 32]

    def ok(*args):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.stderr[-2000:])
        return result

    assert json.loads(ok("eval", m, "--data", corpus, "--seq-len", 32, "--json").stdout)["perplexity"] > 1
    generated = json.loads(ok("generate", m, "--prompt", "The", "--temperature", 0, "--max-new-tokens", 8,
                              "--json").stdout)
    cached = json.loads(ok("generate", m, "--prompt", "The", "--temperature", 0, "--max-new-tokens", 8, "--no-cache",
                           "--json").stdout)
    assert generated["tokens"] == cached["tokens"] and 1 <= len(generated["tokens"]) <= 8
    ok("quantize", m, "--scheme", "int4", "--group-size", 32, "--out", tmp_path / "q", "--no-speed", *data)
    ok("quantize", m, "--scheme", "int8", "--method", "gptq", "--calibration-batches", 2, "--out", tmp_path / "g",
       "--no-speed", *data)
    assert json.loads(ok("eval", tmp_path / "g", "--json", *data).stdout)["perplexity"] > 1
    ok("prune", m, "--method", "heads", "--sparsity", 0.5, "--out", tmp_path / "p", "--no-speed", *data)
    pruned = load_model(tmp_path / "p").config
    assert (pruned.n_heads, pruned.n_kv_heads) == (2, 1)  # one of two kv groups, with its two query heads
    assert json.loads(ok("eval", tmp_path / "p", "--json", *data).stdout)["perplexity"] > 1
    ok("distill", "--teacher", m, "--out", tmp_path / "d", "--steps", 2, "--batch-size", 2, "--no-speed", *data)
    rows = json.loads(ok("bench", m, "--mode", "prefill,decode", "--batch-size", 1, "--seq-len", 8, "--reps", 1,
                         "--compare", "transformers", "--json").stdout)
    assert {r["mode"] for r in rows} == {"prefill", "decode"} and all(r["peer"]["tokens_per_s"] > 0 for r in rows)
    measured = json.loads(ok("memory-estimate", m, "--mode", "infer", "--seq-len", 32, "--new-tokens", 8,
                             "--device", "cpu", "--measure", "--json").stdout)
    assert measured["measured_bytes"] >= 0 and measured["total_bytes"] > 0  # a few kB: below the CPU resolution


def sentencepiece_style_tokenizer(docs: list[str], vocab_size: int):
    """A Llama 2 style tokenizer.json: SentencePiece-derived BPE (▁ for spaces, byte fallback) whose
    post-processor puts <s> before every text, as Hugging Face's Llama tokenizers do."""
    from tokenizers import SentencePieceBPETokenizer, processors

    tokenizer = SentencePieceBPETokenizer(unk_token="<unk>")
    tokenizer.train_from_iterator(docs, vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def test_a_sharded_checkpoint_with_its_own_tokenizer_generates_as_transformers_does(tmp_path, corpus, cli):
    """Shards with an index, a SentencePiece-style tokenizer.json that adds <s>, EOS from generation_config.json:
    `llmcli generate` gives transformers' greedy tokens for the same text."""
    model = hf_model("llama", dict(num_key_value_heads=2, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    tokenizer = sentencepiece_style_tokenizer(open(corpus).read().split("\n\n"), 300)
    assert (tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")) == (1, 2)
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    assert cli("convert", "from-hf", tmp_path / "hf", tmp_path / "m").exit_code == 0
    prompt = "The meaning of"
    result = cli("generate", tmp_path / "m", "--prompt", prompt, "--temperature", 0, "--max-new-tokens", 10, "--json")
    assert result.exit_code == 0, result.stderr
    ours = json.loads(result.stdout)
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    assert ids[0, 0] == 1 and ours["prompt_tokens"] == ids.shape[1]  # <s> first, as the tokenizer adds it
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=10, eos_token_id=2, pad_token_id=2)[0, ids.shape[1]:].tolist()
    until_eos = theirs[:theirs.index(2) + 1] if 2 in theirs else theirs  # both stop at EOS, kept
    assert ours["tokens"] == until_eos


def test_a_sliding_layer_caches_only_its_window_and_decodes_as_without_a_cache():
    """Layer 0 slides over 4 positions, layer 1 sees everything: the cache holds 3 positions for layer 0 (all the
    next query sees besides itself) and every one for layer 1; greedy decoding 30 tokens past the window gives
    the same tokens with and without the cache; memory-estimate's formula counts what the cache holds."""
    from conftest import tiny_config

    from llmcli.models import build_model
    from llmcli.profiling.counts import kv_cache_bytes

    config = tiny_config("gpt", position="rope", norm="rmsnorm", activation="swiglu", bias=False, n_kv_heads=2,
                         sliding_window=4, layer_types=["sliding", "full"])
    model = build_model(config, seed=0).eval()
    cache = model.new_cache(2, 40)
    assert [layer.k.shape[2] for layer in cache.layers] == [3, 40]
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]])
    mask = (torch.arange(8) >= torch.tensor([[2], [0]])).long()
    cached = generate_ids(model, ids, 30, attention_mask=mask, temperature=0.0, eos_id=None, pad_id=0)
    uncached = generate_ids(model, ids, 30, attention_mask=mask, temperature=0.0, eos_id=None, pad_id=0,
                            use_cache=False)
    assert torch.equal(cached, uncached)
    per_position = 2 * config.n_kv_heads * config.d_head * 4
    assert kv_cache_bytes(config, 4, 38) == per_position * (3 + 38)


def test_every_reading_command_takes_a_hugging_face_directory_as_it_is(tmp_path, corpus, cli):
    """eval, generate, memory-estimate and bench read a checkpoint directory as `convert from-hf` would write it
    (same figures, same tokens); quantize, finetune and to-hf read it and write llmcli or HF directories beside it,
    and the checkpoint itself is left as it was."""
    from llmcli.tokenizer import save_tokenizer, train_tokenizer

    model = hf_model("gemma3_text", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                         **DOWNSTREAM["gemma3_text"]))
    model.save_pretrained(tmp_path / "hf")
    save_tokenizer(train_tokenizer(open(corpus).read().split("\n\n"), "bpe", 320), tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    assert cli("convert", "from-hf", tmp_path / "hf", tmp_path / "m").exit_code == 0
    hf, m = str(tmp_path / "hf"), str(tmp_path / "m")
    data = ["--data", corpus, "--seq-len", 32]

    def ok(*args):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.stderr[-2000:])
        return json.loads(result.stdout) if "--json" in args else result

    for command in (["eval", *data], ["generate", "--prompt", "The", "--temperature", 0, "--max-new-tokens", 12],
                    ["memory-estimate", "--mode", "infer", "--seq-len", 64]):
        direct, converted = ok(command[0], hf, *command[1:], "--json"), ok(command[0], m, *command[1:], "--json")
        timed = ("model", "time", "seconds", "tokens_per_s")
        assert {k: v for k, v in direct.items() if k not in timed} == \
            {k: v for k, v in converted.items() if k not in timed}, command
    rows = ok("bench", hf, "--mode", "decode", "--batch-size", 1, "--seq-len", 8, "--reps", 1,
              "--compare", "transformers", "--json")
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["peer"]["tokens_per_s"] > 0
    ok("quantize", hf, "--scheme", "int8", "--out", tmp_path / "q", "--no-speed", *data)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["family"] == "gpt"
    ok("finetune", hf, "--method", "lora", "--task", "lm", "--out", tmp_path / "f", "--steps", 2, "--batch-size", 2, *data)
    assert torch.equal(load_model(tmp_path / "f").lm_head.weight, load_model(m).lm_head.weight)
    ok("generate", tmp_path / "f", "--prompt", "The", "--max-new-tokens", 4)
    ok("convert", "to-hf", hf, tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        want, got = model(input_ids=ids, attention_mask=mask).logits, again(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before


def test_reading_a_checkpoint_config_reads_only_the_embedding_and_the_head(tmp_path, monkeypatch):
    """memory-estimate on a checkpoint of many GB needs its config: of the tensors, only the two that say whether
    the head is tied are read."""
    from llmcli.interop import reading

    hf_model("qwen3", dict(num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(tmp_path / "hf")
    read = []
    original = reading.CheckpointTensors.__getitem__
    monkeypatch.setattr(reading.CheckpointTensors, "__getitem__", lambda self, name: read.append(name) or
                        original(self, name))
    config = reading.hf_checkpoint_config(tmp_path / "hf")
    assert config.qk_norm == "head" and not config.tie_embeddings
    assert sorted(read) == ["lm_head.weight", "model.embed_tokens.weight"]
    read.clear()
    reading.load_hf_model(tmp_path / "hf")
    assert len(read) > 10


@pytest.mark.parametrize("case", ["tokenizer", "pickle", "architecture"])
def test_a_checkpoint_directory_a_command_cannot_read_is_exit_2_with_what_to_do(tmp_path, cli, case):
    hf_model("llama", {}).save_pretrained(tmp_path / "hf")
    command = ["memory-estimate", tmp_path / "hf"]
    if case == "tokenizer":
        command = ["generate", tmp_path / "hf", "--prompt", "hi"]
        expected = "a Hugging Face checkpoint without tokenizer.json (llmcli reads the fast-tokenizer file"
    elif case == "pickle":
        (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
        expected = "pytorch_model.bin: is a pickle checkpoint, which llmcli never opens"
    else:
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        config.update(architectures=["JambaForCausalLM"], model_type="jamba")
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
        expected = "architecture JambaForCausalLM is not supported; llmcli converts GPT2LMHeadModel"
    result = cli(*command)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert expected in result.stderr


def test_a_field_no_layout_holds_is_refused_on_export_not_dropped():
    """Gemma's score cap on a pre-norm rotary model: Llama's layout has no place for it, so to-hf names it."""
    from conftest import tiny_config

    from llmcli.errors import UserError

    config = tiny_config("gpt", position="rope", norm="rmsnorm", activation="swiglu", bias=False,
                         attention_softcap=5.0)
    with pytest.raises(UserError, match="LlamaForCausalLM: attention_softcap = 5.0 \\(it has None\\)"):
        hf_config(config)
