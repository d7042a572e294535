"""Fine-tuning data: plain text (lm), instruction/response pairs or conversations (instruct) and labelled texts
(classify).

Every 10th JSONL line is held out for validation, as `llmcli.data.split_documents` holds out every
10th document. Batches are a pure function of (seed, step), as in pre-training, so resume is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llmcli.data import IGNORE_INDEX, VAL_EVERY, PretrainingData, document_stream, read_corpus, split_documents
from llmcli.chat_template import ChatTemplate, check_messages
from llmcli.errors import UserError
from llmcli.finetune.heads import classify_eval, classify_loss, text_to_text_eval
from llmcli.tokenizer import SpecialIds, encode_plain
from llmcli.runtime import evaluate, family_loss

TASKS = ("lm", "instruct", "classify")
INSTRUCT_ON_BERT = ("--task instruct needs a model that generates (gpt or t5); BERT is an encoder only: "
                    "use --task classify or --task lm")

# Stanford Alpaca's prompt (Taori et al. 2023, github.com/tatsu-lab/stanford_alpaca, train.py).
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def instruction_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt; the response follows it directly."""
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ---------------------------------------------------------------- JSONL records


@dataclass
class Record:
    line: int  # 1-based line number in the file, for messages
    fields: dict


def read_records(path: str | Path, required: tuple[str, ...], optional: tuple[str, ...] = (),
                 label_field: str | None = None) -> list[Record]:
    """JSON objects, one a line, with string fields `required` (and `optional`, if present).

    `label_field` may also hold an integer or a boolean; it is turned into its string.
    """
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        what = "no such file" if not path.exists() else "not a .jsonl file"
        raise UserError(f"{path}: {what}; pass --data a JSONL file with one object a line, "
                        f"fields {', '.join(required + optional)}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    example = "{" + ", ".join(f'"{name}": "..."' for name in required) + "}"
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); every line must look like {example}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: not a JSON object; every line must look like {example}")
        if label_field and isinstance(record.get(label_field), (int, bool)):
            record[label_field] = json.dumps(record[label_field])
        for name in required:
            if not isinstance(record.get(name), str):
                problem = "missing field" if name not in record else "non-string field"
                raise UserError(f"{path}:{number}: {problem} '{name}'; every line must look like {example}")
        for name in optional:
            if record.get(name) is not None and not isinstance(record[name], str):
                raise UserError(f"{path}:{number}: field '{name}' must be a string")
        records.append(Record(number, record))
    if len(records) < 2:
        raise UserError(f"{path}: {len(records)} examples; need at least 2 (every 10th is held out for validation)")
    return records


