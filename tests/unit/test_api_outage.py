"""What a caller of the API sees while the database is away, on the embedded backends (the same write
path as PostgreSQL; the fault-injection suite in tests/e2e does it against the real services)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from decision_platform.api.app import create_app
from decision_platform.config import Settings
from decision_platform.serving.platform import Platform
from tests.conftest import HangingSpoolDisk


def platform_of(client: TestClient) -> Platform:
    return client.app.state.platform  # type: ignore[attr-defined]


def take_the_decisions_table_away(platform: Platform, away: bool) -> None:
    names = ("decisions", "decisions_away") if away else ("decisions_away", "decisions")
    with platform.repository.engine.begin() as connection:
        connection.execute(sa.text(f"ALTER TABLE {names[0]} RENAME TO {names[1]}"))


def test_during_an_outage_spooled_decisions_are_readable_and_take_outcomes(client: TestClient) -> None:
    platform = platform_of(client)
    before = client.post("/decide", json={"entity_id": "o-0", "event": {"event_id": "o-ev-0"}}).json()
    take_the_decisions_table_away(platform, True)
    decided = client.post("/decide", json={"entity_id": "o-1", "event": {"event_id": "o-ev-1", "amount": 5}})
    assert decided.status_code == 200
    spooled = decided.json()

    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["checks"]["spool"]["pending"] == 1
    assert ready.json()["checks"]["database"].startswith("unavailable")

    # A spooled decision: served from the spool. One only the database knows: 503, never a false 404.
    assert client.get(f"/decisions/{spooled['decision_id']}").json()["action"] == spooled["action"]
    unknown = client.get(f"/decisions/{before['decision_id']}")
    assert unknown.status_code == 503 and unknown.headers["retry-after"].isdigit()
    assert "database unavailable" in unknown.json()["detail"]

    # The same event retried during the outage: the first decision.
    again = client.post("/decide", json={"entity_id": "o-1", "event": {"event_id": "o-ev-1", "amount": 5}})
    assert again.json()["decision_id"] == spooled["decision_id"]

    outcome = {"decision_id": spooled["decision_id"], "outcome": "fraud"}
    assert client.post("/outcome", json=outcome).status_code == 201  # spooled behind its decision
    assert client.post("/outcome", json=outcome).status_code == 200  # idempotent
    assert client.post("/outcome", json={**outcome, "outcome": "chargeback"}).status_code == 409
    answer = client.post("/outcome", json={"decision_id": before["decision_id"], "outcome": "fraud"})
    assert answer.status_code == 503 and "retry-after" in answer.headers

    take_the_decisions_table_away(platform, False)
    deadline = time.monotonic() + 10
    while platform.writer.status().pending and time.monotonic() < deadline:  # no request needed
        time.sleep(0.05)
    stored = platform.repository.get_decision(spooled["decision_id"])
    assert stored is not None and stored.event_id == "o-ev-1"
    landed = platform.repository.get_outcome(spooled["decision_id"])
    assert landed is not None and landed.outcome == "fraud"
    assert client.get("/ready").json()["checks"]["spool"] == {"pending": 0, "quarantined": 0}


def test_an_outcome_that_cannot_follow_the_action_is_refused(client: TestClient) -> None:
    body = {
        "entity_id": "blk-1",
        "event": {"event_id": "blk-ev", "attributes": {"device_id": "dev-known-stolen-0001"}},
    }
    blocked = client.post("/decide", json=body).json()
    assert blocked["action"] == 2  # the deny-list rule
    refused = client.post("/outcome", json={"decision_id": blocked["decision_id"], "outcome": "success"})
    assert refused.status_code == 422
    assert "cannot follow a decision to block" in refused.json()["detail"]
    accepted = client.post("/outcome", json={"decision_id": blocked["decision_id"], "outcome": "fraud"})
    assert accepted.status_code == 201


def test_a_spool_disk_that_hangs_answers_503_in_time_and_the_retry_gets_one_decision(
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database is away and the spool's disk hangs: /decide answered 503 only after the decider's 60 s.
    Now within DP_SPOOL_TIMEOUT_S, with Retry-After; once the disk answers, the client's retry gets the
    decision that became durable meanwhile, and the database ends up with that one decision."""
    settings = make_settings(spool_timeout_s=0.5)
    with TestClient(create_app(settings, start_platform(settings))) as client:
        platform = platform_of(client)
        assert client.post("/decide", json={"entity_id": "h-0"}).status_code == 200
        take_the_decisions_table_away(platform, True)
        disk = HangingSpoolDisk(monkeypatch)
        body = {"entity_id": "h-1", "event": {"event_id": "h-ev-1", "amount": 5}}
        started = time.monotonic()
        answer = client.post("/decide", json=body)
        assert answer.status_code == 503 and answer.headers["retry-after"].isdigit(), answer.text
        assert time.monotonic() - started < 5.0 and disk.hanging.is_set()
        assert client.get("/ready").json()["checks"]["spool"]["pending"] == 0  # answers, the disk stuck
        disk.release()
        deadline = time.monotonic() + 10
        while platform.writer.status().pending == 0:
            assert time.monotonic() < deadline, "the stuck append never completed"
            time.sleep(0.02)
        retry = client.post("/decide", json=body)
        assert retry.status_code == 200
        take_the_decisions_table_away(platform, False)
        assert platform.writer.wait_replayed(10)
        with platform.repository.engine.connect() as connection:
            ids = connection.execute(sa.text("SELECT id FROM decisions WHERE event_id = 'h-ev-1'")).scalars()
            assert list(ids) == [retry.json()["decision_id"]]


def test_a_quarantine_that_cannot_be_read_is_said_by_ready_and_spool_status(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``quarantine.jsonl`` not a file (a directory an operator made there; a disk error reading it): every
    GET /ready answered 500, so a load balancer dropped a server that decided as usual, and ``spool status``
    / ``spool requeue`` stopped with an IsADirectoryError traceback. Now /ready names it (and still judges
    the server by its database, feature store and models), and the commands say it in one line, exit 2."""
    from typer.testing import CliRunner

    from decision_platform.cli import main as cli
    from decision_platform.cli import spool as spool_commands

    platform = client.app.state.platform  # type: ignore[attr-defined]
    (platform.settings.spool_dir / "quarantine.jsonl").mkdir(parents=True)
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["spool"]["quarantined"] == "unreadable: Is a directory"
    assert client.post("/decide", json={"entity_id": "q1"}).status_code == 200

    monkeypatch.setattr(spool_commands, "get_settings", lambda: platform.settings)
    for command in ("status", "requeue"):
        result = CliRunner().invoke(cli.app, ["spool", command])
        assert result.exit_code == 2, result.output
        assert "quarantine.jsonl: Is a directory" in " ".join(result.output.split()), result.output
