"""The decision log's day partitions on a real PostgreSQL (migration 0005, storage/partitions.py).

Each test has a schema of its own (``pg_schema``); nothing outside it is created or dropped.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from typer.testing import CliRunner

from decision_platform.cli import db as db_cli
from decision_platform.cli import main as cli
from decision_platform.config import Settings
from decision_platform.serving.platform import Platform
from decision_platform.storage.database import MIGRATIONS_DIR, make_engine, migrate
from decision_platform.storage.outcomes import OutcomeStatus
from decision_platform.storage.partitions import (
    DEFAULT_PARTITION,
    day_bounds,
    drop_partitions_before,
    ensure_partitions,
    list_partitions,
)
from decision_platform.storage.repository import Repository
from decision_platform.storage.sql import id_at
from tests.conftest import PG_URL, decision_row
from tests.integration.conftest import query

pytestmark = pytest.mark.integration

DAY = date(2026, 3, 1)


def at(moment: datetime, k: int = 0) -> dict[str, Any]:
    """A decision made at ``moment``: its id and created_at agree, as the engine makes them."""
    return decision_row(id_at(moment) + k, created_at=moment)


def noon(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)


@pytest.fixture
def engine(pg_schema: str) -> Iterator[sa.Engine]:
    live = make_engine(PG_URL, pg_schema)
    migrate(live, pg_schema, partitions_ahead_days=None)
    yield live
    live.dispose()


def where_rows_are(schema: str) -> dict[int, str]:
    return dict(query(schema, "SELECT id, tableoid::regclass::text FROM decisions"))


def test_days_are_created_ahead_once_and_ids_land_in_their_day(engine: sa.Engine, pg_schema: str) -> None:
    result = ensure_partitions(engine, ahead_days=2, today=DAY)
    assert result.created == ["decisions_p20260301", "decisions_p20260302", "decisions_p20260303"]
    assert ensure_partitions(engine, ahead_days=2, today=DAY).created == []  # idempotent
    partitions = list_partitions(engine)
    assert [p.name for p in partitions][-1] == DEFAULT_PARTITION
    days = [DAY + timedelta(days=k) for k in range(3)]
    assert [(p.low, p.high) for p in partitions[:3]] == [day_bounds(day) for day in days]

    last_ms = datetime(2026, 3, 2, 23, 59, 59, 999000, tzinfo=UTC)
    rows = [
        at(noon(DAY)),
        at(last_ms, k=4095),  # the last id of the day
        at(datetime(2026, 3, 3, tzinfo=UTC)),  # the first id of the next
        at(datetime(2026, 6, 1, tzinfo=UTC)),  # no partition made for that day: the default takes it
    ]
    repository = Repository(engine)
    assert repository.insert_decisions(rows) == {r["id"] for r in rows}
    assert where_rows_are(pg_schema) == {
        rows[0]["id"]: "decisions_p20260301",
        rows[1]["id"]: "decisions_p20260302",
        rows[2]["id"]: "decisions_p20260303",
        rows[3]["id"]: DEFAULT_PARTITION,
    }
    assert repository.get_decision(rows[1]["id"]).created_at == last_ms


def test_processes_starting_together_create_each_day_once(engine: sa.Engine, pg_schema: str) -> None:
    """Every API and worker process creates days ahead at start; several at once must not fail."""
    results: list[Any] = []
    errors: list[BaseException] = []

    def start() -> None:
        own = make_engine(PG_URL, pg_schema)
        try:
            results.append(ensure_partitions(own, ahead_days=5, today=DAY))
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    made = sorted(name for result in results for name in result.created)
    assert made == [f"decisions_p202603{d:02d}" for d in range(1, 7)]  # each day by exactly one of them


def test_a_day_whose_rows_sit_in_the_default_is_left_there(engine: sa.Engine, pg_schema: str) -> None:
    stray = at(noon(DAY))
    Repository(engine).insert_decisions([stray])
    result = ensure_partitions(engine, ahead_days=1, today=DAY)
    assert result.in_default == ["decisions_p20260301"] and result.created == ["decisions_p20260302"]
    assert where_rows_are(pg_schema) == {stray["id"]: DEFAULT_PARTITION}


def test_one_decision_per_event_holds_across_partitions(engine: sa.Engine, pg_schema: str) -> None:
    """The unique index on event_id cannot exist on a partitioned table: the decision_events claim
    (a trigger) keeps the guarantee, for redelivered events decided again on another day."""
    ensure_partitions(engine, ahead_days=1, today=DAY)
    repository = Repository(engine)
    first = at(noon(DAY)) | {"event_id": "evt-1"}
    again = at(noon(DAY + timedelta(days=1))) | {"event_id": "evt-1"}  # a new decision, same event
    assert repository.insert_decisions([first]) == {first["id"]}
    assert repository.insert_decisions([again]) == set()
    assert repository.insert_decisions([first]) == set()  # the same decision replayed (spool)
    # Within one batch too, and an event-less decision is never refused.
    twins = [at(noon(DAY), k=1) | {"event_id": "evt-2"}, at(noon(DAY), k=2) | {"event_id": "evt-2"}]
    plain = at(noon(DAY), k=3)
    assert repository.insert_decisions([*twins, plain]) == {twins[0]["id"], plain["id"]}
    assert repository.get_decision_by_event("evt-1").id == first["id"]
    assert repository.get_decision_by_event("evt-2").id == twins[0]["id"]
    assert repository.get_decision_by_event("nope") is None
    assert query(pg_schema, "SELECT count(*) FROM decisions") == [(3,)]


def test_a_decision_whose_id_is_taken_leaves_its_event_unclaimed(engine: sa.Engine, pg_schema: str) -> None:
    """Two processes that made the same decision id (core/ids.py: a node id drawn twice across hosts, or a
    restart with the clock gone back): the second row is skipped for its id -- and its event must stay
    free. The claim trigger used to claim the event first, for the *other* decision: the event's retry
    was then skipped as a duplicate and answered with another entity's decision."""
    ensure_partitions(engine, ahead_days=1, today=DAY)
    repository = Repository(engine)
    first = at(noon(DAY)) | {"event_id": "evt-a", "entity_id": "alice"}
    clash = at(noon(DAY)) | {"event_id": "evt-b", "entity_id": "bob"}  # the same id, another event
    assert repository.insert_decisions([first]) == {first["id"]}
    assert repository.insert_decisions([clash]) == set()
    assert repository.get_decision_by_event("evt-b") is None
    retry = at(noon(DAY), k=1) | {"event_id": "evt-b", "entity_id": "bob"}  # decided again, a new id
    assert repository.insert_decisions([retry]) == {retry["id"]}
    assert repository.get_decision_by_event("evt-b").entity_id == "bob"
    assert repository.get_decision_by_event("evt-a").id == first["id"]
    assert query(pg_schema, "SELECT event_id, decision_id FROM decision_events ORDER BY event_id") == [
        ("evt-a", first["id"]),
        ("evt-b", retry["id"]),
    ]


