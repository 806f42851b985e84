"""The HTTP contract of DESIGN.md §4 on embedded backends: what a caller of the API sees."""

from __future__ import annotations

import itertools

import pytest
import yaml
from fastapi.testclient import TestClient

from decision_platform.config import PROJECT_ROOT

CONFIG_DIR = PROJECT_ROOT / "config"

_ids = itertools.count()


def event(**fields: object) -> dict[str, object]:
    body: dict[str, object] = {"event_id": f"ev-{next(_ids)}", "amount": 25.0, "event_type": "payment"}
    body.update(fields)
    return body


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_ready_reports_every_dependency(client: TestClient) -> None:
    body = client.get("/ready").json()
    assert body["status"] == "ready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["feature_store"] == "ok"
    assert set(body["checks"]["models"]) == {"anomaly", "risk", "policy"}


def test_decide_without_event_returns_the_full_contract(client: TestClient) -> None:
    response = client.post("/decide", json={"entity_id": "201"})
    assert response.status_code == 200
    body = response.json()
    for field in (
        "decision_id",
        "entity_id",
        "action",
        "action_name",
        "risk",
        "anomaly",
        "explanation",
        "reasons",
        "rules",
        "fallback",
        "policy",
        "model_versions",
        "latency_ms",
    ):
        assert field in body, field
    assert body["entity_id"] == "201"
    assert body["action"] in (0, 1, 2)
    assert body["action_name"] == ("allow", "throttle", "block")[body["action"]]
    assert 0.0 <= body["risk"] <= 1.0 and 0.0 <= body["anomaly"] <= 1.0
    assert body["fallback"] is None
    assert body["explanation"].endswith(".")
    probabilities = body["policy"]["probabilities"]
    assert len(probabilities) == 3 and abs(sum(probabilities) - 1.0) < 1e-6
    assert 0.0 < body["policy"]["propensity"] <= 1.0
    assert set(body["model_versions"]) == {"anomaly", "risk", "policy"}


def test_decision_ids_are_unique_and_time_ordered(client: TestClient) -> None:
    ids = [client.post("/decide", json={"entity_id": "7"}).json()["decision_id"] for _ in range(20)]
    assert ids == sorted(ids) and len(set(ids)) == 20
    assert all(0 < i < 2**63 for i in ids)


def test_event_updates_windows_exactly_once_and_a_retry_gets_the_same_decision(client: TestClient) -> None:
    first = event(amount=10.0)
    original = client.post("/decide", json={"entity_id": "w1", "event": first}).json()
    client.post("/decide", json={"entity_id": "w1", "event": event(amount=30.0)})
    retry = client.post("/decide", json={"entity_id": "w1", "event": first})  # e.g. a client timeout retry
    assert retry.status_code == 200
    assert retry.json()["decision_id"] == original["decision_id"]
    assert retry.json()["action"] == original["action"]
    third = client.post("/decide", json={"entity_id": "w1", "event": event(amount=5.0)}).json()
    stored = client.get(f"/decisions/{third['decision_id']}").json()
    # Three distinct events counted; the retry did not count a fourth time.
    assert stored["features"]["count_1h"] == 3
    assert stored["features"]["sum_1h"] == pytest.approx(45.0)


def test_decision_record_is_stored_with_what_ope_needs(client: TestClient) -> None:
    body = client.post("/decide", json={"entity_id": "r1", "event": event(amount=99.0)}).json()
    stored = client.get(f"/decisions/{body['decision_id']}").json()
    assert stored["action"] == body["action"]
    assert stored["propensity"] == pytest.approx(body["policy"]["propensity"])
    assert stored["probabilities"] == pytest.approx(body["policy"]["probabilities"])
    assert stored["proposed_action"] == body["policy"]["proposed_action"]
    assert stored["action_mask"] == [True, True, True]
    assert stored["features"]["amount"] == 99.0
    assert stored["model_versions"] == body["model_versions"]
    assert stored["explanation"] == body["explanation"]


def test_block_rule_wins_whatever_the_policy_says(client: TestClient) -> None:
    body = client.post(
        "/decide",
        json={"entity_id": "b1", "event": event(attributes={"device_id": "dev-known-stolen-0001"})},
    ).json()
    assert body["action"] == 2
    assert body["rules"][0]["name"] == "denylisted_device"
    assert body["policy"]["decided_by"] == "rule"
    assert body["policy"]["propensity"] == 1.0


def test_cap_rule_never_blocks_an_allowlisted_entity(client: TestClient) -> None:
    # 25 events in a minute would trip the block-tier burst rule for anyone else: block beats cap.
    # Here only floor + cap fire (8 events in 5 minutes): throttle is the only action left.
    for _ in range(8):
        body = client.post("/decide", json={"entity_id": "qa-synthetic-buyer", "event": event()}).json()
    assert {r["name"] for r in body["rules"]} >= {"allowlisted_entity", "velocity_step_up"}
    assert body["action"] == 1


# --- outcomes


def decided(client: TestClient, amount: float = 50.0) -> dict:
    return client.post("/decide", json={"entity_id": "o1", "event": event(amount=amount)}).json()


def test_outcome_is_stored_with_its_reward_from_config(client: TestClient) -> None:
    decision = decided(client, amount=50.0)
    response = client.post("/outcome", json={"decision_id": decision["decision_id"], "outcome": "success"})
    assert response.status_code == 201
    table = yaml.safe_load((CONFIG_DIR / "rewards.yaml").read_text())
    cell = table["outcomes"]["success"][decision["action_name"]]
    expected = cell.get("base", 0.0) + cell.get("per_amount", 0.0) * 50.0
    assert response.json()["reward"] == pytest.approx(expected)
    assert response.json()["created"] is True


