"""What every command shares: the console and the model registry of the configured database."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from decision_platform.config import ConfigError, Settings, load_config_file

if TYPE_CHECKING:
    from decision_platform.models.registry import ModelRegistry

T = TypeVar("T")

#: The range of a --seed (numpy's and torch's seeds are unsigned 32-bit here).
SEED_MAX = 2**32 - 1


def finite(value: float | None) -> float | None:
    """A float option's callback: NaN or infinity is no number of seconds or events a second (typer's
    ``min`` lets NaN through; an infinite --outcome-delay waited forever)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def positive(value: float) -> float:
    """A float option's callback: a finite number above 0 (--days)."""
    if not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a number above 0")
    return value


def config_file(path: Path, load: Callable[[Path], T]) -> T:
    """``load(path)`` of a configuration file, or one line naming the file and the problem and exit 2."""
    try:
        return load_config_file(path, load)
    except ConfigError as exc:
        console.print(f"[red]bad configuration:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


# Piped output (make run | tee, CI logs) would wrap the report tables at 80 columns.
console = Console() if Console().is_terminal else Console(width=140)


class Commands(TyperGroup):
    """The command group of ``decision-platform``: a database outage met by any command is one line and
    exit 1 (it can succeed later; bad input is exit 2). It printed ~500 lines of rich traceback through
    SQLAlchemy's and psycopg's frames, for every command that reads the registry or the decision log."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            from decision_platform.storage.errors import is_outage  # psycopg, SQLAlchemy: only now

            if not is_outage(exc):
                raise
            why = (str(getattr(exc, "orig", None) or exc).strip() or type(exc).__name__).splitlines()[0]
            console.print(f"[red]database unavailable:[/red] {escape(why)}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None


def open_registry(settings: Settings) -> ModelRegistry:
    """The registry on the configured (migrated) database; imported lazily: the CLI starts fast."""
    from decision_platform.models.registry import ModelRegistry
    from decision_platform.storage.database import open_database
    from decision_platform.storage.repository import Repository

    return ModelRegistry(Repository(open_database(settings)), settings.model_dir)


def time_window(since: str, until: str) -> tuple[datetime, datetime]:
    """``--since`` / ``--until`` (an age like 7d, ``now`` or an ISO time) as UTC times; a bad or empty
    window is the user's error (exit 2 with the reason)."""
    from decision_platform.reporting import parse_time

    now = datetime.now(UTC)
    try:
        start, end = parse_time(since, now), parse_time(until, now)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if start >= end:
        raise typer.BadParameter(
            f"--since ({start:%Y-%m-%d %H:%M}) must be before --until ({end:%Y-%m-%d %H:%M})"
        )
    return start, end
