"""Chat templates, EOS lists, `generate --messages`, `llmcli chat`: against transformers' apply_chat_template.

The templates in fixtures/chat_templates are the published ones of each model (as llama.cpp keeps copies of them
in models/templates); the tokenizers are tiny byte-level BPEs that know each family's special tokens.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from llmcli.chat import ChatSession, chat_template_for, render_ids
from llmcli.chat_template import read_chat_template
from llmcli.errors import UserError
from llmcli.generation import generate_text
from llmcli.model_dir import load_model, load_tokenizer, save_model
from llmcli.models import build_model

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
# template file -> (special tokens the tokenizer knows, bos_token, eos_token)
FAMILIES = {
    "meta-llama-Llama-3.1-8B-Instruct.jinja": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "Qwen-Qwen2.5-7B-Instruct.jinja": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>"),
    "Qwen-Qwen3-0.6B.jinja": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], None,
                              "<|im_end|>"),
    "google-gemma-2-2b-it.jinja": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "microsoft-Phi-3.5-mini-instruct.jinja": (
        ["<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|endoftext|>"),
    "HuggingFaceTB-SmolLM3-3B.jinja": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>"),
    "ibm-granite-granite-3.3-2B-Instruct.jinja": (
        ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"], None, "<|end_of_text|>"),
}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": "You answer in one word."},
               {"role": "user", "content": "Name a colour."}],
    "multi-turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Hello there"},
                   {"role": "assistant", "content": "Hi! How can I help?"},
                   {"role": "user", "content": "Tell me a fact about the sea."}],
    "no system, two turns": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                             {"role": "user", "content": "And 3+3?"}],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "The city"}},
                                               "required": ["city"]}}}]


def byte_bpe(special: list[str], corpus: str, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([corpus], trainer)
    return tokenizer


def checkpoint_dir(root: Path, template_name: str, corpus: str, source: str = "jinja") -> Path:
    """A directory as a Hugging Face instruct checkpoint ships its tokenizer: tokenizer.json, tokenizer_config.json
    and the chat template (its own file, or inside tokenizer_config.json)."""
    special, bos, eos = FAMILIES[template_name]
    directory = root / template_name.removesuffix(".jinja")
    directory.mkdir(parents=True, exist_ok=True)
    byte_bpe(special, corpus).save(str(directory / "tokenizer.json"))
    template = (TEMPLATES / template_name).read_text()
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos,
                        "clean_up_tokenization_spaces": False}
    if source == "jinja":
        (directory / "chat_template.jinja").write_text(template)
    elif source == "string":
        tokenizer_config["chat_template"] = template
    else:  # a list of named templates
        tokenizer_config["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('wrong one') }}"},
                                             {"name": "default", "template": template}]
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def theirs(directory: Path, messages, tools=None, tokenize=True):
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    out = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=tokenize,
                                        return_dict=False)
    return list(out) if tokenize else out


@pytest.fixture(scope="module")
def text(corpus):
    return open(corpus).read()[:20000]


@pytest.mark.parametrize("template_name, source", [(name, "jinja") for name in sorted(FAMILIES)] + [
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "string"), ("meta-llama-Llama-3.1-8B-Instruct.jinja", "named")])
def test_prompt_ids_equal_transformers_apply_chat_template(tmp_path, text, template_name, source):
    """chat_template.jinja, tokenizer_config.json's string, or its list of named templates ("default")."""
    directory = checkpoint_dir(tmp_path, template_name, text, source)
    template = read_chat_template(directory)
    tokenizer = load_tokenizer(directory)
    compared = 0
    for name, messages in CONVERSATIONS.items():
        if "gemma" in template_name and messages[0]["role"] == "system":
            with pytest.raises(UserError, match="System role not supported"):
                render_ids(template, tokenizer, messages)
            continue
        rendered, ids = render_ids(template, tokenizer, messages)
        assert rendered == theirs(directory, messages, tokenize=False), name
        assert ids == theirs(directory, messages), name
        compared += 1
    assert compared >= 2


@pytest.mark.parametrize("template_name", ["meta-llama-Llama-3.1-8B-Instruct.jinja", "Qwen-Qwen2.5-7B-Instruct.jinja",
                                           "ibm-granite-granite-3.3-2B-Instruct.jinja"])
