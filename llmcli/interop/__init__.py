"""Conversion to and from other libraries' checkpoints (Hugging Face transformers)."""

from llmcli.interop.hf import convert_from_hf, convert_to_hf

__all__ = ["convert_from_hf", "convert_to_hf"]
