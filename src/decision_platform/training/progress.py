"""How long jobs (train, retrain, replay) report progress without knowing who draws it.

The jobs call a :class:`Progress`; the CLI passes one that draws terminal bars (``cli/progress.py``), tests
and benches pass nothing (:data:`SILENT`). So computing never imports a console, and the floors stay apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Progress(Protocol):
    """A job's progress: named tasks with a total that advance, and uncounted steps (a spinner)."""

    def status(self, message: str) -> AbstractContextManager[None]:
        """A step without a count (``with progress.status("loading"): ...``)."""
        ...

    def start(self, task: str, total: int, note: str = "") -> None:
        """A new counted task; ``task`` also names it for :meth:`advance`; ``note``: a short remark."""
        ...

    def advance(self, task: str, n: int = 1, note: str | None = None) -> None:
        """``n`` more units of ``task`` are done (and its note, e.g. a rate, is now ``note``)."""
        ...


class Silent:
    """A :class:`Progress` that shows nothing: the default of every job."""

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        yield

    def start(self, task: str, total: int, note: str = "") -> None:
        pass

    def advance(self, task: str, n: int = 1, note: str | None = None) -> None:
        pass


SILENT: Progress = Silent()