def test_tools_render_as_transformers_renders_them(tmp_path, text, template_name):
    """tojson(indent=4) and the tool layout of the tool-use templates."""
    directory = checkpoint_dir(tmp_path, template_name, text)
    messages = CONVERSATIONS["system"]
    ours = read_chat_template(directory).render(messages, add_generation_prompt=True, tools=TOOLS)
    assert ours == theirs(directory, messages, tools=TOOLS, tokenize=False)
    assert "get_weather" in ours


def test_a_template_that_writes_bos_gets_one_bos(tmp_path, text):
    directory = checkpoint_dir(tmp_path, "meta-llama-Llama-3.2-3B-Instruct.jinja", text)
    tokenizer = load_tokenizer(directory)
    _, ids = render_ids(read_chat_template(directory), tokenizer, CONVERSATIONS["one turn"])
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1


@pytest.mark.parametrize("source, message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "the sandbox forbids"),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "the sandbox forbids"),
    ("{% include '/etc/passwd' %}", "/etc/passwd"),
    ("{% for m in messages %}{{ m.content }}{% endfor", "not a valid Jinja template"),
])
def test_the_sandbox_keeps_a_template_from_files_and_python_internals(tmp_path, text, source, message):
    directory = checkpoint_dir(tmp_path, "Qwen-Qwen2.5-7B-Instruct.jinja", text)
    (directory / "chat_template.jinja").write_text(source)
    with pytest.raises(UserError, match=message) as raised:
        read_chat_template(directory).render(CONVERSATIONS["one turn"])
    assert "root:" not in str(raised.value)


# ---------------------------------------------------------------- generation


def instruct_model_dir(tmp_path: Path, text: str, template_name="meta-llama-Llama-3.2-3B-Instruct.jinja",
                       stops: list[str] = ("<|eom_id|>", "<|end_of_text|>")) -> Path:
    """A tiny Llama-style model beside a checkpoint's tokenizer files, ending at <|eot_id|> and `stops`."""
    directory = checkpoint_dir(tmp_path, template_name, text)
    tokenizer = load_tokenizer(directory)
    special, bos, eos = FAMILIES[template_name]
    config = tiny_config("gpt", position="rope", norm="rmsnorm", activation="swiglu", bias=False, n_kv_heads=2,
                         vocab_size=tokenizer.get_vocab_size(), max_seq_len=256, tokenizer="bpe",
                         bos_token_id=tokenizer.token_to_id(bos) if bos else None,
                         eos_token_id=tokenizer.token_to_id(eos),
                         stop_token_ids=[tokenizer.token_to_id(t) for t in stops] or None)
    save_model(build_model(config, seed=0).eval(), directory)
    return directory


def test_generate_messages_feeds_the_rendered_conversation(tmp_path, text, cli):
    directory = instruct_model_dir(tmp_path, text)
    messages = CONVERSATIONS["multi-turn"]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    result = cli("generate", directory, "--messages", tmp_path / "m.json", "--temperature", 0, "--max-new-tokens", 6,
                 "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prompt_ids"] == theirs(directory, messages)
    assert out["prompt_text"] == theirs(directory, messages, tokenize=False)
    assert out["prompt_tokens"] == len(out["prompt_ids"]) and 1 <= out["new_tokens"] <= 6


def test_every_id_of_the_eos_list_ends_generation(tmp_path, text):
    """Greedy tokens without any end id, then with the 5th of them as the second or third id of the EOS list:
    generation stops right there."""
    directory = instruct_model_dir(tmp_path, text, stops=[])
    model, tokenizer = load_model(directory), load_tokenizer(directory)
    model.config.eos_token_id = tokenizer.token_to_id("<|end_of_text|>")
    free = generate_text(model, tokenizer, ["The sea"], 12, temperature=0)[0].tokens
    assert len(free) == 12 and model.config.eos_token_id not in free
    target = free[4]
    for stops in ([target], [tokenizer.token_to_id("<|eom_id|>"), target]):  # second id, third id
        model.config.stop_token_ids = stops
        stopped = generate_text(model, tokenizer, ["The sea"], 12, temperature=0)[0]
        assert stopped.tokens == free[:free.index(target) + 1]


