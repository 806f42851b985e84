"""What every command shares: the console and the model registry of the configured database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from decision_platform.config import Settings

if TYPE_CHECKING:
    from decision_platform.models.registry import ModelRegistry

# Piped output (make run | tee, CI logs) would wrap the report tables at 80 columns.
console = Console() if Console().is_terminal else Console(width=140)


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
