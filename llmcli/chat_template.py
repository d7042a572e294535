"""Chat templates: a model's own layout of a conversation, rendered as transformers renders it.

The template comes from `--template FILE`, else the model directory's chat_template.jinja, else the
`chat_template` of its tokenizer_config.json (a string, or a list of named templates: "default"). It runs in
jinja2's immutable sandbox (no files, no Python internals) with transformers' settings: trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, `tojson` with indent, and the special tokens
of tokenizer_config.json (bos_token, eos_token, ...) as variables.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmcli.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"  # older checkpoints name their special tokens here
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ChatTemplate:
    source: str  # the Jinja text
    where: str  # the file it came from, for messages
    special_tokens: dict  # bos_token, eos_token, ... as the template sees them

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        """The conversation as the model reads it; with add_generation_prompt, ready for the assistant's reply."""
        try:
            return _compiled(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                   documents=None, **self.special_tokens)
        except jinja2.exceptions.SecurityError as e:
            raise UserError(f"{self.where}: the chat template tried something the sandbox forbids ({e}); use a "
                            f"template that only lays out the messages") from None
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{self.where}: not a valid Jinja template (line {e.lineno}: {e.message})") from None
        except jinja2.TemplateError as e:
            raise UserError(f"{self.where}: the chat template refused the conversation: {e.message or e}") from None

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text and the character spans of the assistant's turns in it.

        Each span is what rendering the conversation up to that turn adds to rendering it up to the turn before
        with the generation prompt: the reply and the template's own end-of-turn text, never the prompt."""
        text = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render(messages[:i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise UserError(f"{self.where}: rendering the conversation turn by turn does not give a prefix of "
                                f"the whole (message {i + 1}); llmcli finds the assistant's tokens that way, so this "
                                f"template cannot be used for --task instruct")
            spans.append((len(before), len(upto)))
        return text, spans


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (templates that mark the assistant's text for transformers'
    assistant mask) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def _compiled(source: str) -> jinja2.Template:
    """A template compiled once: a chat renders its conversation every turn, fine-tuning data twice per reply."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.DictLoader({}),
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(source)


def read_chat_template(directory: Path, template_file: Path | None = None,
                       fallback_tokens: dict | None = None) -> ChatTemplate | None:
    """The chat template for a model directory (or `template_file`), or None when it has none.

    fallback_tokens: special-token strings (from the tokenizer) for those tokenizer_config.json does not name."""
    tokenizer_config = _read_json(directory / TOKENIZER_CONFIG_FILE)
    special = {**(fallback_tokens or {}), **_special_tokens(_read_json(directory / SPECIAL_TOKENS_FILE)),
               **_special_tokens(tokenizer_config)}
    if template_file is not None:
        return ChatTemplate(_read_text(Path(template_file)), str(template_file), special)
    if (directory / TEMPLATE_FILE).is_file():
        return ChatTemplate(_read_text(directory / TEMPLATE_FILE), str(directory / TEMPLATE_FILE), special)
    source = tokenizer_config.get("chat_template")
    where = str(directory / TOKENIZER_CONFIG_FILE)
    if isinstance(source, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"{where}: 'chat_template' lists {', '.join(map(str, named))} but no 'default'; pass "
                            f"--template FILE")
        source = named["default"]
    if source is None:
        return None
    if not isinstance(source, str):
        raise UserError(f"{where}: 'chat_template' must be a string or a list of named templates")
    return ChatTemplate(source, where, special)


def model_chat_template(directory: Path, config, tokenizer, template_file: Path | None = None) -> ChatTemplate | None:
    """A model directory's chat template (or `template_file`), None when it has none; special tokens its tokenizer
    config does not name come from the model's BOS and EOS ids."""
    fallback = {key: tokenizer.id_to_token(i) for key, i in (("bos_token", config.bos_token_id),
                                                              ("eos_token", config.eos_token_id)) if i is not None}
    return read_chat_template(Path(directory), Path(template_file) if template_file else None, fallback)


def _special_tokens(tokenizer_config: dict) -> dict:
    special = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = tokenizer_config.get(key)
        if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    extra = tokenizer_config.get("additional_special_tokens")
    if isinstance(extra, list):
        special["additional_special_tokens"] = [t.get("content") if isinstance(t, dict) else t for t in extra]
    return special


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such template file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def check_messages(messages, where: str) -> list[dict]:
    """A conversation: a non-empty list of {"role", "content"} objects with a known role and text content."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a non-empty JSON list of messages, e.g. "
                        f'[{{"role": "user", "content": "Hello"}}]')
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: message {i} must be an object with a string 'content' (and a 'role')")
        if message.get("role") not in ROLES:
            raise UserError(f"{where}: message {i} has role {message.get('role')!r}; use one of {', '.join(ROLES)}")
    return messages


def read_messages(path: Path) -> list[dict]:
    """`--messages FILE.json`: a JSON list of {"role", "content"}."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    return check_messages(data, str(path))


def no_template_error(directory) -> UserError:
    return UserError(f"{directory}: the model has no chat template (no {TEMPLATE_FILE}, no 'chat_template' in "
                     f"{TOKENIZER_CONFIG_FILE}); pass one with --template FILE (a Jinja file as Hugging Face models "
                     f"ship them)")
