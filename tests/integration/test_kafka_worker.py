"""The stream worker against a real Kafka-protocol broker (tansu, or TEST_KAFKA_BOOTSTRAP_SERVERS),
the running PostgreSQL and Redis: exact windows, poison messages, crashes, two worker processes in one
group on a Redis Cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.devtools.redis_cluster import LocalRedisCluster
from decision_platform.devtools.tansu import free_port, start_broker
from decision_platform.devtools.tcp_proxy import TcpProxy
from decision_platform.events.kafka import KafkaSink, KafkaSource, ensure_topics
from decision_platform.features import FeatureSpec, OfflineWindows, compute_features, open_feature_store
from decision_platform.features.store import DEFAULT_KEY_PREFIX
from decision_platform.observability import metrics
from decision_platform.serving.platform import Platform
from decision_platform.serving.worker import StreamWorker
from tests.integration.conftest import query

pytestmark = pytest.mark.integration
T0 = 1_780_000_000.0


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    if os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["TEST_KAFKA_BOOTSTRAP_SERVERS"]
        return
    process, bootstrap = start_broker()
    yield bootstrap
    process.kill()
    process.wait()


@pytest.fixture
def kafka_settings(
    broker: str,
    make_settings: Callable[..., Settings],
    pg_schema: str,
    redis_db: str,
) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return make_settings(
        database_url="postgresql://postgres@127.0.0.1:5432/test",
        database_schema=pg_schema,
        feature_store_url=redis_db,
        kafka_bootstrap_servers=broker,
        kafka_events_topic=f"events-{suffix}",
        kafka_decisions_topic=f"decisions-{suffix}",
        kafka_dlq_topic=f"events-dlq-{suffix}",
        kafka_group_id=f"workers-{suffix}",
        kafka_events_partitions=4,
        kafka_session_timeout_ms=3000,
        kafka_heartbeat_interval_ms=300,
        worker_batch_size=200,
        worker_feature_store_timeout_s=5.0,
    )


def make_events(n: int, entities: int, seed: int = 0) -> list[dict]:
    """Payments of several entities; event time jitters backwards (out of order within the window)."""
    rng = np.random.default_rng(seed)
    events = []
    for i in range(n):
        late_by = float(rng.choice([0.0, 0.0, 0.0, rng.uniform(1, 600)]))
        events.append(
            {
                "event_id": f"ev-{seed}-{i}",
                "entity_id": f"user-{i % entities}",
                "timestamp": T0 + i * 2.0 - late_by,
                "amount": round(float(rng.gamma(2.0, 20.0)), 2),
                "attributes": {"device_id": f"d{int(rng.integers(3))}"},
            }
        )
    return events


def produce(settings: Settings, payloads: list[bytes | dict], keys: list[str] | None = None) -> None:
    ensure_topics(settings)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for i, payload in enumerate(payloads):
        value = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        key = (keys[i] if keys else payload["entity_id"] if isinstance(payload, dict) else "poison").encode()
        producer.produce(settings.kafka_events_topic, key=key, value=value)
    assert producer.flush(10) == 0


def decision_count(settings: Settings) -> int:
    return query(settings.database_schema, "SELECT count(*) FROM decisions")[0][0]


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def expected_features(events: list[dict], spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Brute force: the offline twin over each entity's events in production order, first copies only."""
    seen: set[str] = set()
    unique = []
    for e in events:
        if e["event_id"] not in seen:
            seen.add(e["event_id"])
            unique.append(Event.model_validate(e))
    return dict(zip([e.event_id for e in unique], compute_features(unique, spec), strict=True))


def assert_windows_exact(settings: Settings, events: list[dict], in_flight: int = 0) -> None:
    """One decision per distinct event; the windows in Redis equal a brute-force recomputation; every
    decision's feature snapshot is the point-in-time vector, except at most ``in_flight`` of them.

    ``in_flight``: after a crash, events whose windows were updated but whose decisions were not yet
    stored are decided on redelivery with the windows as they are then (which may include out-of-order
    events that arrived later in the same batch); at most two batches per crash (the worker updates batch
    k+2's windows while it decides k+1 and stores k).
    """
    spec = FeatureSpec.load(settings.features_path)
    expected = expected_features(events, spec)
    rows = query(settings.database_schema, "SELECT event_id, features FROM decisions")
    assert len(rows) == len(expected)  # nothing lost, nothing decided twice
    drifted = [
        event_id
        for event_id, features in rows
        if not np.allclose([features[n] for n in spec.names], expected[event_id], rtol=1e-9, atol=1e-9)
    ]
    assert len(drifted) <= in_flight, f"{len(drifted)} snapshots differ: {drifted[:5]}"
    # The windows themselves are exact: each entity's state now equals the brute force.
    offline = OfflineWindows(spec)
    for event in (Event.model_validate(e) for e in events):
        offline.update(event)
    store = open_feature_store(settings.feature_store_url, spec, 5.0)
    at = max(e["timestamp"] for e in events) + 1
    for entity in {e["entity_id"] for e in events}:
        brute = spec.assemble(np.asarray([offline.read(entity, at)]), spec.event_values([at], None))[0]
        np.testing.assert_allclose(store.read(entity, at).values, brute, rtol=1e-9)
    store.close()


