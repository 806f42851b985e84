"""SQLite keeps the decision log in one table: the partition commands are no-ops there, saying so."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from decision_platform.cli import db as db_cli
from decision_platform.cli import main as cli
from decision_platform.config import Settings
from decision_platform.storage.database import make_engine
from decision_platform.storage.partitions import drop_partitions_before, ensure_partitions, is_partitioned
from decision_platform.storage.repository import Repository
from tests.conftest import decision_row


def test_sqlite_keeps_one_table_and_its_unique_event_index(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    engine = make_engine(settings.database_url)
    assert not is_partitioned(engine)
    assert ensure_partitions(engine, 7).created == []
    assert drop_partitions_before(engine, datetime(2100, 1, 1, tzinfo=UTC)) == []
    repository = Repository(engine)
    assert repository.insert_decisions([decision_row(1, event_id="e")]) == {1}
    assert repository.insert_decisions([decision_row(2, event_id="e")]) == set()
    assert repository.get_decision_by_event("e").id == 1


@pytest.mark.parametrize("args", [["db", "partitions"], ["db", "retention", "--keep", "90d"]])
def test_partition_commands_on_sqlite_say_there_is_nothing_to_do(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    settings = make_settings()
    monkeypatch.setattr(db_cli, "get_settings", lambda: settings)
    result = CliRunner().invoke(cli.app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "one table" in result.output
