"""The stream worker's pipelined run loop (serving/worker.py): batch k+2's windows are updated and batch
k+1 is decided while batch k's group commit runs, and batch k's offsets are committed only once its
decisions are durable and published."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, TopicPartition

from decision_platform.config import Settings
from decision_platform.data import generate
from decision_platform.events.kafka import DEAD_LETTER_MAX_BYTES, KafkaSink, KafkaSource, commit_offsets
from decision_platform.events.messages import RawMessage
from decision_platform.learning.replay import shift_to_now
from decision_platform.observability import metrics
from decision_platform.serving.platform import Platform
from decision_platform.serving.worker import InProcessSink, StreamWorker

BATCH = 40


class BatchSource:
    """Hands out fixed batches, then nothing; records every poll and commit, in order, and checks at each
    commit that the committed batch's decisions are durable and published."""

    def __init__(self, batches: list[list[RawMessage]], worker: StreamWorker, stop: threading.Event) -> None:
        self.batches, self.worker, self.stop = list(batches), worker, stop
        self.log: list[tuple[str, int]] = []  # ("poll" | "commit", first offset of the batch)
        self.expected = len(batches)
        self.committed = 0

    def poll(self, max_messages: int, timeout_s: float) -> list[RawMessage]:
        if not self.batches:
            return []
        batch = self.batches.pop(0)
        self.log.append(("poll", batch[0].offset))
        return batch

    def commit(self, messages: Sequence[RawMessage]) -> None:
        published = {d["entity_id"] for d in self.worker.sink.published}  # type: ignore[attr-defined]
        writer = self.worker.engine.writer
        for message in messages:
            event_id = message.key.decode()  # type: ignore[union-attr]
            decision = writer.find_decision_by_event(event_id)
            assert decision is not None, f"offset {message.offset} committed before its decision is durable"
            assert decision.entity_id in published
        self.log.append(("commit", messages[0].offset))
        self.committed += 1
        if self.committed == self.expected:
            self.stop.set()

    def close(self) -> None:
        return None


class FlakySink(InProcessSink):
    """Fails ``failures`` flushes from the ``first``-th on, like a broker that does not acknowledge."""

    def __init__(self, failures: int, first: int = 1) -> None:
        super().__init__(keep=10_000)
        self.failures, self.flushes, self.first = failures, 0, first

    def flush(self) -> None:
        self.flushes += 1
        if self.flushes >= self.first and self.failures > 0:
            self.failures -= 1
            raise OSError("broker did not acknowledge")


def messages(count: int) -> list[RawMessage]:
    events = shift_to_now(generate(n_entities=40, days=1, seed=5).events)[:count]
    assert len(events) == count
    return [
        RawMessage(e.model_dump_json().encode(), e.event_id.encode(), "events", 0, offset)
        for offset, e in enumerate(events)
    ]


def batches_of(items: list[RawMessage]) -> list[list[RawMessage]]:
    return [items[i : i + BATCH] for i in range(0, len(items), BATCH)]


