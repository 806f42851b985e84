"""Fail safe: when a dependency fails, decisions still come back, from rules + the safe action."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from redis.exceptions import ResponseError

from decision_platform.api.app import create_app
from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.features.store import damaged_entity
from decision_platform.models.registry import KINDS
from decision_platform.serving.engine import DecisionRequest
from decision_platform.serving.platform import Platform

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
UNREACHABLE_CLUSTER = "redis+cluster://127.0.0.1:1,127.0.0.1:2"


def metric(client: TestClient, prefix: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith(prefix)
    )


@pytest.mark.parametrize("url", [UNREACHABLE_REDIS, UNREACHABLE_CLUSTER], ids=["redis", "cluster"])
def test_unreachable_feature_store_falls_back_to_the_safe_action(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform], url: str
) -> None:
    settings = make_settings(feature_store_url=url)
    with TestClient(create_app(settings, start_platform(settings))) as client:
        before = metric(client, 'dp_fallbacks_total{reason="feature_store_unavailable"}')
        errors = metric(client, 'dp_feature_store_errors_total{operation="update"}')
        response = client.post("/decide", json={"entity_id": "u1", "event": {"event_id": "f1", "amount": 5}})
        assert response.status_code == 200
        body = response.json()
        assert body["fallback"] == "feature_store_unavailable"
        assert body["action"] == settings.safe_action == 1
        assert body["policy"]["decided_by"] == "fallback"
        assert "safe default" in body["explanation"]
        assert metric(client, 'dp_fallbacks_total{reason="feature_store_unavailable"}') == before + 1
        assert metric(client, 'dp_feature_store_errors_total{operation="update"}') == errors + 1
        assert client.get("/ready").json()["checks"]["feature_store"] == "unreachable"
        # The fallback decision is stored like any other.
        stored = client.get(f"/decisions/{body['decision_id']}").json()
        assert stored["fallback"] == "feature_store_unavailable" and stored["propensity"] == 1.0


@pytest.fixture
def answers_ok_to_everything() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that is not Redis: it answers ``+OK`` to every command (as some proxies
    and test doubles do) -- the URL of a misconfigured feature store."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer(connection: socket.socket) -> None:
        with connection:
            while data := connection.recv(65536):
                connection.sendall(b"+OK\r\n" * max(1, data.count(b"*")))

    def accept() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    server.close()


@pytest.mark.parametrize("event", [True, False], ids=["event", "read"])
def test_an_endpoint_that_is_not_redis_is_an_unavailable_feature_store(
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
    answers_ok_to_everything: str,
    event: bool,
) -> None:
    """redis-py raised AttributeError from its handshake, and replies of another shape reached numpy: each
    request was a 500. A feature store that answers what the window script never returns is unavailable."""
    settings = make_settings(feature_store_url=answers_ok_to_everything)
    with TestClient(create_app(settings, start_platform(settings))) as client:
        body: dict = {"entity_id": "u1"} | ({"event": {"event_id": "f1", "amount": 5}} if event else {})
        response = client.post("/decide", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["fallback"] == "feature_store_unavailable"
        assert client.get("/ready").json()["checks"]["feature_store"] == "unreachable"


def test_block_rules_still_apply_in_fallback(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> None:
    settings = make_settings(feature_store_url=UNREACHABLE_REDIS)
    with TestClient(create_app(settings, start_platform(settings))) as client:
        body = client.post(
            "/decide",
            json={
                "entity_id": "u2",
                "event": {"event_id": "f2", "attributes": {"device_id": "dev-known-stolen-0002"}},
            },
        ).json()
        assert body["fallback"] == "feature_store_unavailable"
        assert body["action"] == 2
        assert [r["name"] for r in body["rules"]] == ["denylisted_device"]


def test_cap_rules_still_apply_in_fallback(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> None:
    settings = make_settings(feature_store_url=UNREACHABLE_REDIS, safe_action=2)
    with TestClient(create_app(settings, start_platform(settings))) as client:
        body = client.post("/decide", json={"entity_id": "internal-monitoring"}).json()
        assert body["fallback"] == "feature_store_unavailable"
        assert body["action"] == 1  # the safe action (block) moved down to what the cap allows


def _corrupt(settings: Settings, kind: str) -> None:
    model_dir = Path(settings.model_dir)
    platform = Platform.start(settings)
    record = platform.registry.champion(kind)
    platform.close()
    artifact = next(p for p in (model_dir / record["artifact_path"]).iterdir() if p.suffix in (".pt", ".npz"))
    artifact.write_bytes(artifact.read_bytes()[:100])


def test_corrupt_model_file_is_refused_and_decisions_fall_back(
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
    tmp_path: Path,
    trained: tuple[str, Path],
) -> None:
    import shutil

    private_models = tmp_path / "models"
    shutil.copytree(trained[1], private_models)
    settings = make_settings(model_dir=private_models)
    _corrupt(settings, "risk")
    platform = start_platform(settings)
    assert platform.models.risk is None and "hash" in platform.models.errors["risk"]
    with TestClient(create_app(settings, platform)) as client:
        body = client.post(
            "/decide", json={"entity_id": "c1", "event": {"event_id": "c1", "amount": 3}}
        ).json()
        assert body["fallback"] == "model_unavailable:risk"
        assert body["action"] == 1 and body["risk"] is None
        assert client.get("/ready").status_code == 503


def test_no_models_at_all_still_decides(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform], tmp_path: Path
) -> None:
    settings = make_settings(model_dir=tmp_path / "empty")
    platform = start_platform(settings)
    for kind in KINDS:  # registered rows point at files that are not there
        assert getattr(platform.models, kind) is None
    with TestClient(create_app(settings, platform)) as client:
        body = client.post("/decide", json={"entity_id": "n1"}).json()
        assert body["fallback"].startswith("model_unavailable")
        assert body["action"] == 1


def test_events_in_process_with_the_feature_store_down_are_a_503_and_counted(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> None:
    """``POST /events`` with no broker runs the worker's logic in the request, and the worker updates the
    windows outside the engine's fallback (an event must be counted, not decided without its windows). With
    Redis down that raised FeatureStoreError, which no handler knew: a 500 without Retry-After, and no
    feature-store error counted. It is an outage like any other: 503 + Retry-After, counted."""
    settings = make_settings(feature_store_url=UNREACHABLE_REDIS)
    with TestClient(create_app(settings, start_platform(settings))) as client:
        before = metric(client, 'dp_feature_store_errors_total{operation="update"}')
        response = client.post(
            "/events", json={"events": [{"event_id": "ev-down", "entity_id": "u9", "amount": 5}]}
        )
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] and "feature store" in response.json()["detail"]
        assert metric(client, 'dp_feature_store_errors_total{operation="update"}') == before + 1


def _damage(platform: Platform, entity_id: str, how: str) -> None:
    """Leave an entity's window keys as something else would: a key of another type, or a member the
    script cannot read (not "id,time,amount,...")."""
    store = platform.engine.store
    zkey, _ = store.keys(entity_id)  # type: ignore[attr-defined]
    if how == "wrong type":
        store.client.set(zkey, "not a sorted set")  # type: ignore[attr-defined]
    else:
        store.client.zadd(zkey, {"garbage": time.time() - 10})  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["wrong type", "unreadable member"])
def test_one_entity_with_damaged_windows_falls_back_alone(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform], how: str
) -> None:
    settings = make_settings()
    platform = start_platform(settings)
    events = [
        Event(event_id=f"d{k}", entity_id=f"u{k}", timestamp=1_767_571_200 + k, amount=20.0 + k)
        for k in range(4)
    ]
    reference = [
        d.record.features
        for d in platform.engine.decide_batch([DecisionRequest(e.entity_id, e) for e in events[1:]])
    ]
    _damage(platform, "u0", how)
    before = REGISTRY.get_sample_value("dp_fallbacks_total", {"reason": "entity_windows_unreadable"}) or 0.0
    again = [Event(**{**e.model_dump(), "event_id": f"again-{e.event_id}"}) for e in events]
    decided = platform.engine.decide_batch([DecisionRequest(e.entity_id, e) for e in again])
    damaged, others = decided[0].record, [d.record for d in decided[1:]]
    assert damaged.fallback == "entity_windows_unreadable" and damaged.decided_by == "fallback"
    assert (
        damaged.action == settings.safe_action and "stored windows could not be read" in damaged.explanation
    )
    assert all(r.fallback is None and r.decided_by != "fallback" for r in others)
    # The others' windows count their earlier event and this one, as they would without the damaged entity.
    assert [r.features["count_1h"] for r in others] == [f["count_1h"] + 1 for f in reference]
    assert (
        REGISTRY.get_sample_value("dp_fallbacks_total", {"reason": "entity_windows_unreadable"}) == before + 1
    )
    # A read of the damaged entity (a request without an event) falls back alike.
    assert platform.engine.decide("u0").record.fallback == "entity_windows_unreadable"


@pytest.mark.parametrize(
    "reply, entity",
    [
        (
            "WRONGTYPE Operation against a key holding the wrong kind of value script: ab, on @user_script:2",
            True,
        ),
        ("user_script:64: attempt to perform arithmetic on local 'a' (a nil value) script: ab", True),
        (
            'Error running script (call to f_ab): @user_script:?: [string "<python>"]:64: attempt to compare',
            True,
        ),
        (
            "Error running script (call to f_ab): @user_script:64: user_script:64: attempt to compare nil",
            True,
        ),
        ("OOM command not allowed when used memory > 'maxmemory'. script: ab, on @user_script:240.", False),
        (
            "Error running script (call to f_ab): @user_script:240: OOM command not allowed when used memory",
            False,
        ),
        ("READONLY You can't write against a read only replica. script: ab, on @user_script:240.", False),
        ("BUSY Redis is busy running a script.", False),
        ("LOADING Redis is loading the dataset in memory", False),
        ("max number of clients reached", False),
    ],
)
def test_only_the_entitys_own_keys_make_a_damaged_entity(reply: str, entity: bool) -> None:
    # A server condition fails the whole call (retried, or every request falls back), never one entity.
    assert damaged_entity(ResponseError(reply)) is entity
