"""How long work says how far it has got: the library reports, the caller decides how to show it.

Library code takes a `Progress` and calls `progress.task(label, total)` around its loop, then
`task.update(done, **figures)`. The default shows nothing; the CLI passes one that draws a rich bar
on stderr (llmcli.cli.output.BarProgress), so no library module draws anything itself.
"""

from __future__ import annotations


class Task:
    """One loop's progress. `update(completed)` sets the count (by default one more); figures such as
    loss=..., lr=... are for the display."""

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, completed: int | None = None, **figures) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """Shows nothing: the default for library calls and for every rank but the first."""

    def task(self, label: str, total: int | None, completed: int = 0, unit: str = "steps") -> Task:
        return Task()


SILENT = Progress()