def run_worker(platform: Platform, batches: list[list[RawMessage]], sink: InProcessSink) -> BatchSource:
    worker = StreamWorker(platform.settings, platform.engine, platform.store, sink)
    stop = threading.Event()
    source = BatchSource(batches, worker, stop)
    thread = threading.Thread(target=worker.run, args=(source, stop, 0.01), daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the worker did not finish"
    return source


@pytest.fixture
def platform_for(
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
    tmp_path: Any,
) -> Callable[[str], Platform]:
    return lambda name: start_platform(make_settings(spool_dir=tmp_path / name))


def test_the_next_batch_is_decided_before_the_last_is_committed_and_commits_stay_in_order(
    platform_for: Callable[[str], Platform],
) -> None:
    source = run_worker(platform_for("a"), batches_of(messages(4 * BATCH)), InProcessSink(keep=10_000))
    # Pipelined: batch 3 is polled (its windows started, batch 2 decided, batch 1 stored) before batch 0
    # is committed, once the broker acknowledged it; each commit after its poll, in order.
    assert source.log == [
        ("poll", 0),
        ("poll", BATCH),
        ("poll", 2 * BATCH),
        ("poll", 3 * BATCH),
        ("commit", 0),
        ("commit", BATCH),
        ("commit", 2 * BATCH),
        ("commit", 3 * BATCH),
    ]


@pytest.mark.parametrize("first", [1, 2, 3])
def test_a_failed_batch_is_retried_before_the_next_and_every_event_is_decided_once(
    platform_for: Callable[[str], Platform], first: int
) -> None:
    """The broker does not acknowledge a batch's publication while the batches after it are being stored,
    decided and windowed: it and each of them are committed in order, every event decided once."""
    items = messages(4 * BATCH)
    platform = platform_for(f"b{first}")
    sink = FlakySink(failures=1, first=first)
    source = run_worker(platform, batches_of(items), sink)
    assert sink.failures == 0
    assert [offset for kind, offset in source.log if kind == "commit"] == [0, BATCH, 2 * BATCH, 3 * BATCH]
    writer = platform.engine.writer
    decisions = [writer.find_decision_by_event(m.key.decode()) for m in items]  # type: ignore[union-attr]
    assert all(d is not None for d in decisions)
    assert platform.engine.writer.repository.count_decisions() == len(items)  # one decision per event


@pytest.mark.parametrize("failing", [1, 2])
def test_a_failed_windows_update_is_retried_in_order_and_every_event_is_decided_once(
    platform_for: Callable[[str], Platform], failing: int
) -> None:
    """The windows update of one batch fails (Redis answered an error) while the batch before it is being
    stored and the one after it was polled: each is committed in order, every event decided once, on the
    same windows as a worker that never failed."""
    items = messages(4 * BATCH)
    platform = platform_for(f"w{failing}")
    update, calls = platform.store.update, []

    def flaky_update(events: Any) -> Any:
        calls.append(events[0].event_id)
        if len(calls) == failing + 1:
            raise ConnectionError("feature store went away")
        return update(events)

    platform.store.update = flaky_update  # type: ignore[method-assign]
    source = run_worker(platform, batches_of(items), InProcessSink(keep=10_000))
    assert len(calls) == 5  # four batches and the retry
    assert [offset for kind, offset in source.log if kind == "commit"] == [0, BATCH, 2 * BATCH, 3 * BATCH]
    writer = platform.engine.writer
    assert writer.repository.count_decisions() == len(items)  # one decision per event
    clean = platform_for(f"clean{failing}")
    run_worker(clean, batches_of(items), InProcessSink(keep=10_000))

    def snapshots(platform: Platform) -> list[Any]:
        writer = platform.engine.writer
        return [writer.find_decision_by_event(m.key.decode()).features for m in items]  # type: ignore[union-attr]

    assert snapshots(platform) == snapshots(clean)


def test_a_stop_completes_the_batches_in_flight_in_order(platform_for: Callable[[str], Platform]) -> None:
    """Stopped right after a poll (SIGTERM): the batch being stored and the one whose windows are on their
    way are both completed and committed, in order, before ``run`` returns."""
    items = messages(3 * BATCH)
    platform = platform_for("stop")
    worker = StreamWorker(platform.settings, platform.engine, platform.store, InProcessSink(keep=10_000))
    stop = threading.Event()
    source = BatchSource(batches_of(items), worker, stop)
    poll = source.poll

    def stop_after_the_last(max_messages: int, timeout_s: float) -> list[RawMessage]:
        batch = poll(max_messages, timeout_s)
        if batch and batch[0].offset == 2 * BATCH:
            stop.set()  # batch 2 is stored meanwhile, batch 3's windows only just started
        return batch

    source.poll = stop_after_the_last  # type: ignore[method-assign]
    processed = worker.run(source, stop, 0.01)
    assert processed == len(items)
    assert [entry for entry in source.log if entry[0] == "commit"] == [
        ("commit", 0),
        ("commit", BATCH),
        ("commit", 2 * BATCH),
    ]
    assert platform.engine.writer.repository.count_decisions() == len(items)


def test_pipelined_decisions_equal_batch_by_batch_ones(platform_for: Callable[[str], Platform]) -> None:
    """Same inputs, same decisions: the pipelined loop against ``process`` one batch after the other."""
    items = messages(3 * BATCH)
    pipelined = platform_for("c")
    run_worker(pipelined, batches_of(items), InProcessSink(keep=10_000))
    sequential = platform_for("d")
    worker = StreamWorker(sequential.settings, sequential.engine, sequential.store, InProcessSink())
    for batch in batches_of(items):
        worker.process(batch)

    def decided(platform: Platform) -> list[tuple[Any, ...]]:
        writer = platform.engine.writer
        records = [writer.find_decision_by_event(m.key.decode()) for m in items]  # type: ignore[union-attr]
        return [(r.action, r.propensity, r.risk, r.anomaly, r.features) for r in records]  # type: ignore[union-attr]

    assert decided(pipelined) == decided(sequential)


def test_a_redelivered_event_keeps_its_first_decision_while_the_first_copy_is_still_being_stored(
    platform_for: Callable[[str], Platform],
) -> None:
    """Batch 2 redelivers events of batch 1 while batch 1's commit is slow: the writer's second thread
    would store batch 2 first, and the redelivered copy -- decided on the windows as they are later --
    would become the event's decision. The worker waits for batch 1 in that case only."""
    items = messages(2 * BATCH)
    redelivered = [
        RawMessage(m.value, m.key, m.topic, m.partition, 2 * BATCH + i) for i, m in enumerate(items[10:20])
    ]
    platform = platform_for("e")
    repository = platform.engine.writer.repository
    insert, calls = repository.insert_decisions, []

    def slow_first_insert(rows: Any) -> Any:
        calls.append(len(rows))
        if len(calls) == 1:  # batch 1 commits late (within the 1 s write timeout)
            time.sleep(0.5)
        return insert(rows)

    repository.insert_decisions = slow_first_insert  # type: ignore[method-assign]
    run_worker(platform, [items[:BATCH], items[BATCH:] + redelivered], InProcessSink(keep=10_000))
    writer = platform.engine.writer

    def decision_ids(batch: list[RawMessage]) -> list[int]:
        return [writer.find_decision_by_event(m.key.decode()).id for m in batch]  # type: ignore[union-attr]

    # Decision ids grow with time: the ones decided in batch 1 are all below batch 2's.
    assert max(decision_ids(items[10:20])) < min(decision_ids(items[BATCH:]))
    assert repository.count_decisions() == len(items)  # one decision per event


def test_commit_offsets_are_each_partitions_next_offset_and_skip_revoked_partitions() -> None:
    batch = [RawMessage(b"", None, "t", p, o) for p, o in [(0, 5), (1, 9), (0, 7), (0, 6), (2, 1)]]
    offsets = commit_offsets(batch, assigned={("t", 0), ("t", 1)})
    assert sorted((tp.partition, tp.offset) for tp in offsets) == [(0, 8), (1, 10)]


class RecordingConsumer:
    """Stands in for confluent_kafka's Consumer: records what is committed, and whether it waited."""

    def __init__(self) -> None:
        self.commits: list[list[tuple[int, int]]] = []
        self.waited: list[bool] = []

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> None:
        assert offsets is not None, "a bare commit() commits the consumer's position, past batches in flight"
        self.commits.append(sorted((tp.partition, tp.offset) for tp in offsets))
        self.waited.append(not asynchronous)

    def close(self) -> None:
        return None


def test_a_revoke_commits_nothing_and_a_later_commit_skips_the_revoked_partitions() -> None:
    source = KafkaSource(Settings(kafka_bootstrap_servers="127.0.0.1:9", kafka_events_topic="t"))
    source._consumer.close()
    consumer = RecordingConsumer()
    source._consumer = consumer  # type: ignore[assignment]
    source._on_assign(consumer, [TopicPartition("t", 0), TopicPartition("t", 1)])
    in_flight = [RawMessage(b"", None, "t", 0, 3), RawMessage(b"", None, "t", 1, 4)]
    source._on_revoke(consumer, [TopicPartition("t", 1)])  # a rebalance while the batch is in flight
    assert consumer.commits == []
    source.commit(in_flight)
    assert consumer.commits == [[(0, 4)]]  # partition 1's next owner gets offset 4 again


def recording_source() -> tuple[KafkaSource, RecordingConsumer]:
    source = KafkaSource(Settings(kafka_bootstrap_servers="127.0.0.1:9", kafka_events_topic="t"))
    source._consumer.close()
    consumer = RecordingConsumer()
    source._consumer = consumer  # type: ignore[assignment]
    source._on_assign(consumer, [TopicPartition("t", 0), TopicPartition("t", 1)])
    return source, consumer


def test_batches_are_committed_without_waiting_and_the_last_offsets_again_at_close_and_waited_for() -> None:
    """The worker commits a batch only once its effects are durable and acknowledged: the commit need not
    wait for the coordinator. A commit still on its way when the worker stops must not be lost (its
    messages would come again), so close commits each partition's last offset and waits for it."""
    source, consumer = recording_source()
    source.commit([RawMessage(b"", None, "t", 0, 3), RawMessage(b"", None, "t", 1, 4)])
    source.commit([RawMessage(b"", None, "t", 0, 9)])
    source.close()
    assert consumer.commits == [[(0, 4), (1, 5)], [(0, 10)], [(0, 10), (1, 5)]]
    assert consumer.waited == [False, False, True]


def test_a_partition_revoked_after_its_commit_is_not_committed_again_at_close() -> None:
    """Its next owner commits it from then on: our older offset, committed at close, would move it back."""
    source, consumer = recording_source()
    source.commit([RawMessage(b"", None, "t", 0, 3), RawMessage(b"", None, "t", 1, 4)])
    source._on_revoke(consumer, [TopicPartition("t", 1)])
    source.close()
    assert consumer.commits[-1] == [(0, 4)]


def test_a_commit_the_broker_did_not_take_is_counted() -> None:
    source, _ = recording_source()
    failures = metrics.WORKER_COMMIT_FAILURES._value.get()
    source._on_commit(None, [TopicPartition("t", 0, 4)])  # taken
    assert metrics.WORKER_COMMIT_FAILURES._value.get() == failures
    source._on_commit(KafkaError(KafkaError.REQUEST_TIMED_OUT), [TopicPartition("t", 0, 4)])
    assert metrics.WORKER_COMMIT_FAILURES._value.get() == failures + 1


def test_a_poison_message_too_large_to_produce_again_is_dead_lettered_cut() -> None:
    """A message the broker took (its limit, ~1 MiB, is above the producer's 1,000,000 bytes) made the dead
    letter's produce() raise MSG_SIZE_TOO_LARGE: the batch was retried forever, its partition stood still."""
    sink = KafkaSink(Settings(kafka_bootstrap_servers="127.0.0.1:9", kafka_dlq_topic="dlq"))
    huge = RawMessage(b"{" + b"x" * 1_040_000, key=b"k" * 5000, topic="events", partition=3, offset=7)
    sink.dead_letter(huge, "event: Invalid JSON")  # raised KafkaException before: nothing was produced

    produced: list[dict[str, Any]] = []
    sink._producer = SimpleNamespace(
        produce=lambda topic, **kwargs: produced.append({"topic": topic, **kwargs})
    )
    sink.dead_letter(huge, "event: Invalid JSON")
    sink.dead_letter(RawMessage(b"{", key=None), "small")
    cut, small = produced
    assert cut["topic"] == "dlq" and len(cut["key"]) + len(cut["value"]) == DEAD_LETTER_MAX_BYTES
    assert cut["value"] == huge.value[: len(cut["value"])] and cut["key"] == b"k" * 1024
    assert cut["headers"]["truncated-from"] == b"5000/1040001" and cut["headers"]["source"] == b"events/3/7"
    assert small["value"] == b"{" and small["key"] is None and "truncated-from" not in small["headers"]


def test_an_event_dated_far_ahead_is_dead_lettered_and_leaves_its_entitys_windows_alone(
    platform_for: Callable[[str], Platform],
) -> None:
    """One event dated 2099 became its entity's newest stored time: every later real event was "too late"
    for the windows, its counts 0 from then on (a burst invisible to the velocity rules)."""
    platform = platform_for("ahead")
    sink = InProcessSink()
    worker = StreamWorker(platform.settings, platform.engine, platform.store, sink)
    now = time.time()
    bodies = [{"event_id": "a0", "entity_id": "ahead", "timestamp": "2099-01-01T00:00:00Z"}] + [
        {"event_id": f"a{k}", "entity_id": "ahead", "timestamp": now - 10 + k} for k in range(1, 4)
    ]
    raw = [RawMessage(orjson.dumps(b), b["event_id"].encode(), "events", 0, k) for k, b in enumerate(bodies)]
    summary = worker.process(raw)
    assert summary.dead_lettered == 1 and "ahead of this server's clock" in sink.dead_letters[0][1]
    found = [platform.writer.find_decision_by_event(f"a{k}") for k in (1, 2, 3)]
    counts = [d.features["count_1h"] for d in found]  # type: ignore[union-attr]
    assert counts == [1.0, 2.0, 3.0]


def test_an_event_whose_id_another_entity_holds_is_dead_lettered_as_it_came(
    platform_for: Callable[[str], Platform],
) -> None:
    """The worker published the first entity's decision for it (and counted it in the second entity's
    windows): a decision for a different event, on the decisions topic."""
    platform = platform_for("taken")
    sink = InProcessSink()
    worker = StreamWorker(platform.settings, platform.engine, platform.store, sink)
    now = time.time()
    bodies = [
        {"event_id": "t-1", "entity_id": "owner", "amount": 5.0, "timestamp": now - 3},
        {"event_id": "t-1", "entity_id": "other", "amount": 900.0, "timestamp": now - 2},
        {"event_id": "t-2", "entity_id": "other", "amount": 100.0, "timestamp": now - 1},
    ]
    raw = [RawMessage(orjson.dumps(b), b["entity_id"].encode(), "events", 0, k) for k, b in enumerate(bodies)]
    first = worker.process(raw[:1])
    summary = worker.process(raw[1:])
    assert summary.dead_lettered == 1 and summary.decided == 1
    assert summary.decision_ids[0] is None and summary.decision_ids[1] is not None
    parked, error = sink.dead_letters[-1]
    assert parked is raw[1] and "already the id of another entity's event" in error
    assert [d["entity_id"] for d in sink.published] == ["owner", "other"]
    assert sink.published[0]["decision_id"] == first.decision_ids[0]
    # t-2, decided in the same batch, saw t-1 in the windows (the log refuses t-1 only once the batch is
    # stored); t-1 is withdrawn then, so a later batch does not count it.
    worker.process([RawMessage(orjson.dumps({"event_id": "t-3", "entity_id": "other", "amount": 1.0}))])
    later = platform.writer.find_decision_by_event("t-3")
    assert later is not None and later.features["count_1h"] == 2 and later.features["sum_1h"] == 101
