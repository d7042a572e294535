"""Where a run's figures go besides metrics.jsonl, which is always written and stays the source of truth.

csv: metrics.csv beside it, one row per record (rewritten whole when a record brings a new column).
tensorboard: event files under tensorboard/ through torch.utils.tensorboard (the `tensorboard` extra);
training figures as train/NAME, validation figures as val/NAME.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from llmcli.errors import UserError

LOGGERS = ("jsonl", "csv", "tensorboard")
METRICS_FILE = "metrics.jsonl"  # the source of truth, written by the training loop


def check_loggers(names: list[str]) -> None:
    for name in names:
        if name not in LOGGERS:
            raise UserError(f"--logger {name!r} is not one of {', '.join(LOGGERS)}")
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("--logger tensorboard needs the tensorboard package: pip install "
                            "'llmcli[tensorboard]'") from None


class CsvLogger:
    """metrics.csv: the records of metrics.jsonl as rows, columns in order of first appearance."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.csv"
        self.rows = []
        jsonl = run_dir / METRICS_FILE  # a resumed run starts from what is already logged
        if jsonl.is_file():
            self.rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        self.columns = list(dict.fromkeys(key for row in self.rows for key in row))
        self._rewrite()

    def log(self, record: dict) -> None:
        self.rows.append(record)
        if any(key not in self.columns for key in record):
            self.columns += [key for key in record if key not in self.columns]
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(record)

    def _rewrite(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text.getvalue())
        tmp.replace(self.path)

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars per record; a resumed run drops the events past its checkpoint, as metrics.jsonl does."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_loggers(names: list[str], run_dir: Path, start_step: int) -> list:
    """The loggers asked for beyond metrics.jsonl."""
    made = []
    if "csv" in names:
        made.append(CsvLogger(run_dir))
    if "tensorboard" in names:
        made.append(TensorBoardLogger(run_dir, start_step))
    return made
