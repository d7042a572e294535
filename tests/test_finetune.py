"""Fine-tuning: full and LoRA learn a classification task, adapters reload exactly, merge is exact,
instruction tuning masks the prompt, adapters and prompt tuning keep the base frozen, PEFT parity, refusals."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from llmcli.config import config_from_dict
from llmcli.data import IGNORE_INDEX
from llmcli.finetune import load_finetuned, merge
from llmcli.finetune.heads import language_model
from llmcli.finetune.lora import LoRALinear, add_lora
from llmcli.finetune.tasks import build_task, collate, instruction_prompt
from llmcli.model_dir import load_model, load_tokenizer, save_model
from llmcli.models import build_model
from llmcli.tokenizer import encode_plain, save_tokenizer, special_ids, train_tokenizer
from llmcli.training.finetune import finetune
from llmcli.training.run import TrainFlags
from conftest import one_thread

FRUIT = ["apple", "pear", "plum", "grape", "melon"]
TOOLS = ["hammer", "drill", "saw", "wrench", "chisel"]
FILLER = ["the", "a", "big", "small", "red", "old", "new", "my", "your", "this", "that", "green", "on", "in"]
TOKENIZERS = {"gpt": ("bpe", 300), "bert": ("wordpiece", 200), "t5": ("unigram", 200)}
FAST = dict(batch_size=16, seq_len=16, log_every=10, eval_batches=4)


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


def classification_rows(n: int = 400, seed: int = 0) -> list[dict]:
    """Short texts of filler words plus one fruit or one tool: the label needs the text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        fruit = rng.random() < 0.5
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(FRUIT if fruit else TOOLS))
        rows.append({"text": " ".join(words), "label": "fruit" if fruit else "tool"})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory) -> str:
    labels = [r["label"] for r in classification_rows()]
    assert 0.4 < labels.count("fruit") / len(labels) < 0.6  # chance is about 0.5
    return write_jsonl(tmp_path_factory.mktemp("data") / "cls.jsonl", classification_rows())


def make_base(directory, family: str, **overrides) -> str:
    """A tiny freshly initialised model directory with a tokenizer trained on the task's words."""
    kind, vocab = TOKENIZERS[family]
    texts = [r["text"] for r in classification_rows()] + ["fruit tool", "Below is an instruction. ### Response:"]
    tokenizer = train_tokenizer(texts, kind, vocab)
    data = dict(name=f"tiny-{family}", family=family, vocab_size=tokenizer.get_vocab_size(), d_model=64,
                n_layers=2, n_heads=4, d_ff=256, max_seq_len=256, dropout=0.0)
    if family == "t5":
        data.update(relative_buckets=8, relative_max_distance=16)
    data.update(overrides)
    directory.mkdir(parents=True)
    save_model(build_model(config_from_dict(data, "<test>"), seed=0), directory)
    save_tokenizer(tokenizer, directory)
    return str(directory)


@pytest.fixture(scope="module")
def gpt_base(tmp_path_factory) -> str:
    return make_base(tmp_path_factory.mktemp("bases") / "gpt", "gpt")


@pytest.fixture(scope="module")
def probe(gpt_base, cls_data):
    """A fixed batch of held-out-style inputs, padded."""
    tokenizer = load_tokenizer(gpt_base)
    ids = encode_plain(tokenizer, [r["text"] for r in classification_rows(8, seed=1)])
    return collate([{"input_ids": x, "attention_mask": [1] * len(x)} for x in ids], special_ids(tokenizer).pad)


def outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def lora_classifier(base: str, data: str, out, probe) -> tuple[dict, object, torch.Tensor]:
    """LoRA classification (rank 4, 60 steps); keeps the outputs of the trained model as training ends."""
    final = {}

    def keep_outputs(trainer):
        if trainer.step == trainer.args.steps:
            final["logits"] = outputs(trainer.model, probe)
            trainer.model.train()

    summary = finetune(base, data, str(out), TrainFlags(**{**FAST, "steps": 60, "lr": 5e-3}),
                       {"method": "lora", "task": "classify", "lora_rank": 4, "lora_alpha": 8},
                       on_step=keep_outputs, log=quiet)
    return summary, out, final["logits"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, gpt_base, cls_data, probe):
    return lora_classifier(gpt_base, cls_data, tmp_path_factory.mktemp("runs") / "lora", probe)


