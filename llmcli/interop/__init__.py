"""Conversion to and from other libraries' checkpoints (Hugging Face transformers).

Its modules sit in two layers (reading a checkpoint in memory below model_dir, writing directories above it),
so this file imports nothing: import `llmcli.interop.hf` or `llmcli.interop.reading`.
"""