def read_topic(
    settings: Settings,
    topic: str,
    expected: int,
    timeout_s: float = 20,
    distinct: Callable[[Any], Any] | None = None,
) -> list:
    """The topic's messages from the start, until ``expected`` of them (``distinct``: of distinct keys
    of that function of a message: an at-least-once topic may hold copies) or the timeout."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 3000,
            "heartbeat.interval.ms": 300,
        }
    )
    consumer.subscribe([topic])
    messages: list = []
    deadline = time.monotonic() + timeout_s

    def enough() -> bool:
        return len({distinct(m) for m in messages} if distinct else messages) >= expected

    while not enough() and time.monotonic() < deadline:
        messages += [m for m in consumer.consume(100, 0.5) if not m.error()]
    consumer.close()
    return messages


def run_in_thread(
    settings: Settings, start: Callable[[Settings], Platform]
) -> tuple[threading.Event, threading.Thread]:
    platform = start(settings.model_copy(update={"feature_store_timeout_s": 5.0}))
    worker = StreamWorker(settings, platform.engine, platform.store, KafkaSink(settings))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(KafkaSource(settings), stop), daemon=True)
    thread.start()
    return stop, thread


def test_exact_windows_duplicates_and_dead_letters(
    kafka_settings: Settings, start_platform: Callable[[Settings], Platform]
) -> None:
    events = make_events(400, entities=7)
    redelivered = events[10:30]  # at-least-once: the same events again
    poison = [b"{not json", json.dumps({"event_id": "bad-1", "entity_id": "u", "amount": -3}).encode()]
    produce(kafka_settings, [*events, *redelivered])
    produce(kafka_settings, poison, keys=["p1", "p2"])

    stop, thread = run_in_thread(kafka_settings, start_platform)
    try:
        wait_for(lambda: decision_count(kafka_settings) >= 400, 60, "400 decisions")
        dead = read_topic(kafka_settings, kafka_settings.kafka_dlq_topic, expected=2)
    finally:
        stop.set()
        thread.join(30)
    assert_windows_exact(kafka_settings, [*events, *redelivered])

    assert sorted(m.value() for m in dead) == sorted(poison)  # the original bytes are kept
    errors = [dict(m.headers())["error"].decode() for m in dead]
    assert any("amount" in e for e in errors) and any("JSON" in e or "json" in e for e in errors)
    published = read_topic(kafka_settings, kafka_settings.kafka_decisions_topic, expected=420)
    assert {json.loads(m.value())["decision_id"] for m in published} == {
        r[0] for r in query(kafka_settings.database_schema, "SELECT id FROM decisions")
    }


def worker_process(settings: Settings, log: Path) -> subprocess.Popen:
    env = {**os.environ}
    for name, value in settings.model_dump().items():
        if value is not None and not isinstance(value, tuple):
            env[f"DP_{name.upper()}"] = str(value)
    return subprocess.Popen(
        [sys.executable, "-m", "decision_platform.cli", "worker"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_a_killed_worker_loses_and_double_counts_nothing(kafka_settings: Settings, tmp_path: Path) -> None:
    events = make_events(3000, entities=40, seed=1)
    produce(kafka_settings, events)
    first = worker_process(kafka_settings, tmp_path / "w1.log")
    try:
        wait_for(lambda: decision_count(kafka_settings) >= 300, 90, "the first worker to make progress")
        first.send_signal(signal.SIGKILL)  # no chance to commit its current batch
        first.wait(10)
        assert decision_count(kafka_settings) < 3000, "the worker finished before it could be killed"
        second = worker_process(kafka_settings, tmp_path / "w2.log")
        try:
            wait_for(lambda: decision_count(kafka_settings) >= 3000, 120, "all decisions after the restart")
        finally:
            second.terminate()
            assert second.wait(30) == 0, (tmp_path / "w2.log").read_text()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    # Up to two batches' windows ahead of their stored decisions at the kill: k+2's windows are updated
    # while k+1 is decided and k stored.
    assert_windows_exact(kafka_settings, events, in_flight=2 * kafka_settings.worker_batch_size)


def test_a_frozen_broker_delays_the_stream_and_loses_nothing(
    kafka_settings: Settings, start_platform: Callable[[Settings], Platform], tmp_path: Path
) -> None:
    """The broker stops answering (SIGSTOP) for longer than the worker waits for its acknowledgements: the
    batch in hand is given up uncommitted, counted, and processed again once the broker is back. Every
    event is decided once, every decision is published, and the group commits every offset.

    Nothing can be produced while the broker is frozen, so whether the freeze lands mid-stream depends on
    the worker's speed: a round whose freeze came after the worker had finished proves nothing, and a new
    round (twice the events, its own entities) freezes again, up to three rounds."""
    process, bootstrap = start_broker(log_path=tmp_path / "tansu.log")  # its own broker: it gets frozen
    settings = kafka_settings.model_copy(
        update={"kafka_bootstrap_servers": bootstrap, "worker_publish_timeout_s": 2.0}
    )
    failures = metrics.WORKER_BATCH_FAILURES.labels(error="BrokerUnavailableError")
    failed_before = failures._value.get()
    events: list[dict] = []
    try:
        with worker_running(settings, start_platform):
            for attempt in range(3):
                round_events = make_events(2000 * 2**attempt, entities=30, seed=3 + attempt)
                for event in round_events:
                    event["entity_id"] = f"r{attempt}-{event['entity_id']}"
                produce(settings, round_events)
                progress = len(events) + len(round_events) // 10
                wait_for(lambda n=progress: decision_count(settings) >= n, 90, "the worker to make progress")
                events += round_events
                freeze(process, 6.0)  # 3 publish timeouts
                wait_until_done(settings, len(events))
                if failures._value.get() > failed_before:
                    break  # the outage is visible, not only slow
            else:
                pytest.fail("three freezes of the broker all came after the worker had finished its events")
        assert_windows_exact(settings, events, in_flight=2 * settings.worker_batch_size)
        assert_published_are_stored(settings, len(events))
    finally:
        process.kill()
        process.wait()


def test_a_frozen_redis_delays_the_stream_and_loses_nothing(
    kafka_settings: Settings, start_platform: Callable[[Settings], Platform], tmp_path: Path
) -> None:
    """The worker's Redis stops answering (SIGSTOP: connections accepted, nothing read) for longer than the
    worker's feature-store timeout: each batch attempt fails within the timeout, counted (a feature-store
    error and a failed batch), uncommitted; once Redis answers, every event is decided once, its windows
    exact, and the group commits every offset. The worker never waits on the frozen Redis for good.

    Most events are produced only once Redis is frozen, so the worker meets the freeze however fast it is."""
    port = free_port()
    log = (tmp_path / "redis.log").open("ab")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    settings = kafka_settings.model_copy(update={"feature_store_url": f"redis://127.0.0.1:{port}/0"})
    events = make_events(1000, entities=30, seed=4)
    store_errors = metrics.FEATURE_STORE_ERRORS.labels(operation="update")
    failures = metrics.WORKER_BATCH_FAILURES.labels(error="FeatureStoreError")
    errors_before, failed_before = store_errors._value.get(), failures._value.get()
    try:
        wait_for(lambda: redis.Redis(port=port).ping(), 10, "our redis-server")
        with worker_running(settings, start_platform):
            produce(settings, events[:100])
            wait_for(lambda: decision_count(settings) >= 100, 90, "the worker to make progress")
            # past the worker's 5 s feature-store timeout, with the rest of the events arriving meanwhile
            freeze(server, 7.0, meanwhile=lambda: produce(settings, events[100:]))
            wait_until_done(settings, len(events))
        assert failures._value.get() > failed_before, "no batch failure counted while Redis was frozen"
        assert store_errors._value.get() > errors_before  # the dependency failure itself is counted too
        assert_windows_exact(settings, events, in_flight=2 * settings.worker_batch_size)
    finally:
        server.kill()
        server.wait()
        log.close()


@contextmanager
def worker_running(settings: Settings, start_platform: Callable[[Settings], Platform]) -> Iterator[None]:
    """A stream worker runs in a thread for the block's duration."""
    stop, thread = run_in_thread(settings, start_platform)
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