def test_full_fine_tuning_learns_the_classification_task(tmp_path, gpt_base, cls_data):
    summary = finetune(gpt_base, cls_data, str(tmp_path / "full"), TrainFlags(**{**FAST, "steps": 60, "lr": 2e-3}),
                       {"method": "full", "task": "classify"}, log=quiet)
    assert summary["val_examples"] == 40 and summary["trainable_share"] == 1.0
    assert summary["val_accuracy"] >= 0.8, summary  # chance: 0.5
    reloaded = load_finetuned(tmp_path / "full")  # tuned weights + head from adapter/
    assert reloaded.head.out_features == 2
    assert not torch.equal(load_model(tmp_path / "full").tok_emb.weight, load_model(gpt_base).tok_emb.weight)


def test_lora_learns_the_task_training_under_2_percent_of_parameters(lora_run):
    summary, out, _ = lora_run
    assert summary["val_accuracy"] >= 0.8, summary
    # rank 4 on q and v of 2 layers (64 -> 64), plus the 64 -> 2 head with bias
    assert summary["trainable_params"] == 2 * 2 * 4 * (64 + 64) + 64 * 2 + 2
    assert summary["trainable_share"] < 0.02
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["method"] == "lora" and meta["labels"] == ["fruit", "tool"] and meta["lora_targets"] == ["q", "v"]
    assert set(load_file(out / "adapter" / "adapter.safetensors")) == {
        *(f"model.decoder.blocks.{i}.attn.{p}_proj.lora_{m}" for i in range(2) for p in "qv" for m in "AB"),
        "head.weight", "head.bias"}


def test_a_fresh_base_with_the_saved_adapter_gives_the_outputs_at_the_end_of_training(lora_run, gpt_base, probe):
    _, out, final = lora_run
    assert torch.equal(outputs(load_finetuned(out), probe), final)
    assert torch.equal(outputs(load_finetuned(out, base=gpt_base), probe), final)


def test_merged_lora_equals_base_plus_adapter(lora_run, tmp_path, probe):
    _, out, final = lora_run
    merge(out, tmp_path / "merged")
    merged = load_finetuned(tmp_path / "merged")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert (outputs(merged, probe) - final).abs().max() < 1e-5
    adapted, plain = load_finetuned(out), load_model(tmp_path / "merged")
    with torch.no_grad():
        delta = language_model(adapted)(probe["input_ids"]).hidden_states - plain(probe["input_ids"]).hidden_states
    assert delta.abs().max() < 1e-5


