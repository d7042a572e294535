"""Talking to instruct models: a conversation laid out by the model's chat template, a reply generated until any
of its end ids, and the history kept within the model's context.

`llmcli generate --messages` renders one conversation; `llmcli chat` keeps one going (ChatSession).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from llmcli.chat_template import ChatTemplate, check_messages, model_chat_template, no_template_error
from llmcli.errors import UserError
from llmcli.generation import Generation, generate_text


def chat_template_for(model_dir: str | Path, model, tokenizer, template_file: str | Path | None = None
                      ) -> ChatTemplate:
    """The model's chat template (or `template_file`); exit 2 naming --template when it has none."""
    template = model_chat_template(Path(model_dir), model.config, tokenizer, template_file)
    if template is None:
        raise no_template_error(model_dir)
    return template


def render_ids(template: ChatTemplate, tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """The conversation ready for the assistant's reply, as text and as ids. The text is tokenized without the
    tokenizer's own BOS, as transformers' apply_chat_template does: a template writes bos_token itself."""
    text = template.render(messages, add_generation_prompt=True)
    return text, tokenizer.encode(text, add_special_tokens=False).ids


def reply(model, tokenizer, template: ChatTemplate, messages: list[dict], **options) -> Generation:
    """Generate the assistant's reply to a conversation (`generate --messages`)."""
    check_messages(messages, "--messages")
    text, ids = render_ids(template, tokenizer, messages)
    return generate_text(model, tokenizer, [text], prompt_ids=[ids], **options)[0]


class ChatSession:
    """A conversation in progress: an optional system message and the turns so far.

    When the history and the reply would not fit the model's context, the oldest turns go first (the system
    message stays); `send` says how many went."""

    def __init__(self, model, tokenizer, template: ChatTemplate, system: str | None = None,
                 max_new_tokens: int = 256, **sampling) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.turns: list[dict] = []

    def reset(self) -> None:
        self.turns = []

    def messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> tuple[Generation, int]:
        """The model's reply to `text`, streamed to on_text; returns it and the number of old turns dropped."""
        turns = [*self.turns, {"role": "user", "content": text}]
        budget = self.model.config.max_seq_len - self.max_new_tokens
        dropped = 0
        prompt, ids = render_ids(self.template, self.tokenizer, self.messages(turns))
        while len(ids) > budget and len(turns) > 1:
            first_reply = next((i for i, turn in enumerate(turns) if i and turn["role"] == "user"), len(turns) - 1)
            turns, dropped = turns[first_reply:], dropped + first_reply  # a whole exchange at a time
            prompt, ids = render_ids(self.template, self.tokenizer, self.messages(turns))
        if len(ids) > budget:
            raise UserError(f"this message and the system prompt take {len(ids)} tokens, and with "
                            f"{self.max_new_tokens} new ones that passes {self.model.config.name}'s context "
                            f"({self.model.config.max_seq_len}); write less or lower --max-new-tokens")
        result = generate_text(self.model, self.tokenizer, [prompt], prompt_ids=[ids],
                               max_new_tokens=self.max_new_tokens, on_text=on_text, echo_prompt=False,
                               **self.sampling)[0]
        self.turns = [*turns, {"role": "assistant", "content": result.completion.strip()}]
        return result, dropped