def split_records(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(train, validation): every 10th record, or the last one of fewer than 10."""
    if len(records) < VAL_EVERY:
        return records[:-1], records[-1:]
    return ([r for i, r in enumerate(records) if i % VAL_EVERY != VAL_EVERY - 1],
            records[VAL_EVERY - 1::VAL_EVERY])


# ---------------------------------------------------------------- examples and batches

PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}  # others: the pad id


class ExampleData:
    """Batches of fixed examples; each epoch is a fresh permutation seeded by (seed, epoch)."""

    def __init__(self, examples: list[dict], pad_id: int, batch_size: int, seed: int) -> None:
        self.examples, self.pad_id, self.batch_size, self.seed = examples, pad_id, batch_size, seed
        self._orders: dict[int, list[int]] = {}
        mean_length = sum(len(e["input_ids"]) for e in examples) / len(examples)
        self.tokens_per_batch = max(1, round(batch_size * mean_length))

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=generator).tolist()}
        return self._orders[epoch]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of training step `step`: the same for the same (seed, step)."""
        n = len(self.examples)
        picks = [self._order(i // n)[i % n] for i in range(step * self.batch_size, (step + 1) * self.batch_size)]
        return collate([self.examples[i] for i in picks], self.pad_id)

    def eval_batches(self, examples: list[dict], max_batches: int) -> list[dict[str, torch.Tensor]]:
        """Consecutive held-out examples, the same every call."""
        chunks = [examples[i:i + self.batch_size] for i in range(0, len(examples), self.batch_size)]
        return [collate(chunk, self.pad_id) for chunk in chunks[:max_batches]]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every sequence field to the longest in the batch; integer fields become a vector."""
    batch = {}
    for key, first in examples[0].items():
        if isinstance(first, int):
            batch[key] = torch.tensor([e[key] for e in examples])
            continue
        length = max(len(e[key]) for e in examples)
        pad = PAD_VALUES.get(key, pad_id)
        batch[key] = torch.tensor([e[key] + [pad] * (length - len(e[key])) for e in examples])
    return batch


def instruct_example(family: str, prompt: list[int], response: list[int], special: SpecialIds,
                     seq_len: int) -> dict | None:
    """One training example whose loss covers the response tokens only (None if none fit).

    GPT: prompt and response concatenated; labels are the next tokens, -100 wherever the next token
    is still part of the prompt. T5: prompt -> encoder, response -> decoder target.
    """
    response = response + [special.eos]
    if family == "gpt":
        ids = (prompt + response)[:seq_len + 1]
        if len(ids) <= len(prompt):
            return None
        labels = [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt):]  # position i predicts token i + 1
        return {"input_ids": ids[:-1], "attention_mask": [1] * (len(ids) - 1), "labels": labels}
    source = prompt[:seq_len - 1] + [special.eos]
    target = response[:seq_len]
    return {"input_ids": source, "attention_mask": [1] * len(source),
            "decoder_input_ids": [special.pad] + target[:-1], "labels": target}


def classify_example(family: str, text: list[int], label: int, special: SpecialIds, seq_len: int,
                     target: list[int] | None = None) -> dict:
    """BERT: [CLS] text [SEP]; GPT: the text; T5: text </s> -> the label string as decoder target."""
    if family == "bert":
        ids = [special.cls] + text[:seq_len - 2] + [special.sep]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label}
    if family == "gpt":
        ids = text[:seq_len] or [special.eos]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label}
    ids = text[:seq_len - 1] + [special.eos]
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "decoder_input_ids": [special.pad] + target[:-1], "labels": target, "class_index": label}


# ---------------------------------------------------------------- one task, ready for the Trainer


@dataclass
class TaskData:
    train: object  # .batch(step) and .tokens_per_batch, as the Trainer wants
    val_batches: list[dict]
    loss_fn: Callable = family_loss
    eval_fn: Callable = evaluate
    labels: list[str] | None = None
    counts: dict = field(default_factory=dict)  # examples or tokens, train and validation
    prompt_format: str | None = None  # instruct: "alpaca", or "chat template" for conversations


def build_task(task: str, family: str, tokenizer, special: SpecialIds, data: str, seq_len: int,
               batch_size: int, seed: int, eval_batches: int, template: ChatTemplate | None = None) -> TaskData:
    """template: the model's chat template, which lays out conversations for --task instruct."""
    if task == "lm":
        return _lm_task(family, tokenizer, special, data, seq_len, batch_size, seed, eval_batches)
    if task == "instruct":
        return _instruct_task(family, tokenizer, special, data, seq_len, batch_size, seed, eval_batches, template)
    return _classify_task(family, tokenizer, special, data, seq_len, batch_size, seed, eval_batches)


def _lm_task(family, tokenizer, special, data, seq_len, batch_size, seed, eval_batches) -> TaskData:
    """The family's own objective (CLM, MLM, span corruption) on plain text, as in pre-training."""
    train_docs, val_docs = split_documents(read_corpus(data))
    train_tokens, val_tokens = (document_stream(tokenizer, docs, special) for docs in (train_docs, val_docs))
    dataset = PretrainingData(family, train_tokens, special, tokenizer.get_vocab_size(), seq_len, batch_size, seed)
    return TaskData(dataset, dataset.eval_batches(val_tokens, eval_batches),
                    counts={"train_tokens": len(train_tokens), "val_tokens": len(val_tokens)})


def _instruct_task(family, tokenizer, special, data, seq_len, batch_size, seed, eval_batches,
                   template: ChatTemplate | None) -> TaskData:
    if family == "bert":
        raise UserError(INSTRUCT_ON_BERT)
    if "messages" in read_records(data, ())[0].fields:
        return _conversation_task(family, tokenizer, special, data, seq_len, batch_size, seed, eval_batches, template)
    records = read_records(data, ("instruction", "output"), ("input",))
    prompts = encode_plain(tokenizer, [instruction_prompt(r.fields["instruction"], r.fields.get("input") or "")
                                       for r in records])
    responses = encode_plain(tokenizer, [r.fields["output"] for r in records])
    examples = {}
    for record, prompt, response in zip(records, prompts, responses):
        example = instruct_example(family, prompt, response, special, seq_len)
        if example is None:
            raise UserError(f"{data}:{record.line}: the prompt alone fills --seq-len {seq_len}, leaving no room "
                            f"for the response; raise --seq-len or shorten the instruction")
        examples[record.line] = example
    return _examples_task(records, examples, special, batch_size, seed, eval_batches, "alpaca")


def _examples_task(records: list[Record], examples: dict[int, dict], special: SpecialIds, batch_size: int, seed: int,
                   eval_batches: int, prompt_format: str) -> TaskData:
    """Fixed examples (one per JSONL line), every 10th held out; counts how many, and how many tokens are scored."""
    train, val = split_records(records)
    dataset = ExampleData([examples[r.line] for r in train], special.pad, batch_size, seed)
    val_batches = dataset.eval_batches([examples[r.line] for r in val], eval_batches)
    scored = sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples.values())
    return TaskData(dataset, val_batches, counts={"train_examples": len(train), "val_examples": len(val),
                                                  "scored_tokens": scored}, prompt_format=prompt_format)


def conversation_example(template: ChatTemplate, tokenizer, messages: list[dict], seq_len: int) -> dict | None:
    """One conversation as a training example whose loss covers the assistant's turns only: the tokens that start
    inside a span the template renders for an assistant message (its text and end-of-turn mark). None if none
    fit in seq_len."""
    text, spans = template.assistant_spans(messages)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids = encoding.ids[:seq_len + 1]
    scored = [any(start <= first < end for start, end in spans) for first, _ in encoding.offsets[:len(ids)]]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids[1:], scored[1:])]  # i predicts i + 1
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids[:-1], "attention_mask": [1] * (len(ids) - 1), "labels": labels}