def test_instruction_tuning_scores_only_the_response(tmp_path, gpt_base):
    rows = [{"instruction": "Name a fruit.", "output": "apple"},
            {"instruction": "Name a tool.", "input": "for wood", "output": "a saw"}] * 5
    data = write_jsonl(tmp_path / "instruct.jsonl", rows)
    tokenizer = load_tokenizer(gpt_base)
    special = special_ids(tokenizer)
    task = build_task("instruct", "gpt", tokenizer, special, data, 256, 4, 0, 2)
    first, second = (task.train.examples[i] for i in (0, 1))
    for row, example in ((rows[0], first), (rows[1], second)):
        prompt = encode_plain(tokenizer, [instruction_prompt(row["instruction"], row.get("input", ""))])[0]
        response = encode_plain(tokenizer, [row["output"]])[0] + [special.eos]
        assert example["input_ids"] == (prompt + response)[:-1]
        assert example["labels"] == [IGNORE_INDEX] * (len(prompt) - 1) + response  # label i is token i + 1
    batch = collate([first, second], special.pad)
    short = len(first["labels"])
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, short:] == 0).all()

    t5_tokenizer = train_tokenizer([instruction_prompt("Name a tool.", "for wood"), "apple a saw"], "unigram", 200)
    t5_special = special_ids(t5_tokenizer)
    t5 = build_task("instruct", "t5", t5_tokenizer, t5_special, data, 256, 4, 0, 2).train.examples[1]
    prompt = encode_plain(t5_tokenizer, [instruction_prompt("Name a tool.", "for wood")])[0]
    response = encode_plain(t5_tokenizer, ["a saw"])[0] + [t5_special.eos]
    assert t5["input_ids"] == prompt + [t5_special.eos]  # the prompt goes to the encoder, unscored
    assert t5["labels"] == response and t5["decoder_input_ids"] == [t5_special.pad] + response[:-1]

    summary = finetune(gpt_base, data, str(tmp_path / "run"), TrainFlags(**{**FAST, "seq_len": 256, "steps": 2}),
                       {"method": "lora", "task": "instruct"}, log=quiet)
    assert summary["val_perplexity"] > 1 and (tmp_path / "run" / "peft" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method,family", [("adapter", "gpt"), ("prompt", "gpt"), ("adapter", "t5")])
def test_adapters_and_prompt_tuning_train_with_the_base_frozen(tmp_path, cls_data, cli, method, family):
    base = make_base(tmp_path / "base", family)
    before = load_file(f"{base}/model.safetensors")
    trained = {}

    def keep_model(trainer):
        trained["model"] = trainer.model

    # The family objective on the texts: a random base barely lets a prompt or adapter move a class head.
    summary = finetune(base, cls_data, str(tmp_path / "out"), TrainFlags(**{**FAST, "steps": 30, "lr": 1e-2}),
                       {"method": method, "task": "lm", "adapter_size": 8, "prompt_tokens": 4},
                       on_step=keep_model, log=quiet)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < losses[0] - 0.02, losses
    state = language_model(trained["model"]).state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in before.items())  # bit-identical base
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert 0 < summary["trainable_params"] < 0.3 * summary["total_params"]
    with torch.no_grad():
        ids = torch.randint(5, trained["model"].config.vocab_size, (2, 9))
        extra = {"decoder_input_ids": ids[:, :4]} if family == "t5" else {}
        reloaded = load_finetuned(tmp_path / "out")
        assert torch.equal(reloaded(ids, **extra).logits, trained["model"].eval()(ids, **extra).logits)
    result = cli("merge", tmp_path / "out", "--out", tmp_path / "merged")
    assert result.exit_code == 2 and "only LoRA merges" in result.stderr


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_prompt_tuning_puts_the_virtual_tokens_where_each_family_reads_them(family):
    from llmcli.finetune.methods import FinetuneSpec, attach

    config = config_from_dict(dict(name="p", family=family, vocab_size=50, d_model=16, n_layers=1, n_heads=2,
                                   d_ff=32, max_seq_len=32, relative_buckets=8, relative_max_distance=16), "<test>")
    model = attach(build_model(config, seed=0), FinetuneSpec("prompt", "lm", prompt_tokens=3))
    embedded = []
    model.model.tok_emb.register_forward_hook(lambda module, args, out: embedded.append(out))
    ids = torch.randint(1, 50, (2, 6))
    extra = {"decoder_input_ids": ids[:, :4]} if family == "t5" else {}
    out = model(ids, attention_mask=torch.ones_like(ids), **extra)
    assert out.logits.shape[:2] == (ids if family != "t5" else ids[:, :4]).shape  # virtual positions dropped
    start = 1 if family == "bert" else 0  # BERT keeps [CLS] first, for the pooler
    prompt = model.model.tok_emb.prompt
    assert torch.equal(embedded[0][:, start:start + 3], prompt.expand(2, -1, -1))
    assert torch.equal(embedded[0][:, :start], model.model.tok_emb.weight[ids[:, :start]])
    out.logits.sum().backward()
    assert prompt.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if name != "model.tok_emb.prompt")


