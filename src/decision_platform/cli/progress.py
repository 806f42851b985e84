"""Rich progress for the CLI: draws what the jobs (train, retrain, replay) report to ``training.progress``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


def progress_bars(console: Console, notes: bool = False) -> Progress:
    """The bars every CLI job draws: description, bar, done/total, time elapsed (and each task's note
    with ``notes``); kept once done."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if notes:
        columns.append(TextColumn("{task.fields[note]}"))
    return Progress(*columns, console=console, transient=False)


class RichProgress:
    """A ``training.progress.Progress`` on a rich console: one group of bars, a spinner per status.

    Use it as a context manager around the job, so the bars stop (and stay printed) when it ends.
    """

    def __init__(self, console: Console, notes: bool = False) -> None:
        self._console = console
        self._notes = notes
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        self.close()  # rich draws one live display at a time
        with self._console.status(message):
            yield

    def start(self, task: str, total: int, note: str = "") -> None:
        if self._bars is None:
            self._bars = progress_bars(self._console, self._notes)
            self._bars.start()
        self._tasks[task] = self._bars.add_task(task, total=total, note=note)

    def advance(self, task: str, n: int = 1, note: str | None = None) -> None:
        if self._bars is None:
            return
        if note is None:
            self._bars.advance(self._tasks[task], n)
        else:
            self._bars.update(self._tasks[task], advance=n, note=note)

    def close(self) -> None:
        """Stop the bars drawn so far; a later :meth:`start` begins a new group."""
        if self._bars is not None:
            self._bars.stop()
            self._bars, self._tasks = None, {}

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