def test_a_stop_string_ends_a_sequence_and_is_left_out(tmp_path, text):
    directory = instruct_model_dir(tmp_path, text, stops=[])
    model, tokenizer = load_model(directory), load_tokenizer(directory)
    free = generate_text(model, tokenizer, ["The sea"], 12, temperature=0)[0]
    stop = free.completion[len(free.completion) // 2:][:3]
    assert stop.strip()
    streamed = []
    stopped = generate_text(model, tokenizer, ["The sea"], 12, temperature=0, stop=[stop],
                            on_text=streamed.append, echo_prompt=False)[0]
    assert stopped.completion == free.completion[:free.completion.index(stop)]
    assert "".join(streamed) == stopped.completion and len(stopped.tokens) < len(free.tokens)


def test_converted_eos_lists_and_templates_go_both_ways(tmp_path, text):
    from llmcli.interop.hf import convert_from_hf, convert_to_hf

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=1))
    hf.save_pretrained(tmp_path / "hf")
    source = checkpoint_dir(tmp_path, "meta-llama-Llama-3.1-8B-Instruct.jinja", text)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "hf" / name).write_bytes((source / name).read_bytes())
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 4, 5]}))
    config = convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    assert (config.eos_token_id, config.stop_token_ids) == (1, [4, 5])
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == (source / "chat_template.jinja").read_text()
    convert_to_hf(tmp_path / "ours", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] == [1, 4, 5]
    assert theirs(tmp_path / "back", CONVERSATIONS["system"]) == theirs(tmp_path / "hf", CONVERSATIONS["system"])


def test_no_template_and_a_template_error_are_exit_2(tmp_path, text, cli):
    directory = instruct_model_dir(tmp_path, text, template_name="google-gemma-2-2b-it.jinja", stops=[])
    (tmp_path / "system.json").write_text(json.dumps(CONVERSATIONS["system"]))
    refused = cli("generate", directory, "--messages", tmp_path / "system.json")
    assert refused.exit_code == 2 and "System role not supported" in refused.stderr
    (directory / "chat_template.jinja").unlink()
    missing = cli("generate", directory, "--messages", tmp_path / "system.json")
    assert missing.exit_code == 2 and "has no chat template" in missing.stderr and "--template FILE" in missing.stderr
    chat_missing = cli("chat", directory)
    assert chat_missing.exit_code == 2 and "--template FILE" in chat_missing.stderr
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    given = cli("generate", directory, "--messages", tmp_path / "system.json", "--template", tmp_path / "t.jinja",
                "--max-new-tokens", 2, "--json")
    assert given.exit_code == 0, given.stderr
    assert json.loads(given.stdout)["prompt_text"].startswith("system: You answer in one word.\nuser: Name")
    chat = cli("chat", directory.parent / "nothing-here")
    assert chat.exit_code == 2 and "Traceback" not in chat.output


def test_the_oldest_turns_go_when_the_history_no_longer_fits(tmp_path, text):
    directory = instruct_model_dir(tmp_path, text, stops=[])
    model, tokenizer = load_model(directory), load_tokenizer(directory)
    session = ChatSession(model, tokenizer, chat_template_for(directory, model, tokenizer), system="Be brief.",
                          max_new_tokens=8, temperature=0)
    drops = [session.send(f"Tell me fact number {i} about the sea, please.")[1] for i in range(8)]
    assert drops[0] == 0 and sum(drops) > 0
    assert session.turns[0]["role"] == "user" and "number 0 " not in session.turns[0]["content"]
    _, ids = render_ids(session.template, tokenizer, session.messages(session.turns[:-1]))
    assert len(ids) + 8 <= model.config.max_seq_len


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs g++")
def test_a_compiled_chat_replies_as_the_eager_one(tmp_path, text):
    """chat --compile: the decode step compiled once serves every turn (each a longer context) with the replies the
    eager model gives."""
    from llmcli.generation import load_for_inference
    from llmcli.runtime import compile_decode

    directory = instruct_model_dir(tmp_path, text, stops=[])
    replies = {}
    for compiled in (False, True):
        model, tokenizer = load_for_inference(directory, "cpu", "fp32")
        if compiled:
            assert compile_decode(model, torch.device("cpu"), print)
        session = ChatSession(model, tokenizer, chat_template_for(directory, model, tokenizer), max_new_tokens=8,
                              temperature=1.0, seed=0)  # sampled: varied tokens, the same draws on the same logits
        replies[compiled] = [session.send(line)[0].tokens for line in ("Hello there", "Tell me about the sea", "More")]
    assert replies[True] == replies[False] and len(set(sum(replies[False], []))) > 3


