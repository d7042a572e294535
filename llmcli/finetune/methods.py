"""The fine-tuning settings and how a method and a task attach to a built model.

`attach` is the one place that turns a base model into the model that is trained; loading a saved
adapter calls it again with the saved settings, so both sides build the same structure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch.nn as nn

from llmcli.errors import UserError
from llmcli.finetune.adapters import add_adapters
from llmcli.finetune.heads import Classifier
from llmcli.finetune.lora import DEFAULT_TARGETS, add_lora, parse_targets
from llmcli.finetune.prompt import PromptTuned
from llmcli.finetune.tasks import INSTRUCT_ON_BERT, TASKS

METHODS = ("full", "lora", "adapter", "prompt")


@dataclass
class FinetuneSpec:
    method: str
    task: str
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    adapter_size: int = 64  # Houlsby et al. 2019 tried 8 to 256
    prompt_tokens: int = 20  # Lester et al. 2021, fig. 3: gains flatten beyond 20

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.task not in TASKS:
            raise UserError(f"--task {self.task!r} is not one of {', '.join(TASKS)}")
        self.lora_targets = parse_targets(self.lora_targets)
        for name in ("lora_rank", "adapter_size", "prompt_tokens"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha <= 0:
            raise UserError(f"--lora-alpha must be positive, got {self.lora_alpha}")

    def method_settings(self) -> dict:
        """The hyperparameters of the chosen method only."""
        keys = {"lora": ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"),
                "adapter": ("adapter_size",), "prompt": ("prompt_tokens",), "full": ()}[self.method]
        return {key: getattr(self, key) for key in keys}

    def to_dict(self) -> dict:
        return {"method": self.method, "task": self.task, **self.method_settings()}

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneSpec":
        known = set(asdict(cls("full", "lm")))
        return cls(**{k: v for k, v in data.items() if k in known})

    def check_family(self, family: str) -> None:
        if self.task == "instruct" and family == "bert":
            raise UserError(INSTRUCT_ON_BERT)


def attach(model: nn.Module, spec: FinetuneSpec, num_labels: int | None = None) -> nn.Module:
    """Freeze the base (except for --method full), add the method's modules, and a head for classify."""
    spec.check_family(model.config.family)
    if spec.method != "full":
        model.requires_grad_(False)
    if spec.method == "lora":
        add_lora(model, spec.lora_rank, spec.lora_alpha, spec.lora_dropout, spec.lora_targets)
    elif spec.method == "adapter":
        add_adapters(model, spec.adapter_size)
    elif spec.method == "prompt":
        model = PromptTuned(model, spec.prompt_tokens)
    if spec.task == "classify" and model.config.family != "t5":  # T5 classifies text-to-text
        model = Classifier(model, num_labels)
    return model


def adapter_tensors(model: nn.Module, spec: FinetuneSpec) -> dict[str, nn.Parameter]:
    """What the adapter file holds: the trained tensors, or only the head after full fine-tuning."""
    if spec.method == "full":
        return {name: p for name, p in model.named_parameters() if name.startswith("head.")}
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