def test_outcomes_keep_their_foreign_key_to_the_partitioned_log(engine: sa.Engine) -> None:
    ensure_partitions(engine, ahead_days=0, today=DAY)
    repository = Repository(engine)
    decision = at(noon(DAY))
    repository.insert_decisions([decision])
    assert repository.record_outcome(decision["id"], "fraud", -1.0).status is OutcomeStatus.CREATED
    assert repository.record_outcome(decision["id"] + 1, "fraud", -1.0).status is OutcomeStatus.NOT_FOUND
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        sql = "INSERT INTO outcomes (decision_id, outcome, reward, received_at) VALUES (7, 'x', 0, now())"
        connection.execute(sa.text(sql))


def test_retention_drops_only_whole_old_days_with_what_belongs_to_them(
    engine: sa.Engine, pg_schema: str
) -> None:
    ensure_partitions(engine, ahead_days=4, today=DAY)  # 1..5 March
    repository = Repository(engine)
    rows = [at(noon(DAY + timedelta(days=k))) | {"event_id": f"e{k}"} for k in range(5)]
    stray = at(datetime(2025, 1, 1, tzinfo=UTC))  # long ago, in the default partition
    repository.insert_decisions([*rows, stray])
    for row in [*rows, stray]:
        repository.record_outcome(row["id"], "success", 1.0)
    cutoff = datetime(2026, 3, 3, 6, tzinfo=UTC)  # 3 March is not over at the cut-off: it stays

    planned = drop_partitions_before(engine, cutoff, dry_run=True)
    assert [p.name for p in planned] == ["decisions_p20260301", "decisions_p20260302"]
    assert len(list_partitions(engine)) == 6  # a dry run drops nothing

    dropped = drop_partitions_before(engine, cutoff)
    assert [p.name for p in dropped] == ["decisions_p20260301", "decisions_p20260302"]
    assert [p.name for p in list_partitions(engine)] == [
        "decisions_p20260303",
        "decisions_p20260304",
        "decisions_p20260305",
        DEFAULT_PARTITION,
    ]
    kept = {r["id"] for r in rows[2:]} | {stray["id"]}
    assert set(where_rows_are(pg_schema)) == kept
    assert {r[0] for r in query(pg_schema, "SELECT decision_id FROM outcomes")} == kept
    assert {r[0] for r in query(pg_schema, "SELECT event_id FROM decision_events")} == {"e2", "e3", "e4"}
    # The default partition is never dropped, whatever the cut-off.
    drop_partitions_before(engine, datetime(2100, 1, 1, tzinfo=UTC))
    assert [p.name for p in list_partitions(engine)] == [DEFAULT_PARTITION]
    assert set(where_rows_are(pg_schema)) == {stray["id"]}


