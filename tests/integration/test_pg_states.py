"""PostgreSQL answering, but in a state that refuses the request: what callers see.

The fault-injection suite (tests/e2e/test_faults.py) covers a database that refuses connections or stops
answering; here the server answers every statement with an error of its state, injected on the
platform's own connections only (the machine's PostgreSQL is shared: nothing of it is reconfigured).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from decision_platform.api.app import create_app
from decision_platform.config import Settings
from decision_platform.serving.platform import Platform
from tests.conftest import PG_URL

pytestmark = pytest.mark.integration

ADMIN = {"X-API-Key": "k"}


@pytest.fixture
def pg_client(
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
    pg_schema: str,
) -> Iterator[tuple[TestClient, Platform]]:
    settings = make_settings(database_url=PG_URL, database_schema=pg_schema, api_key="k")
    platform = start_platform(settings)
    with TestClient(create_app(settings, platform)) as client:
        yield client, platform


@contextmanager
def on_every_connection(platform: Platform, statement: str) -> Iterator[None]:
    """Run ``statement`` first on every new connection of the platform's engines while inside; the pooled
    connections are dropped on the way in and out, so that the next requests meet it, then no more."""

    def run(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.execute(statement)
        dbapi_connection.commit()

    engines = [e for e in (platform.repository.engine, platform.repository.batch_engine) if e is not None]
    for engine in engines:
        sa.event.listen(engine, "connect", run)
        engine.dispose()
    try:
        yield
    finally:
        for engine in engines:
            sa.event.remove(engine, "connect", run)
            engine.dispose()


def test_a_read_only_database_is_a_503_for_admin_writes_too(pg_client: tuple[TestClient, Platform]) -> None:
    """A PostgreSQL that takes no writes (a standby after a failover, ``default_transaction_read_only``)
    answers ReadOnlySqlTransaction, which psycopg raises as an InternalError: promoting or shadowing a
    model answered 500 "internal error" with a traceback logged, while the decision path already took it
    for the outage it is. Now 503 + Retry-After naming it; decisions are still acknowledged (spooled), and
    all of it works again once the database takes writes."""
    client, platform = pg_client
    policy = platform.repository.list_models("policy")[0]
    platform.repository.insert_model({**policy, "version": "policy-standby-1", "status": "challenger"})
    stored = client.post("/decide", json={"entity_id": "ro-0", "event": {"event_id": "ro-ev-0"}}).json()
    outcome = {"decision_id": stored["decision_id"], "outcome": "success"}

    with on_every_connection(platform, "SET default_transaction_read_only = on"):
        decided = client.post("/decide", json={"entity_id": "ro-1", "event": {"event_id": "ro-ev-1"}})
        assert decided.status_code == 200
        shadow = client.post("/admin/models/policy-standby-1/shadow", headers=ADMIN)
        promote = client.post("/admin/models/policy-standby-1/promote", headers=ADMIN)
        labelled = client.post("/outcome", json=outcome)
    for answer in (shadow, promote, labelled):
        assert answer.status_code == 503, answer.json()
        assert answer.headers["retry-after"].isdigit()
        assert "database unavailable" in answer.json()["detail"]
    assert "ReadOnlySqlTransaction" in promote.json()["detail"]

    assert client.post("/admin/models/policy-standby-1/promote", headers=ADMIN).status_code == 200
    assert platform.writer.wait_replayed(10)
    assert platform.repository.get_decision(decided.json()["decision_id"]) is not None
    assert client.post("/outcome", json=outcome).status_code == 201