def freeze(process: subprocess.Popen, seconds: float, meanwhile: Callable[[], None] = lambda: None) -> None:
    """Stop ``process`` (SIGSTOP: its sockets stay open, nothing is read) for ``seconds``, calling
    ``meanwhile`` at its start."""
    process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        meanwhile()
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    finally:
        process.send_signal(signal.SIGCONT)


def assert_published_are_stored(settings: Settings, events: int) -> None:
    """The decisions topic holds one decision per event, each the stored one: at least once on the topic
    (a retried batch publishes again), and always the decision the database kept."""

    def decision_id(message: Any) -> int:
        return json.loads(message.value())["decision_id"]

    published = read_topic(
        settings, settings.kafka_decisions_topic, expected=events, timeout_s=60, distinct=decision_id
    )
    stored = {r[0] for r in query(settings.database_schema, "SELECT id FROM decisions")}
    assert {decision_id(m) for m in published} == stored


def wait_until_done(settings: Settings, events: int) -> None:
    """Every event decided and every offset committed by the worker group."""
    wait_for(lambda: decision_count(settings) >= events, 120, "every decision once it answers again")
    wait_for(lambda: sum(committed_offsets(settings)) == events, 60, "every offset committed")


def committed_offsets(settings: Settings) -> list[int]:
    """The worker group's committed offset of each events partition (-1001: none yet). The topic is new and
    has one producer, so the offsets add up to the messages the group is done with."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": settings.kafka_group_id}
    )
    try:
        partitions = [
            TopicPartition(settings.kafka_events_topic, p) for p in range(settings.kafka_events_partitions)
        ]
        return [c.offset for c in consumer.committed(partitions, timeout=5)]
    finally:
        consumer.close()


def assigned(log: Path) -> list[int]:
    """The partitions a worker process owns now: its last "assigned partitions [...]" log line."""
    lines = re.findall(r"assigned partitions \[([\d, ]*)\]", log.read_text() if log.exists() else "")
    return [int(p) for p in lines[-1].split(",") if p.strip()] if lines else []


@pytest.mark.parametrize("outage", ["refuse", "freeze"])
def test_a_database_outage_spools_the_streams_decisions_and_replays_each_once(
    kafka_settings: Settings, start_platform: Callable[[Settings], Platform], outage: str
) -> None:
    """PostgreSQL goes away (refuse: connections reset, new ones refused; freeze: a stalled server, nothing
    answered) while events keep coming: the stream does not stop -- every event is decided, its decision
    spooled (durable on disk), published and its offset committed while the database is still down -- and
    once it is back the spool is replayed: every event stored once, the stored decisions the published
    ones, the windows exact."""
    events = make_events(1000, entities=30, seed=6)
    spooled, replayed = metrics.DECISIONS_SPOOLED, metrics.SPOOL_REPLAYED
    spooled_before, replayed_before = spooled._value.get(), replayed._value.get()
    with TcpProxy(("127.0.0.1", 5432)) as database:
        settings = kafka_settings.model_copy(
            update={"database_url": f"postgresql://postgres@127.0.0.1:{database.port}/test"}
        )
        with worker_running(settings, start_platform):
            produce(settings, events[:200])
            wait_for(lambda: decision_count(settings) >= 200, 90, "the worker to make progress")
            database.set_mode(outage)
            produce(settings, events[200:])
            # Decided, spooled, published and committed with the database still down.
            wait_for(lambda: sum(committed_offsets(settings)) == len(events), 120, "every offset committed")
            assert decision_count(settings) < len(events)  # counted straight from PostgreSQL: not there
            assert spooled._value.get() - spooled_before >= len(events) - decision_count(settings)
            database.forward()
            wait_for(lambda: decision_count(settings) >= len(events), 120, "the spool replayed")
    assert replayed._value.get() > replayed_before
    assert_published_are_stored(settings, len(events))
    assert_windows_exact(settings, events)  # nothing failed: every snapshot the point-in-time vector


def test_two_worker_processes_on_a_redis_cluster_decide_every_event_once(
    kafka_settings: Settings, redis_cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    """Scale-out: two worker processes share the topic's 4 partitions (one consumer group) and the
    windows live on a 3-master Redis Cluster: every event decided exactly once, windows exact."""
    assert kafka_settings.kafka_events_partitions >= 2
    settings = kafka_settings.model_copy(update={"feature_store_url": redis_cluster.url})
    for node in redis_cluster.ports:  # this session's own cluster: clear what earlier tests left
        redis.Redis(host="127.0.0.1", port=node).flushall()
    ensure_topics(settings)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [worker_process(settings, log) for log in logs]
    try:
        # Both have joined and the group has settled when their assignments split the partitions.
        wait_for(
            lambda: (
                sorted(assigned(logs[0]) + assigned(logs[1])) == list(range(4))
                and all(assigned(log) for log in logs)
            ),
            60,
            "the two workers to share the 4 partitions",
        )
        events = make_events(2000, entities=60, seed=2)
        produce(settings, events)
        wait_for(lambda: decision_count(settings) >= 2000, 120, "2000 decisions from two workers")
    finally:
        for worker in workers:
            worker.terminate()
        codes = [worker.wait(30) for worker in workers]
    assert codes == [0, 0], [log.read_text()[-1500:] for log in logs]
    processed = [int(log.read_text().split("worker stopped after ")[1].split()[0]) for log in logs]
    assert all(n > 0 for n in processed) and sum(processed) >= 2000, processed  # both did part of it
    counts = "SELECT count(*), count(DISTINCT event_id) FROM decisions"
    ((rows, distinct),) = query(settings.database_schema, counts)
    assert rows == distinct == 2000  # no event lost, none decided twice
    assert_windows_exact(settings, events)
    published = read_topic(settings, settings.kafka_decisions_topic, expected=2000)
    assert {json.loads(m.value())["decision_id"] for m in published} == {
        r[0] for r in query(settings.database_schema, "SELECT id FROM decisions")
    }


def test_post_events_is_acknowledged_by_the_broker_then_decided_by_the_worker(
    kafka_settings: Settings, start_platform: Callable[[Settings], Platform]
) -> None:
    from fastapi.testclient import TestClient

    from decision_platform.api.app import create_app

    api = start_platform(kafka_settings)
    events = make_events(30, entities=3, seed=5)
    with TestClient(create_app(kafka_settings, api)) as client:
        response = client.post("/events", json={"events": events})
        assert response.status_code == 202
        assert response.json() == {"accepted": 30, "mode": "kafka", "decision_ids": None}
    stop, thread = run_in_thread(kafka_settings, start_platform)
    try:
        wait_for(lambda: decision_count(kafka_settings) >= 30, 60, "30 decisions")
    finally:
        stop.set()
        thread.join(30)
    assert_windows_exact(kafka_settings, events)


def test_entities_with_damaged_windows_fall_back_and_block_nothing(
    kafka_settings: Settings, start_platform: Callable[[Settings], Platform]
) -> None:
    """Something else wrote under two entities' window keys -- a string where the sorted set goes, a member
    that is not "id,time,amount,..." --: their events are decided with the fallback, every other event as
    usual; no batch is retried over them (the stream stopped at the first such event, retrying its batch
    for ever), every offset committed."""
    events = make_events(300, entities=6, seed=7)
    damaged = {"user-0", "user-1"}
    client = redis.Redis.from_url(kafka_settings.feature_store_url)
    client.set(f"{DEFAULT_KEY_PREFIX}{{user-0}}:z", "not a sorted set")
    client.zadd(f"{DEFAULT_KEY_PREFIX}{{user-1}}:z", {"garbage": T0 - 1000})  # in every event's windows
    client.close()
    produce(kafka_settings, events)
    with worker_running(kafka_settings, start_platform):
        wait_until_done(kafka_settings, len(events))
    rows = query(kafka_settings.database_schema, "SELECT entity_id, fallback FROM decisions")
    assert len(rows) == len(events)
    assert {f for e, f in rows if e in damaged} == {"entity_windows_unreadable"}
    assert {f for e, f in rows if e not in damaged} == {None}
    assert_published_are_stored(kafka_settings, len(events))
    # The other entities' snapshots are the point-in-time vectors, as if the damaged ones had sent nothing.
    spec = FeatureSpec.load(kafka_settings.features_path)
    expected = expected_features([e for e in events if e["entity_id"] not in damaged], spec)
    snapshots = query(kafka_settings.database_schema, "SELECT event_id, features FROM decisions")
    for event_id, features in snapshots:
        if event_id in expected:
            np.testing.assert_allclose([features[n] for n in spec.names], expected[event_id], rtol=1e-9)
    assert len(expected) == len(events) - 100