def test_lora_exports_in_peft_format_that_peft_loads_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from llmcli.finetune.peft_export import export_peft
    from llmcli.interop.hf import convert_to_hf

    transformers.logging.set_verbosity_error()
    targets = {"gpt": ["q", "v", "down"], "bert": ["q", "k", "v", "o", "up", "down"], "t5": ["q", "v", "o", "up"]}
    hf_classes = {"gpt": transformers.GPT2LMHeadModel, "bert": transformers.BertForMaskedLM,
                  "t5": transformers.T5ForConditionalGeneration}
    for family, names in targets.items():
        config = config_from_dict(dict(name=f"p-{family}", family=family, vocab_size=101, d_model=32, n_layers=2,
                                       n_heads=4, d_ff=64, max_seq_len=32, dropout=0.0, relative_buckets=8,
                                       relative_max_distance=16), "<test>")
        base_dir = tmp_path / family / "base"
        base_dir.mkdir(parents=True)
        model = build_model(config, seed=0)
        save_model(model, base_dir)
        add_lora(model, rank=2, alpha=6.0, dropout=0.0, targets=names)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoRALinear):
                    module.lora_B.normal_(0.0, 0.5)  # a trained-looking update, not the zero init
        export_peft(model, base_dir, tmp_path / family / "peft")
        convert_to_hf(base_dir, tmp_path / family / "hf")
        hf = peft.PeftModel.from_pretrained(hf_classes[family].from_pretrained(tmp_path / family / "hf"),
                                            tmp_path / family / "peft").eval()
        ids = torch.randint(1, 101, (2, 7), generator=torch.Generator().manual_seed(0))
        extra = {"decoder_input_ids": ids[:, :5]} if family == "t5" else {}
        with torch.no_grad():
            ours, theirs = model.eval()(ids, **extra).logits, hf(input_ids=ids, **extra).logits
            hf_base = hf.get_base_model()
            with hf.disable_adapter():
                untouched = hf_base(input_ids=ids, **extra).logits
        assert (ours - theirs).abs().max() < 1e-4, family
        assert (ours - untouched).abs().max() > 1e-3, family  # the adapter does change the outputs


def test_bad_inputs_exit_2_with_a_message(tmp_path, cli, gpt_base, cls_data, lora_run):
    rows = classification_rows(30)
    del rows[2]["label"]
    missing = write_jsonl(tmp_path / "missing.jsonl", rows)
    rows = classification_rows(30)
    rows[9]["label"] = "vegetable"  # line 10: the first held-out example
    unseen = write_jsonl(tmp_path / "unseen.jsonl", rows)
    instruct = write_jsonl(tmp_path / "instruct.jsonl", [{"instruction": "x", "output": "y"}] * 3)
    bert = make_base(tmp_path / "bert", "bert")
    other = make_base(tmp_path / "other", "gpt", d_model=32)
    _, lora_out, _ = lora_run

    def finetune_cli(*args):
        return cli("finetune", gpt_base, "--out", tmp_path / "out", "--force", "--steps", "1", *args)

    cases = [
        (finetune_cli("--method", "lora", "--task", "classify", "--data", missing),
         "missing.jsonl:3: missing field 'label'"),
        (finetune_cli("--method", "lora", "--task", "classify", "--data", unseen),
         "unseen.jsonl:10: label 'vegetable' is in the held-out split"),
        (finetune_cli("--method", "qlora", "--task", "classify", "--data", cls_data), "--method 'qlora' is not one of"),
        (finetune_cli("--method", "lora", "--task", "summarize", "--data", cls_data),
         "--task 'summarize' is not one of"),
        (finetune_cli("--method", "lora", "--lora-targets", "q,x", "--task", "classify", "--data", cls_data),
         "unknown target 'x'"),
        (cli("finetune", bert, "--out", tmp_path / "b", "--method", "lora", "--task", "instruct", "--data", instruct),
         "BERT is an encoder only"),
        (cli("merge", lora_out, "--base", other, "--out", tmp_path / "m"), "a different model from"),
    ]
    for result, message in cases:
        assert result.exit_code == 2, (message, result.output)
        assert message in result.stderr and result.stderr.startswith("error: ")
        assert result.stderr.count("\n") <= 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "b").exists()  # refused before writing anything
    with pytest.raises(Exception, match="d_model 64 there, 32 here"):
        load_finetuned(lora_out, base=other)


def test_generate_on_a_lora_run_uses_its_adapter(tmp_path, gpt_base, cls_data, cli, lora_run):
    out = tmp_path / "lm"
    finetune(gpt_base, cls_data, str(out), TrainFlags(**{**FAST, "steps": 10, "lr": 1e-2}), {"method": "lora", "task": "lm"},
             log=quiet)
    assert cli("merge", out, "--out", tmp_path / "merged").exit_code == 0
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        base, merged = (load_model(d)(ids).logits for d in (gpt_base, tmp_path / "merged"))
    assert (base - merged).abs().max() > 1e-3  # the adapter changes the outputs
    args = ("--prompt", "apple", "--max-new-tokens", 6, "--temperature", 0, "--json")
    run, folded = (cli("generate", d, *args) for d in (out, tmp_path / "merged"))
    assert run.exit_code == 0 and folded.exit_code == 0, run.output
    assert json.loads(run.stdout)["tokens"] == json.loads(folded.stdout)["tokens"]
    refused = cli("generate", lora_run[1], "--prompt", "apple")  # a classifier has no LM output
    assert refused.exit_code == 2 and "classification run" in refused.stderr


