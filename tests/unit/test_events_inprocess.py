"""POST /events without a broker: the stream worker's logic runs in-process, before the answer."""

from __future__ import annotations

from fastapi.testclient import TestClient

from decision_platform.events.messages import RawMessage


def test_batch_of_events_is_decided_in_process(client: TestClient) -> None:
    events = [{"event_id": f"ip-{i}", "entity_id": "ip-user", "amount": 10.0 + i} for i in range(5)]
    response = client.post("/events", json={"events": events})
    assert response.status_code == 200
    body = response.json()
    assert body["mode"] == "in-process" and body["accepted"] == 5
    last = client.get(f"/decisions/{body['decision_ids'][-1]}").json()
    assert last["features"]["count_1h"] == 5 and last["event_id"] == "ip-4"


def test_single_event_and_redelivery_are_idempotent(client: TestClient) -> None:
    event = {"event_id": "ip-single", "entity_id": "ip-2", "amount": 3.0}
    first = client.post("/events", json=event).json()
    again = client.post("/events", json=event).json()
    assert first["decision_ids"] == again["decision_ids"]  # the same stored decision, not a new one


def test_an_event_whose_id_another_entity_holds_is_refused_not_given_that_entitys_decision(
    client: TestClient,
) -> None:
    """It was "decided" with the first entity's decision id (counted as a duplicate) and counted in the
    second entity's windows; now it is dead-lettered, has no decision id, and leaves the windows alone."""
    first = client.post("/events", json={"event_id": "dup-1", "entity_id": "ip-a", "amount": 5.0}).json()
    batch = [
        {"event_id": "dup-1", "entity_id": "ip-b", "amount": 900.0},
        {"event_id": "b-1", "entity_id": "ip-b", "amount": 100.0},
    ]
    body = client.post("/events", json={"events": batch}).json()
    assert body["decision_ids"][0] is None and body["decision_ids"][1] not in first["decision_ids"]
    sink = client.app.state.platform.inline_worker.sink
    message, error = sink.dead_letters[-1]
    assert "already the id of another entity's event" in error and b'"ip-b"' in (message.value or b"")
    later = client.post("/events", json={"event_id": "b-2", "entity_id": "ip-b", "amount": 1.0}).json()
    features = client.get(f"/decisions/{later['decision_ids'][0]}").json()["features"]
    assert features["count_1h"] == 2 and features["sum_1h"] == 101


def test_bad_events_are_422_naming_the_field(client: TestClient) -> None:
    response = client.post(
        "/events", json={"events": [{"event_id": "x", "entity_id": "y", "amount": "lots"}]}
    )
    assert response.status_code == 422
    assert "amount" in response.json()["detail"]
    assert client.post("/events", json={"events": []}).status_code == 422


def test_poison_messages_are_dead_lettered_and_the_rest_goes_on(client: TestClient) -> None:
    worker = client.app.state.platform.inline_worker
    good = RawMessage(b'{"event_id": "ok-1", "entity_id": "p", "amount": 1}')
    summary = worker.process(
        [RawMessage(b"{nope"), good, RawMessage(b'{"event_id": "p2"}'), RawMessage(None)]
    )
    assert summary.consumed == 4 and summary.dead_lettered == 3 and summary.decided == 1
    errors = [error for _, error in worker.sink.dead_letters]
    assert any("entity_id" in e for e in errors) and any("tombstone" in e for e in errors)