def test_same_outcome_twice_is_idempotent(client: TestClient) -> None:
    decision = decided(client)
    first = client.post("/outcome", json={"decision_id": decision["decision_id"], "outcome": "fraud"})
    second = client.post("/outcome", json={"decision_id": decision["decision_id"], "outcome": "fraud"})
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["created"] is False
    assert second.json()["reward"] == first.json()["reward"]


def test_conflicting_outcome_is_409(client: TestClient) -> None:
    decision = decided(client)
    client.post("/outcome", json={"decision_id": decision["decision_id"], "outcome": "fraud"})
    response = client.post("/outcome", json={"decision_id": decision["decision_id"], "outcome": "success"})
    assert response.status_code == 409
    assert "fraud" in response.json()["detail"]


def test_unknown_decision_is_404(client: TestClient) -> None:
    response = client.post("/outcome", json={"decision_id": 123456789, "outcome": "success"})
    assert response.status_code == 404
    assert client.get("/decisions/123456789").status_code == 404


def test_unknown_outcome_is_422_naming_the_vocabulary(client: TestClient) -> None:
    decision = decided(client)
    response = client.post("/outcome", json={"decision_id": decision["decision_id"], "outcome": "great"})
    assert response.status_code == 422
    assert "great" in response.json()["detail"] and "chargeback" in response.json()["detail"]


@pytest.mark.parametrize("damage", ["action = 3", "action = -1", "amount = 9e999"])
def test_an_outcome_for_a_damaged_stored_decision_is_409_and_stores_no_reward(
    client: TestClient, damage: str
) -> None:
    """A decision row a hand edit left with an action the platform never writes (3 was a 500; -1 was read as
    a block) or an infinite amount (a reward of inf was stored, and every later policy comparison was inf)."""
    decision = decided(client, amount=50.0)
    with client.app.state.platform.repository.engine.begin() as connection:
        connection.exec_driver_sql(f"UPDATE decisions SET {damage} WHERE id = {decision['decision_id']}")
    response = client.post("/outcome", json={"decision_id": decision["decision_id"], "outcome": "fraud"})
    assert response.status_code == 409
    named = f"decision {decision['decision_id']} is stored damaged: {damage.split(' ')[0]} holds"
    assert response.json()["detail"].startswith(named)
    with client.app.state.platform.repository.engine.connect() as connection:
        stored = f"SELECT count(*) FROM outcomes WHERE decision_id = {decision['decision_id']}"
        assert connection.exec_driver_sql(stored).scalar() == 0


# --- bad input: always a clear 4xx naming the problem, never a 5xx

BAD_DECIDE_BODIES = [
    ({}, "entity_id"),
    ({"entity_id": ""}, "entity_id"),
    ({"entity_id": 42}, "entity_id"),
    ({"entity_id": "a b"}, "entity_id"),
    ({"entity_id": "1", "extra": True}, "extra"),
    ({"entity_id": "1", "event": {"amount": 1.0}}, "event.event_id"),
    ({"entity_id": "1", "event": {"event_id": "x", "amount": "abc"}}, "event.amount"),
    ({"entity_id": "1", "event": {"event_id": "x", "amount": -5}}, "event.amount"),
    ({"entity_id": "1", "event": {"event_id": "x", "timestamp": "yesterday"}}, "event.timestamp"),
    ({"entity_id": "1", "event": {"event_id": "x", "timestamp": 1e15}}, "event.timestamp"),
    ({"entity_id": "1", "event": {"event_id": "x", "attributes": {"k": [1, 2]}}}, "event.attributes"),
    (
        {"entity_id": "1", "event": {"event_id": "x", "attributes": {f"k{i}": i for i in range(40)}}},
        "event.attributes",
    ),
    ({"entity_id": "1", "event": {"event_id": "x", "entity_id": "2"}}, "entity_id"),
    ({"entity_id": "1", "event": {"event_id": "x", "colour": "red"}}, "event.colour"),
]


@pytest.mark.parametrize(("body", "field"), BAD_DECIDE_BODIES)
def test_bad_decide_input_is_422_naming_the_field(client: TestClient, body: dict, field: str) -> None:
    response = client.post("/decide", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"outcome": "success"}, "decision_id"),
        ({"decision_id": "abc", "outcome": "success"}, "decision_id"),
        ({"decision_id": 1}, "outcome"),
        ({"decision_id": -1, "outcome": "success"}, "decision_id"),
    ],
)
def test_bad_outcome_input_is_422_naming_the_field(client: TestClient, body: dict, field: str) -> None:
    response = client.post("/outcome", json=body)
    assert response.status_code == 422
    assert field in response.json()["detail"]


def test_invalid_json_is_422(client: TestClient) -> None:
    response = client.post("/decide", content=b'{"entity_id": ', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "JSON" in response.json()["detail"]


def test_huge_payload_is_413_before_parsing(client: TestClient) -> None:
    response = client.post(
        "/decide", content=b"{" + b" " * 200_000 + b"}", headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_non_integer_decision_path_is_422(client: TestClient) -> None:
    assert client.get("/decisions/abc").status_code == 422


def test_metrics_move_with_decisions(client: TestClient) -> None:
    def count() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith('dp_decision_latency_seconds_count{stage="total"}'):
                return float(line.split()[-1])
        return 0.0

    before = count()
    client.post("/decide", json={"entity_id": "m1"})
    assert count() == before + 1
