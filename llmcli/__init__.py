"""llmcli: a command-line model zoo and benchmarking lab for BERT, GPT and T5."""

__version__ = "0.1.0"

__all__ = ["load_model", "load_tokenizer", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import llmcli` (and `llmcli --help`) does not pay for importing torch.
    if name in ("load_model", "load_tokenizer"):
        from llmcli import model_dir

        return getattr(model_dir, name)
    raise AttributeError(f"module 'llmcli' has no attribute {name!r}")
