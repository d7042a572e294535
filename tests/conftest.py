import pytest
from typer.testing import CliRunner

from llmcli.config import ModelConfig, config_from_dict


@pytest.fixture
def cli():
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from llmcli.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return run


def tiny_config(family: str = "gpt", **overrides) -> ModelConfig:
    """A few-thousand-parameter config of any family; overrides change any field."""
    data = dict(name=f"tiny-{family}", family=family, vocab_size=97, d_model=32, n_layers=2, n_heads=4,
                d_ff=64, max_seq_len=64, dropout=0.0)
    if family == "t5":
        data["relative_buckets"] = 8
        data["relative_max_distance"] = 16
    data.update(overrides)
    return config_from_dict(data, "<test>")