def test_chat_in_a_terminal_two_turns_reset_and_ctrl_d(tmp_path, text):
    """As a person would type: two messages, /reset, one more, Ctrl-D."""
    directory = instruct_model_dir(tmp_path, text)
    main, child = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "dumb"}
    process = subprocess.Popen([sys.executable, "-m", "llmcli", "chat", str(directory), "--temperature", "0",
                                "--max-new-tokens", "6", "--device", "cpu"], stdin=child, stdout=child, stderr=child,
                               env=env, close_fds=True)
    os.close(child)
    seen = b""

    def wait_for_prompt(count: int, timeout: float = 120.0) -> None:
        """Read the terminal until the `count`-th "> " prompt has appeared."""
        nonlocal seen
        end = time.time() + timeout
        while seen.count(b"> ") < count:
            assert time.time() < end, seen.decode(errors="replace")
            if select.select([main], [], [], 0.5)[0]:
                seen += os.read(main, 4096)

    try:
        wait_for_prompt(1)
        for count, line in enumerate((b"Hello there\n", b"Tell me about the sea\n", b"/reset\n", b"Hi again\n"), 2):
            os.write(main, line)
            wait_for_prompt(count)
        os.write(main, b"\x04")  # Ctrl-D
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(main)
    output = seen.decode(errors="replace")
    assert "Traceback" not in output and "(a new conversation)" in output
    assert output.count("> ") >= 5


# ---------------------------------------------------------------- instruction tuning on conversations


@pytest.mark.parametrize("template_name, end", [("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|eot_id|>"),
                                                ("Qwen-Qwen2.5-7B-Instruct.jinja", "<|im_end|>\n"),
                                                ("google-gemma-2-2b-it.jinja", "<end_of_turn>\n")])
def test_only_the_assistant_turns_are_scored(tmp_path, text, template_name, end):
    """The scored positions are exactly the assistant replies and their end-of-turn marks, as the template renders
    them: counted here by tokenizing each reply on its own."""
    from llmcli.data import IGNORE_INDEX
    from llmcli.finetune.tasks import conversation_example

    directory = checkpoint_dir(tmp_path, template_name, text)
    tokenizer, template = load_tokenizer(directory), read_chat_template(directory)
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
                {"role": "user", "content": "A fact about the sea?"},
                {"role": "assistant", "content": "The sea covers most of the planet."}]
    example = conversation_example(template, tokenizer, messages, seq_len=512)
    scored = [label for label in example["labels"] if label != IGNORE_INDEX]
    replies = [m["content"] + end for m in messages if m["role"] == "assistant"]
    assert len(scored) == sum(len(tokenizer.encode(r, add_special_tokens=False).ids) for r in replies)
    assert tokenizer.decode(scored, skip_special_tokens=False) == "".join(replies)
    truncated = conversation_example(template, tokenizer, messages, seq_len=len(example["input_ids"]) - 5)
    assert sum(label != IGNORE_INDEX for label in truncated["labels"]) == len(scored) - 5


def test_finetune_instruct_on_conversations(tmp_path, text, cli):
    directory = instruct_model_dir(tmp_path, text)
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say the number {i}."},
        {"role": "assistant", "content": f"{i}"}]}) for i in range(12)) + "\n")
    result = cli("finetune", directory, "--method", "lora", "--task", "instruct", "--data", data, "--out",
                 tmp_path / "tuned", "--steps", 3, "--batch-size", 2, "--seq-len", 128, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["train_examples"] == 11 and summary["val_examples"] == 1
    tokenizer = load_tokenizer(directory)
    expected = sum(len(tokenizer.encode(f"{i}<|eot_id|>", add_special_tokens=False).ids) for i in range(12))
    assert summary["scored_tokens"] == expected
    assert (tmp_path / "tuned" / "chat_template.jinja").is_file()
    (tmp_path / "m.json").write_text(json.dumps([{"role": "user", "content": "Say the number 3."}]))
    assert cli("generate", tmp_path / "tuned", "--messages", tmp_path / "m.json", "--max-new-tokens", 3).exit_code == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" +
                   json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    refused = cli("finetune", directory, "--method", "lora", "--task", "instruct", "--data", bad, "--out",
                  tmp_path / "bad", "--steps", 1)
    assert refused.exit_code == 2 and "bad.jsonl:1: the conversation has no assistant message" in refused.stderr
