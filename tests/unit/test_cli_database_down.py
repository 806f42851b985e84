"""The command line while the database is away: one line saying so, not a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from decision_platform import cli
from decision_platform.config import get_settings

#: A port nothing listens on: the connection is refused at once.
REFUSING = "postgresql://postgres@127.0.0.1:1/test"


@pytest.mark.parametrize(
    "args",
    [
        ["models", "list"],
        ["models", "promote", "policy-1"],
        ["explain", "1"],
        ["retrain"],
        ["report"],
        ["db", "partitions"],
    ],
    ids=" ".join,
)
def test_a_command_needing_the_database_says_it_is_unavailable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """Every command that reads the decision log or the registry printed ~500 lines of rich traceback of
    SQLAlchemy's and psycopg's frames when PostgreSQL refused the connection. Now one line naming the
    driver's reason, and exit 1 (an outage: the same command can succeed later; bad input is exit 2)."""
    monkeypatch.setenv("DP_DATABASE_URL", REFUSING)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.app, args)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("database unavailable: "), result.output
    assert "Connection refused" in lines[0] and "Traceback" not in result.output
