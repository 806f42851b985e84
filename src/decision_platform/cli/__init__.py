"""`decision-platform ...`: one module per command group; rich tables and progress bars live here."""

from decision_platform.cli.main import app

__all__ = ["app"]
