"""What every command shares: the console and the model registry of the configured database."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