def test_a_log_from_before_partitioning_keeps_its_rows_and_guarantees(pg_schema: str) -> None:
    live = make_engine(PG_URL, pg_schema)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with live.begin() as connection:
            connection.execute(sa.text(f'CREATE SCHEMA "{pg_schema}"'))
            config.attributes["connection"] = connection
            config.attributes["schema"] = pg_schema
            command.upgrade(config, "0004")
        old = [at(datetime(2026, 1, 5, 9, tzinfo=UTC), k) | {"event_id": f"old-{k}"} for k in range(3)]
        repository = Repository(live)
        assert repository.insert_decisions(old) == {r["id"] for r in old}
        repository.record_outcome(old[0]["id"], "fraud", -1.0)

        migrate(live, pg_schema, partitions_ahead_days=None)
        ensure_partitions(live, ahead_days=0, today=date(2026, 1, 5))  # inside the legacy range: skipped
        ensure_partitions(live, ahead_days=0, today=date(2026, 1, 6))
        names = [p.name for p in list_partitions(live)]
        assert names == ["decisions_legacy", "decisions_p20260106", DEFAULT_PARTITION]
        assert set(where_rows_are(pg_schema).values()) == {"decisions_legacy"}
        assert repository.get_decision_by_event("old-1").id == old[1]["id"]
        # A legacy event decided again after the migration is still refused, and the outcome FK holds.
        assert repository.insert_decisions([at(noon(date(2026, 1, 6))) | {"event_id": "old-2"}]) == set()
        assert repository.record_outcome(old[0]["id"], "fraud", -1.0).status is OutcomeStatus.DUPLICATE
        new = at(noon(date(2026, 1, 6)))
        assert repository.insert_decisions([new]) == {new["id"]}
        assert where_rows_are(pg_schema)[new["id"]] == "decisions_p20260106"
    finally:
        live.dispose()


def test_time_window_reads_touch_only_the_windows_partitions(engine: sa.Engine) -> None:
    """Report, retrain and imputation read by created_at; on PostgreSQL they add the id window, which
    is what lets the planner skip the other days (seen in the plan of the query they really send)."""
    ensure_partitions(engine, ahead_days=9, today=DAY)
    repository = Repository(engine)
    repository.insert_decisions([at(noon(DAY + timedelta(days=k))) for k in range(10)])
    since, until = datetime(2026, 3, 4, 6, tzinfo=UTC), datetime(2026, 3, 5, 18, tzinfo=UTC)
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if "FROM decisions" in statement and not statement.startswith("EXPLAIN"):
            sent.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        assert len(list(repository.report_rows(since, until))) == 2
        assert len(repository.logged_decisions(since, until)) == 2
        assert len(repository.decisions_without_outcome(datetime(2026, 3, 2, 18, tzinfo=UTC))) == 2
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    assert len(sent) == 3
    scanned = []
    with engine.connect() as connection:
        cursor = connection.connection.cursor()
        for statement, parameters in sent:
            cursor.execute("EXPLAIN " + statement, parameters)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            scanned.append(sorted(set(re.findall(r" on (decisions_p\d{8}) ", plan))))
    assert scanned[0] == scanned[1] == ["decisions_p20260304", "decisions_p20260305"]
    assert scanned[2] == ["decisions_p20260301", "decisions_p20260302"]


def test_cli_creates_days_ahead_and_applies_retention(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(database_url=PG_URL, database_schema=pg_schema)
    monkeypatch.setattr(db_cli, "get_settings", lambda: settings)
    today = datetime.now(UTC).date()
    result = CliRunner().invoke(cli.app, ["db", "partitions", "--ahead", "2"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "created 3" in result.output
    for k in range(3):
        assert f"decisions_p{today + timedelta(days=k):%Y%m%d}" in result.output
    with psycopg.connect(PG_URL, options=f"-csearch_path={pg_schema}", autocommit=True) as connection:
        old = DAY - timedelta(days=400)
        low, high = day_bounds(old)
        bounds = f"FOR VALUES FROM ({low}) TO ({high})"
        connection.execute(f"CREATE TABLE decisions_old PARTITION OF decisions {bounds}")
    result = CliRunner().invoke(cli.app, ["db", "retention", "--keep", "90d"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "dropped 1 partitions" in result.output and "decisions_old" in result.output
    assert "decisions_old" not in [p.name for p in list_partitions(make_engine(PG_URL, pg_schema))]
    bad = CliRunner().invoke(cli.app, ["db", "retention", "--keep", "soon"], terminal_width=200)
    assert bad.exit_code == 2 and "--keep" in bad.output


def test_the_platform_creates_days_ahead_when_it_starts(
    pg_schema: str,
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
) -> None:
    # (make_settings migrates with the default 7 days ahead: the platform's setting goes further)
    settings = make_settings(database_url=PG_URL, database_schema=pg_schema, db_partitions_ahead_days=10)
    platform = start_platform(settings)
    assert platform.partitions is not None  # and keeps them coming as the days pass
    today = datetime.now(UTC).date()
    names = [p.name for p in list_partitions(platform.repository.engine)]
    days = [f"decisions_p{today + timedelta(days=k):%Y%m%d}" for k in range(11)]
    assert names == [*days, DEFAULT_PARTITION]
