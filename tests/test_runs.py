"""`llmcli runs show`: curves and summaries read from a real short run's metrics.jsonl."""

import json
import math

import pytest

from conftest import one_thread, tiny_config
from llmcli.runs import curves, read_metrics, run_series, summarize
from llmcli.training.pretrain import pretrain
from llmcli.training.run import TrainFlags


@pytest.fixture(scope="module", autouse=True)
def _threads():
    yield from one_thread()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("runs") / "run"
    pretrain(tiny_config("gpt", vocab_size=300), corpus, str(out),
             TrainFlags(steps=12, batch_size=2, seq_len=16, log_every=2, eval_every=4, eval_batches=2,
                        grad_clip=1e-3), log=lambda *a, **k: None)
    return out


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_curves_are_the_logged_points_one_for_one(run_dir):
    logged = lines(run_dir)
    points = curves(read_metrics(run_dir))
    assert points["loss"] == [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert points["val_loss"] == [(r["step"], r["val_loss"]) for r in logged if "val_loss" in r]
    assert [s for s, _ in points["loss"]] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in points["val_loss"]] == [0, 4, 8, 12]
    (_, _, train), (_, _, val) = run_series([(str(run_dir), read_metrics(run_dir))])
    assert train == points["loss"] and val == points["val_loss"]


def test_gradient_norm_is_logged_before_clipping(run_dir):
    norms = [r["grad_norm"] for r in lines(run_dir) if "loss" in r]
    assert all(n > 1e-3 for n in norms), norms  # clipped to 1e-3, so a logged norm above it is the raw one


def test_summary_counts_steps_tokens_and_the_best_validation(run_dir):
    logged = lines(run_dir)
    row = summarize(run_dir, read_metrics(run_dir))
    val = [r for r in logged if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"])
    assert row["steps"] == 12 and row["tokens"] == 12 * 2 * 16
    assert (row["best_val_loss"], row["best_val_step"]) == (best["val_loss"], best["step"])
    assert row["best_val_perplexity"] == best["val_perplexity"]
    assert row["final_loss"] == [r for r in logged if "loss" in r][-1]["loss"]
    windows = [r for r in logged if "loss" in r]
    expected = sum(32 * 2 / r["tokens_per_s"] for r in windows)  # 2 steps of 32 tokens a window
    assert row["train_time_s"] == pytest.approx(expected)
    assert row["tokens_per_s"] == pytest.approx(12 * 32 / expected)


def test_validation_logs_bits_per_byte_of_the_held_out_text(cli, run_dir, corpus):
    """bits/byte = loss / ln 2 / (UTF-8 bytes per token of the held-out documents), the figure eval reports."""
    result = cli("eval", run_dir, "--data", corpus, "--json")
    assert result.exit_code == 0, result.stderr
    bytes_per_token = json.loads(result.stdout)["bytes_per_token"]
    val = [r for r in lines(run_dir) if "val_loss" in r]
    for r in val:
        assert r["val_bits_per_byte"] == pytest.approx(r["val_loss"] / math.log(2) / bytes_per_token, rel=1e-12)
    row = summarize(run_dir, read_metrics(run_dir))
    assert row["best_val_bits_per_byte"] == min(val, key=lambda r: r["val_loss"])["val_bits_per_byte"]
    table = cli("runs", "show", run_dir).stdout
    assert "bits/B" in table and f"{row['best_val_bits_per_byte']:.3f}" in table


def test_runs_show_prints_the_chart_and_table_and_json(cli, run_dir):
    result = cli("runs", "show", run_dir)
    assert result.exit_code == 0, result.output
    assert "training loss" in result.stdout and "validation loss" in result.stdout
    assert result.stdout.count("o") >= 4  # four validation points
    result = cli("runs", "show", run_dir, run_dir, "--json")
    rows = json.loads(result.stdout)
    assert rows == [summarize(run_dir, read_metrics(run_dir))] * 2


def test_runs_show_png_is_an_image(cli, run_dir, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    result = cli("runs", "show", run_dir, "--log-x", "--png", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    assert image.imread(tmp_path / "curves.png").shape[2] in (3, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left


@pytest.mark.parametrize("case", ["missing", "file", "no-metrics", "bad-line", "no-step"])
def test_bad_run_directories_exit_2_naming_the_problem(cli, tmp_path, case):
    target = tmp_path / "run"
    if case == "file":
        target.write_text("x")
    elif case != "missing":
        target.mkdir()
    if case == "bad-line":
        (target / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{not json\n')
    if case == "no-step":
        (target / "metrics.jsonl").write_text('{"loss": 2.0}\n')
    result = cli("runs", "show", target)
    assert result.exit_code == 2
    message = {"missing": "not a directory", "file": "not a directory", "no-metrics": "no metrics.jsonl",
               "bad-line": "line 2", "no-step": "line 1"}[case]
    assert message in result.stderr and "Traceback" not in result.output


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("loggers") / "run"
    flags = TrainFlags(steps=8, batch_size=2, seq_len=16, log_every=2, eval_every=4, eval_batches=2, save_every=4,
                       logger=["csv", "tensorboard"] if _has_tensorboard() else ["csv"])
    pretrain(tiny_config("gpt", vocab_size=300), corpus, str(out), flags, log=lambda *a, **k: None)
    return out


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_csv_logger_holds_the_jsonl_records_row_for_row(logged_run):
    import csv

    with open(logged_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = lines(logged_run)
    assert len(rows) == len(logged)
    for row, record in zip(rows, logged):
        assert {k: float(v) for k, v in row.items() if v != ""} == pytest.approx({k: float(v) for k, v in record.items()})


def test_tensorboard_events_are_read_by_tensorboard_and_a_resume_drops_redone_steps(logged_run, corpus):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars():
        events = EventAccumulator(str(logged_run / "tensorboard"))
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    logged = lines(logged_run)
    read = scalars()
    assert read["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in logged if "loss" in r]
    assert read["train/grad_norm"] == [(r["step"], pytest.approx(r["grad_norm"])) for r in logged if "loss" in r]
    assert read["val/loss"] == [(r["step"], pytest.approx(r["val_loss"])) for r in logged if "val_loss" in r]
    # resume from step 4 to 8 again: the second write of steps 5..8 replaces the first
    import shutil

    shutil.rmtree(logged_run / "checkpoints" / "step-8")
    pretrain(tiny_config("gpt", vocab_size=300), corpus, str(logged_run), TrainFlags(resume=True),
             log=lambda *a, **k: None)
    assert [s for s, _ in scalars()["train/loss"]] == [2, 4, 6, 8]
