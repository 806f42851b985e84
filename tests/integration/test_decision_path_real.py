"""The core decision path on the real backends: PostgreSQL (own schema) and Redis (own db).

Same code as the embedded runs; only the URLs differ (DESIGN.md §5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient

from decision_platform.api.app import create_app
from decision_platform.config import Settings
from decision_platform.serving.platform import Platform
from decision_platform.storage.database import make_batch_engine, make_engine, migrate
from decision_platform.storage.errors import DamagedRowError, is_record_error
from decision_platform.storage.repository import Repository
from decision_platform.storage.spool import Spool
from decision_platform.storage.writer import DUPLICATE, SPOOLED, STORED, DecisionWriter
from tests.conftest import PG_URL, REDIS_URL, decision_record
from tests.integration.conftest import query

pytestmark = pytest.mark.integration


@pytest.fixture
def real_client(
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
    pg_schema: str,
    redis_db: str,
) -> Iterator[tuple[TestClient, Settings]]:
    settings = make_settings(database_url=PG_URL, database_schema=pg_schema, feature_store_url=redis_db)
    with TestClient(create_app(settings, start_platform(settings))) as client:
        yield client, settings


def test_decide_then_outcome_lands_in_postgresql_with_its_reward(
    real_client: tuple[TestClient, Settings],
) -> None:
    client, settings = real_client
    assert client.get("/ready").json()["status"] == "ready"
    decisions = [
        client.post(
            "/decide",
            json={
                "entity_id": "pg-1",
                "event": {
                    "event_id": f"pg-ev-{i}",
                    "amount": 10.0 * (i + 1),
                    "attributes": {"device_id": "d-1"},
                },
            },
        ).json()
        for i in range(3)
    ]
    last = decisions[-1]
    assert last["fallback"] is None
    outcome = client.post("/outcome", json={"decision_id": last["decision_id"], "outcome": "chargeback"})
    assert outcome.status_code == 201

    rows = query(
        settings.database_schema,
        "SELECT id, action, propensity, features, model_versions FROM decisions ORDER BY id",
    )
    assert [r[0] for r in rows] == [d["decision_id"] for d in decisions]
    assert rows[-1][3]["count_1h"] == 3 and rows[-1][3]["sum_1h"] == pytest.approx(60.0)  # JSONB snapshot
    assert rows[-1][4] == last["model_versions"]
    (stored_outcome,) = query(settings.database_schema, "SELECT decision_id, outcome, reward FROM outcomes")
    expected_reward = -15.0 - 30.0 if last["action"] in (0, 1) else 0.0  # rewards.yaml chargeback row
    assert stored_outcome == (last["decision_id"], "chargeback", pytest.approx(expected_reward))


def test_windows_live_in_redis_and_replays_count_once(real_client: tuple[TestClient, Settings]) -> None:
    client, _settings = real_client
    body = {"entity_id": "rd-1", "event": {"event_id": "rd-ev-1", "amount": 7.0}}
    first = client.post("/decide", json=body).json()
    replay = client.post("/decide", json=body).json()
    assert replay["decision_id"] == first["decision_id"]
    later = client.post(
        "/decide", json={"entity_id": "rd-1", "event": {"event_id": "rd-ev-2", "amount": 1.0}}
    ).json()
    stored = client.get(f"/decisions/{later['decision_id']}").json()
    assert stored["features"]["count_24h"] == 2
    keys = redis.Redis.from_url(REDIS_URL).keys("*rd-1*")
    assert keys, "the entity's windows should be in Redis"


def test_float_attributes_beyond_64_bit_integers_read_back_from_postgresql(
    real_client: tuple[TestClient, Settings],
) -> None:
    """JSONB writes 1e300 as 1 and 300 zeros: it was read back as an integer the API's schema refuses
    (GET /decisions/{id} answered 500 for a decision /decide had acknowledged)."""
    client, _ = real_client
    attributes = {"x": 1e300, "top": 1.5e308, "neg": -1e19, "max": 2**63 - 1, "min": -(2**63), "s": "1e300"}
    decided = client.post(
        "/decide", json={"entity_id": "j1", "event": {"event_id": "j1", "attributes": attributes}}
    )
    assert decided.status_code == 200, decided.text
    stored = client.get(f"/decisions/{decided.json()['decision_id']}")
    assert stored.status_code == 200, stored.text
    assert stored.json()["attributes"] == attributes
    page = client.get(f"/console/decisions/{decided.json()['decision_id']}")
    assert page.status_code == 200 and "1e+300" in page.text


def test_a_decision_damaged_in_postgresql_is_named_and_a_read_refused_for_its_data_is_no_outage(
    real_client: tuple[TestClient, Settings],
) -> None:
    """jsonb holds any JSON: a hand edit's fired rules as an object. Its record and a retry of its event are
    409s naming it; a statement PostgreSQL refuses for it (a data exception, SQLSTATE 22023) is a 409 for
    that read, the database stays up (it was marked down: /ready 503, decisions spooled)."""
    client, settings = real_client
    event = {"event_id": "pg-damaged", "amount": 5.0}
    decided = client.post("/decide", json={"entity_id": "pg-d", "event": event}).json()
    platform = client.app.state.platform  # type: ignore[attr-defined]
    with platform.repository.engine.begin() as connection:
        damage = """UPDATE decisions SET rules_fired = '{"name": "velocity_step_up"}' WHERE id = :id"""
        connection.execute(sa.text(damage), {"id": decided["decision_id"]})
    record = client.get(f"/decisions/{decided['decision_id']}")
    assert (
        record.status_code == 409
        and "is stored damaged: rules_fired holds {'name'" in record.json()["detail"]
    )
    retry = client.post("/decide", json={"entity_id": "pg-d", "event": event})
    assert retry.status_code == 409 and "the event is not decided again" in retry.json()["detail"]

    def every_fired_rule() -> list:
        with platform.repository.engine.connect() as connection:
            return list(
                connection.execute(sa.text("SELECT jsonb_array_elements(rules_fired) FROM decisions"))
            )

    with pytest.raises(DamagedRowError, match="cannot extract elements from an object"):
        platform.writer.query(every_fired_rule)
    assert platform.writer.database_up and client.get("/ready").status_code == 200
    assert query(settings.database_schema, "SELECT count(*) FROM decisions") == [(1,)]


def test_conflicting_outcome_on_postgresql(real_client: tuple[TestClient, Settings]) -> None:
    client, _settings = real_client
    decision = client.post("/decide", json={"entity_id": "pg-2"}).json()
    assert (
        client.post(
            "/outcome", json={"decision_id": decision["decision_id"], "outcome": "success"}
        ).status_code
        == 201
    )
    assert (
        client.post(
            "/outcome", json={"decision_id": decision["decision_id"], "outcome": "success"}
        ).status_code
        == 200
    )
    assert (
        client.post("/outcome", json={"decision_id": decision["decision_id"], "outcome": "fraud"}).status_code
        == 409
    )


def test_postgresql_outage_spools_then_replays_into_postgresql(pg_schema: str, tmp_path: Path) -> None:
    live = make_engine(PG_URL, pg_schema)
    migrate(live, pg_schema)
    down = DecisionWriter(
        Repository(make_engine("postgresql://postgres@127.0.0.1:1/test")), Spool(tmp_path / "spool")
    )
    row = decision_record(42, event_id="x")
    assert down.write(row) == SPOOLED
    down.close()
    # A restart: the new process adopts the spool, and replays it in the background.
    up = DecisionWriter(Repository(live), Spool(tmp_path / "spool"))
    assert up.write(dataclasses.replace(row, id=44)) == DUPLICATE  # event x was decided (spooled) already
    assert up.write(dataclasses.replace(row, id=43, event_id="y")) == STORED
    assert up.wait_replayed(10)
    up.close()
    with live.connect() as connection:
        ids = [r[0] for r in connection.execute(sa.text("SELECT id FROM decisions ORDER BY id"))]
    assert ids == [42, 43]
    live.dispose()


def test_rows_postgresql_refuses_are_quarantined_and_the_rest_stored(pg_schema: str, tmp_path: Path) -> None:
    """Defence in depth behind the API's validation: what PostgreSQL cannot hold never blocks the others."""
    live = make_engine(PG_URL, pg_schema)
    migrate(live, pg_schema)
    writer = DecisionWriter(Repository(live), Spool(tmp_path / "spool"), probe_interval_s=0.05)
    rows = [
        decision_record(1, event_id="ok-1"),
        decision_record(2, event_id="nul", event_type="a\x00b"),  # text cannot hold NUL
        decision_record(3, event_id="big", attributes={"n": 2**70}),  # JSONB numbers: 64-bit here
        decision_record(4, event_id="sur", attributes={"k": "\ud800"}),  # not UTF-8
        decision_record(5, event_id="ok-2"),
    ]
    assert writer.write_many(rows) == [SPOOLED] * 5
    assert writer.wait_replayed(10)
    assert writer.write(decision_record(6, event_id="after")) == STORED  # nothing is blocked behind them
    assert sorted(e.decision_id for e in writer.spool.quarantine_entries()) == [2, 3, 4]
    writer.close()
    assert [r[0] for r in query(pg_schema, "SELECT id FROM decisions ORDER BY id")] == [1, 5, 6]
    live.dispose()