def test_config_replays_a_finetuning_run_bit_identically(tmp_path, cli, gpt_base, cls_data):
    first = cli("finetune", gpt_base, "--out", tmp_path / "a", "--method", "lora", "--task", "classify",
                "--data", cls_data, "--steps", "3", "--seed", "2")
    assert first.exit_code == 0, first.output
    replay = cli("finetune", "--config", tmp_path / "a" / "run.toml", "--out", tmp_path / "b")
    assert replay.exit_code == 0, replay.output
    written = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert written
    for name in written:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    from llmcli.training.replay import read_run_config

    assert read_run_config(tmp_path / "a") == read_run_config(tmp_path / "b")


@pytest.fixture(scope="module")
def quantized_base(tmp_path_factory, gpt_base) -> str:
    """gpt_base with int4 weights (groups of 32), written as `llmcli quantize` writes it."""
    import shutil

    from llmcli.compression.quantize import quantize_model
    from llmcli.model_dir import QUANTIZATION_FILE, write_json

    out = tmp_path_factory.mktemp("bases") / "int4"
    out.mkdir()
    model = load_model(gpt_base)
    spec, _ = quantize_model(model, "int4", 32)
    save_model(model, out)
    write_json(out / QUANTIZATION_FILE, spec)
    shutil.copyfile(f"{gpt_base}/tokenizer.json", out / "tokenizer.json")
    return str(out)


def test_lora_on_a_quantized_model_learns_with_its_integers_frozen(tmp_path, quantized_base, gpt_base, cls_data,
                                                                    probe):
    """QLoRA: the int4 weights stay as stored, gradients flow through them to the LoRA factors below; the
    adapter reloads exactly, refuses to fold into integers, and folds into the full-precision base instead."""
    from llmcli.errors import UserError
    from llmcli.models.quantized import QuantizedLinear

    summary, out, final = lora_classifier(quantized_base, cls_data, tmp_path / "qlora", probe)
    assert summary["val_accuracy"] >= 0.8, summary  # chance: 0.5
    assert load_file(out / "model.safetensors").keys() == load_file(f"{quantized_base}/model.safetensors").keys()
    for name, tensor in load_file(out / "model.safetensors").items():
        assert torch.equal(tensor, load_file(f"{quantized_base}/model.safetensors")[name])
    adapted = load_finetuned(out)
    assert isinstance(language_model(adapted).decoder.blocks[0].attn.q_proj.base, QuantizedLinear)
    assert torch.equal(outputs(adapted, probe), final)

    with pytest.raises(UserError, match="trained on a quantized \\(int4\\) model.*--base FULL_PRECISION_DIR"):
        merge(out, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    merge(out, tmp_path / "merged", base=gpt_base)  # the same LoRA on the float weights it approximates
    merged = outputs(load_finetuned(tmp_path / "merged"), probe)
    assert (merged - final).norm() < 0.1 * final.norm()


@pytest.mark.parametrize("method", ["adapter", "prompt"])
def test_adapters_and_prompts_train_on_a_quantized_model(tmp_path, quantized_base, cls_data, method):
    summary = finetune(quantized_base, cls_data, str(tmp_path / method), TrainFlags(**{**FAST, "steps": 4}),
                       {"method": method, "task": "classify"}, log=quiet)
    assert summary["step"] == 4 and 0 < summary["trainable_share"] < 0.5 and math.isfinite(summary["val_loss"])


def test_full_fine_tuning_of_a_quantized_model_is_refused(tmp_path, quantized_base, cls_data, cli):
    result = cli("finetune", quantized_base, "--method", "full", "--task", "classify", "--data", cls_data,
                 "--out", tmp_path / "full")
    assert result.exit_code == 2 and "is quantized (int4), and --method full would train its integer" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "full").exists()
