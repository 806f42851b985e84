"""`python -m decision_platform.cli ...` runs the CLI."""

from decision_platform.cli.main import app

app()
