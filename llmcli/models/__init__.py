"""The three families, built from the shared blocks in blocks.py."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from llmcli.config import ModelConfig
from llmcli.models.base import LanguageModel, ModelOutput
from llmcli.models.bert import BERT
from llmcli.models.gpt import GPT
from llmcli.models.t5 import T5

FAMILY_CLASSES = {"bert": BERT, "gpt": GPT, "t5": T5}

__all__ = ["BERT", "GPT", "T5", "LanguageModel", "ModelOutput", "build_model", "build_on_meta"]


def build_model(config: ModelConfig, seed: int | None = None) -> LanguageModel:
    """A freshly initialised fp32 model on CPU; the same seed gives the same weights."""
    if seed is not None:
        torch.manual_seed(seed)
    model = FAMILY_CLASSES[config.family](config)
    model.init_weights()
    return model


def build_on_meta(config: ModelConfig) -> LanguageModel:
    """The model's structure with no storage: exact parameter counts for a 540B model in milliseconds.

    Init functions are skipped: on meta tensors they do nothing but cost a second of lazy imports.
    """
    with torch.device("meta"), _SkipInit():
        return FAMILY_CLASSES[config.family](config)


class _SkipInit(TorchFunctionMode):
    """Returns the tensor from torch.nn.init's in-place initialisers instead of running them."""

    INITIALISERS = (torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.INITIALISERS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))