def _conversation_task(family, tokenizer, special, data, seq_len, batch_size, seed, eval_batches,
                       template: ChatTemplate | None) -> TaskData:
    if family != "gpt":
        raise UserError(f"{data}: conversations are laid out by a chat template for a decoder; --task instruct on "
                        f"a {family.upper()} model takes 'instruction'/'output' records")
    if template is None:
        raise UserError(f"{data}: holds conversations, and the model has no chat template to lay them out; put the "
                        f"model's chat_template.jinja beside it, or use 'instruction'/'output' records")
    records = read_records(data, ())
    examples = {}
    for record in records:
        where = f"{data}:{record.line}"
        messages = check_messages(record.fields.get("messages"), where)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: the conversation has no assistant message to learn from")
        example = conversation_example(template, tokenizer, messages, seq_len)
        if example is None:
            raise UserError(f"{where}: no assistant token fits in --seq-len {seq_len}; raise --seq-len or shorten "
                            f"the conversation")
        examples[record.line] = example
    return _examples_task(records, examples, special, batch_size, seed, eval_batches, "chat template")


def _classify_task(family, tokenizer, special, data, seq_len, batch_size, seed, eval_batches) -> TaskData:
    records = read_records(data, ("text", "label"), label_field="label")
    train, val = split_records(records)
    labels = sorted({r.fields["label"] for r in train})
    if len(labels) < 2:
        raise UserError(f"{data}: the training split has only the label {labels[0]!r}; classification needs "
                        f"at least two labels")
    for record in val:
        if record.fields["label"] not in labels:
            raise UserError(f"{data}:{record.line}: label {record.fields['label']!r} is in the held-out split "
                            f"(every 10th line) but never in training; add training examples with it")
    index = {label: i for i, label in enumerate(labels)}
    texts = encode_plain(tokenizer, [r.fields["text"] for r in records])
    targets = [ids + [special.eos] for ids in encode_plain(tokenizer, labels)] if family == "t5" else None
    if targets is not None and len({tuple(t) for t in targets}) < len(targets):
        raise UserError(f"{data}: two labels have the same tokens with this tokenizer; rename them")
    examples = {}
    for record, text in zip(records, texts):
        label = index[record.fields["label"]]
        examples[record.line] = classify_example(family, text, label, special, seq_len,
                                                 targets[label] if targets else None)
    dataset = ExampleData([examples[r.line] for r in train], special.pad, batch_size, seed)
    val_batches = dataset.eval_batches([examples[r.line] for r in val], eval_batches)
    counts = {"train_examples": len(train), "val_examples": len(val)}
    if family == "t5":
        return TaskData(dataset, val_batches, family_loss, text_to_text_eval(targets, special.pad), labels, counts)
    return TaskData(dataset, val_batches, classify_loss, classify_eval, labels, counts)