def test_a_model_metric_that_is_nan_is_stored_as_null(pg_schema: str) -> None:
    """A metric undefined on a split (ROC-AUC of one class) must not stop training on PostgreSQL."""
    live = make_engine(PG_URL, pg_schema)
    migrate(live, pg_schema)
    row = {
        "version": "anomaly-x",
        "kind": "anomaly",
        "artifact_path": "anomaly/anomaly-x",
        "artifact_sha256": "0" * 64,
        "data_window": {"events": 3},
        "metrics": {"roc_auc_heldout": float("nan"), "trees": 30},
        "status": "challenger",
        "created_at": datetime.now(UTC),
        "promoted_at": None,
    }
    Repository(live).insert_model(row)
    assert Repository(live).get_model("anomaly-x")["metrics"] == {"roc_auc_heldout": None, "trees": 30}
    live.dispose()


def test_float_attributes_from_1e16_read_back_as_floats_from_postgresql(
    real_client: tuple[TestClient, Settings],
) -> None:
    """orjson writes a float from 1e16 up in exponent form ("1e+16"), which JSONB keeps as a numeric of
    scale 0 and prints as "10000000000000000": a float attribute read back as an int (GET /decisions/{id}
    answered 10000000000000000 for 1e16)."""
    client, settings = real_client
    attributes = {"f": 1e16, "g": -2.5e17, "h": 9.2e18, "small": 1e-7, "i": 10**16, "s": "1e+16"}
    decided = client.post(
        "/decide", json={"entity_id": "j2", "event": {"event_id": "j2", "attributes": attributes}}
    )
    assert decided.status_code == 200, decided.text
    stored = client.get(f"/decisions/{decided.json()['decision_id']}").json()["attributes"]
    assert stored == attributes
    assert {k: type(v) for k, v in stored.items()} == {k: type(v) for k, v in attributes.items()}
    (raw,) = query(settings.database_schema, "SELECT attributes FROM decisions WHERE event_id = 'j2'")
    assert isinstance(raw[0]["f"], float) and isinstance(raw[0]["i"], int)


