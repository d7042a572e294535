import os
import tempfile

import pytest
from typer.testing import CliRunner

from llmcli.config import ModelConfig, config_from_dict


# The machine's measured peaks (bench) are cached under XDG_CACHE_HOME: one fresh cache for the whole run, never the
# user's own.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="llmcli-test-cache-")
# --precision auto means bf16 on CPUs with native bf16: the suite compares with fp32 references, so auto means fp32
# here, on every machine alike; tests of auto itself unset it.
os.environ["LLMCLI_PRECISION"] = "fp32"


def pytest_report_header(config):
    """The CPU and its features head the log: a failure in a kernel says which kernels could have run."""
    from llmcli.cpu import describe_cpu

    return f"cpu: {describe_cpu()}"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """About 60 kB of the embedded corpus as a .txt file: enough text, quick to tokenize."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:12]))
    return str(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """A tiny model directory per family, with a tokenizer trained on a few built-in documents."""
    from llmcli.data import default_corpus
    from llmcli.model_dir import build_model_dir
    from llmcli.tokenizer import save_tokenizer, train_tokenizer

    docs = default_corpus()[:8]
    dirs = {}
    for family, (kind, vocab) in {"gpt": ("bpe", 300), "bert": ("wordpiece", 400), "t5": ("unigram", 300)}.items():
        tokenizer = train_tokenizer(docs, kind, vocab)
        out = tmp_path_factory.mktemp(family) / "model"
        build_model_dir(tiny_config(family, vocab_size=tokenizer.get_vocab_size()), out, seed=0)
        save_tokenizer(tokenizer, out)
        dirs[family] = str(out)
    return dirs


@pytest.fixture
def cli():
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from llmcli.cli import app

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return run


def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU every thread barrier can stall for
    milliseconds. Test modules use it as `yield from one_thread()` in a module-scoped autouse fixture."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(family: str = "gpt", **overrides) -> ModelConfig:
    """A few-thousand-parameter config of any family; overrides change any field."""
    data = dict(name=f"tiny-{family}", family=family, vocab_size=97, d_model=32, n_layers=2, n_heads=4,
                d_ff=64, max_seq_len=64, dropout=0.0)
    if family == "t5":
        data["relative_buckets"] = 8
        data["relative_max_distance"] = 16
    data.update(overrides)
    return config_from_dict(data, "<test>")
