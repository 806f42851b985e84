"""The analyst console's review queue on PostgreSQL: every filter, keyset pages, and the rule filter's jsonb
containment (SQLite runs ``json_each`` instead: tests/unit/test_console.py covers that dialect)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.storage.review import QueueFilter
from tests.conftest import PG_URL, decision_row
from tests.unit.test_console import make_id

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)


@pytest.fixture
def queue_rows(pg_schema: str) -> Iterator[tuple[Repository, list[dict]]]:
    """12 decisions of the last hour (throttle, block, allow in turn), a reported and an imputed outcome."""
    engine = make_engine(PG_URL, pg_schema)
    migrate(engine, pg_schema)
    repository = Repository(engine)
    rows = []
    for i in range(12):
        at = NOW - timedelta(minutes=60 - 5 * i)
        fired = [{"name": "velocity_step_up", "tier": "floor", "inputs": []}] if i % 3 == 0 else []
        fired += [{"name": "card_testing_burst", "tier": "block", "inputs": []}] if i == 4 else []
        rows.append(
            decision_row(
                make_id(at, i),
                created_at=at,
                entity_id=f"ent-{i % 4}",
                action=(1, 2, 0)[i % 3],
                risk=round(0.05 * i, 2),
                rules_fired=fired,
            )
        )
    repository.insert_decisions(rows)
    repository.record_outcome(rows[1]["id"], "fraud", 1.0)
    placeholder = {"decision_id": rows[4]["id"], "outcome": "false_positive", "reward": -20.0}
    repository.insert_imputed_outcomes([placeholder | {"received_at": NOW, "imputed": True}])
    yield repository, rows
    engine.dispose()


ANY = (0, 1, 2)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (QueueFilter(), {0, 1, 3, 4, 6, 7, 9, 10}),  # throttles and blocks
        (QueueFilter(actions=(2,)), {1, 4, 7, 10}),
        (QueueFilter(actions=ANY, entity_id="ent-1"), {1, 5, 9}),
        (QueueFilter(actions=ANY, rule="velocity_step_up"), {0, 3, 6, 9}),
        (QueueFilter(actions=ANY, rule="card_testing_burst"), {4}),  # one of two rules fired on it
        (QueueFilter(actions=ANY, rule="denylisted_device"), set()),
        (QueueFilter(actions=ANY, risk_min=0.2, risk_max=0.4), {4, 5, 6, 7, 8}),
        (QueueFilter(actions=ANY, since=NOW - timedelta(minutes=31)), set(range(6, 12))),
        (QueueFilter(actions=ANY, until=NOW - timedelta(minutes=31)), set(range(6))),
        # the reported outcome (1) is out; the imputed placeholder (4) counts as none
        (QueueFilter(actions=(2,), unlabelled=True), {4, 7, 10}),
        (QueueFilter(actions=(2,), unlabelled=True, entity_id="ent-0", risk_min=0.1), {4}),
    ],
)
def test_every_queue_filter_on_postgresql(
    queue_rows: tuple[Repository, list[dict]], where: QueueFilter, expected: set[int]
) -> None:
    repository, rows = queue_rows
    found = repository.review_queue(where, limit=200)
    assert [r["id"] for r in found] == sorted((rows[i]["id"] for i in expected), reverse=True)
    outcomes = {r["id"]: r["outcome"] for r in found}
    assert outcomes.get(rows[1]["id"], "fraud") == "fraud" and outcomes.get(rows[4]["id"]) is None


def test_keyset_pages_on_postgresql_walk_the_primary_key(queue_rows: tuple[Repository, list[dict]]) -> None:
    repository, rows = queue_rows
    seen, cursor, statements = [], None, []
    sa.event.listen(repository.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    while True:
        page = repository.review_queue(QueueFilter(), cursor, 3)
        seen += [r["id"] for r in page]
        if len(page) < 3:
            break
        cursor = page[-1]["id"]
    assert seen == sorted((r["id"] for r in rows if r["action"] in (1, 2)), reverse=True)
    queue_sql = [s for s in statements if "ORDER BY decisions.id DESC" in s]
    assert queue_sql and not any("OFFSET" in s for s in queue_sql)