def test_the_batch_engine_inserts_in_autocommit_and_a_refused_batch_leaves_nothing(pg_schema: str) -> None:
    """The serving platform's batch inserts go through an autocommit engine: one statement, atomic by
    itself. A batch PostgreSQL refuses stores none of its rows and leaves the connection usable (no
    transaction left aborted), and a replayed batch is still skipped row by row."""
    live = make_engine(PG_URL, pg_schema)
    migrate(live, pg_schema)
    batches = make_batch_engine(PG_URL, pg_schema)
    assert batches is not None and make_batch_engine("sqlite:///x.db") is None
    repository = Repository(live, batches)
    assert repository.insert_decisions([decision_record(1, event_id="a").to_row()]) == {1}
    refused = [decision_record(2, event_id="b").to_row(), decision_record(3, event_type="a\x00b").to_row()]
    with pytest.raises(Exception) as refusal:
        repository.insert_decisions(refused)
    assert is_record_error(refusal.value)  # the writer isolates the row, as on the main engine
    again = [decision_record(1, event_id="a").to_row(), decision_record(2, event_id="b").to_row()]
    assert repository.insert_decisions(again) == {2}
    assert [r[0] for r in query(pg_schema, "SELECT id FROM decisions ORDER BY id")] == [1, 2]
    with batches.connect() as connection:  # a pooled connection of the batch engine is in no transaction
        assert connection.connection.dbapi_connection.info.transaction_status.name == "IDLE"
    batches.dispose()
    live.dispose()


def test_a_batch_connection_the_server_dropped_costs_one_spooled_batch_and_loses_nothing(
    pg_schema: str, tmp_path: Path
) -> None:
    """The batch engine does not ping a pooled connection before using it (one round trip a batch), so
    after the server dropped it (a restart, an idle timeout) the next batch fails: it is spooled,
    acknowledged, and replayed once a probe finds the database answering."""
    live = make_engine(PG_URL, pg_schema)
    migrate(live, pg_schema)
    batches = make_batch_engine(PG_URL, pg_schema)
    assert batches is not None
    writer = DecisionWriter(
        Repository(live, batches), Spool(tmp_path / "spool"), probe_interval_s=0.05, threads=1
    )
    assert writer.write(decision_record(1, event_id="before")) == STORED
    with batches.connect() as connection:  # the pool's one connection: the writer's next batch takes it
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with live.connect() as connection:
        assert connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    assert writer.write(decision_record(2, event_id="dropped")) == SPOOLED
    assert writer.wait_replayed(10)
    assert writer.write(decision_record(3, event_id="after")) == STORED
    writer.close()
    assert [r[0] for r in query(pg_schema, "SELECT id FROM decisions ORDER BY id")] == [1, 2, 3]
    batches.dispose()
    live.dispose()
