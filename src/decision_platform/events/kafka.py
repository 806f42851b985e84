"""Kafka plumbing (confluent-kafka): configurations, topic creation, the acknowledged producer.

Any broker speaking the Kafka protocol works (Apache Kafka, Redpanda, tansu in tests). Events are keyed
by entity id, so one entity's events stay in one partition, in order, handled by one worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.events.messages import RawMessage
from decision_platform.observability import metrics

log = logging.getLogger(__name__)

#: Commit errors that mean "this consumer is not (or no longer) in the group's current generation".
_NOT_A_MEMBER = frozenset(
    {KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS}
)


#: Most bytes (key + value) of a dead letter: below the producer's message.max.bytes (1,000,000) with room
#: for the headers and the record's overhead. A larger poison message is kept cut to this, the key to
#: MAX_DEAD_LETTER_KEY_BYTES (header ``truncated-from``: "<key bytes>/<value bytes>" of the original).
DEAD_LETTER_MAX_BYTES = 900_000
MAX_DEAD_LETTER_KEY_BYTES = 1024


def producer_config(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        # Idempotent producer: retries never duplicate or reorder a message within a partition.
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        # Successes need no callback (flush() counts what is unacknowledged); failures still report.
        "delivery.report.only.error": True,
        "client.id": "decision-platform",
    }


def consumer_config(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": settings.kafka_group_id,
        # Offsets are committed by hand, only once a batch's effects are durable (at-least-once).
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": settings.kafka_heartbeat_interval_ms,
        "fetch.wait.max.ms": 10,
        "client.id": "decision-worker",
    }


def ensure_topics(settings: Settings, timeout_s: float = 10.0) -> None:
    """Create the platform's topics if missing, with known partition counts."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = {
        settings.kafka_events_topic: settings.kafka_events_partitions,
        settings.kafka_decisions_topic: settings.kafka_events_partitions,
        settings.kafka_dlq_topic: 1,
    }
    new = [NewTopic(name, partitions, 1) for name, partitions in wanted.items() if name not in existing]
    if not new:
        return
    for topic, future in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            log.info("created topic %s", topic)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):  # a concurrent creator won the race: fine
                raise


class BrokerUnavailableError(RuntimeError):
    """The broker did not acknowledge the events in time; nothing may be reported as accepted."""


class EventProducer:
    """Produces events and returns only once the broker has acknowledged every one of them."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.kafka_events_topic
        self._producer = Producer(producer_config(settings))
        #: A send timed out and the broker has not taken everything since (see :meth:`send`).
        self._stalled = False

    def send(self, events: Sequence[Event], timeout_s: float = 10.0) -> None:
        """Produce the events and wait until the broker has acknowledged every one of them.

        Raises BrokerUnavailableError (503) when it has not within ``timeout_s`` -- and then at once, without
        waiting, until the broker has taken what the producer still holds: each ``POST /events`` waits on a
        thread of the API's request pool, and with the broker down every request held one for the whole
        timeout, so a few a second filled the pool and /outcome, GET /decisions and /ready queued behind.
        """
        if self._stalled:
            self._producer.poll(0)  # serve the delivery reports that came in meanwhile
            held = len(self._producer)
            if held:
                raise BrokerUnavailableError(f"the broker is not taking events ({held} still unacknowledged)")
            self._stalled = False
        errors: list[str] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                errors.append(str(error))

        try:
            for event in events:
                self._producer.produce(
                    self.topic,
                    key=event.entity_id.encode(),
                    value=event.model_dump_json().encode(),
                    on_delivery=delivered,
                )
        except (BufferError, KafkaException) as exc:  # the local queue is full: the broker is behind
            self._stalled = True
            raise BrokerUnavailableError(f"the producer cannot queue more events ({exc})") from None
        remaining = self._producer.flush(timeout_s)
        if remaining:
            self._stalled = True
        if remaining or errors:
            raise BrokerUnavailableError(
                f"{remaining} events unacknowledged, {len(errors)} failed"
                + (f": {errors[0]}" if errors else "")
            )

    def close(self) -> None:
        self._producer.flush(5)


class KafkaSource:
    """Consumer-group source of the stream worker: manual commits, commit on partition revoke."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.kafka_events_topic
        self._consumer = Consumer({**consumer_config(settings), "on_commit": self._on_commit})
        self._consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._last_lag_check = 0.0
        #: (topic, partition) owned now: a batch completed after its partitions were revoked commits nothing
        #: for them (the group's new owner has them from the last commit on).
        self._assigned: set[tuple[str, int]] = set()
        #: The offsets last committed (asynchronously) per (topic, partition): committed again at close.
        self._committing: dict[tuple[str, int], int] = {}

    def _on_assign(self, _consumer: Any, partitions: list[Any]) -> None:
        # Operators (and the two-worker test and bench) see how the group shared the partitions.
        log.info("assigned partitions %s of %s", sorted(p.partition for p in partitions), self.topic)
        self._assigned |= {(p.topic, p.partition) for p in partitions}

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        # Nothing is committed here: every completed batch was committed with its own offsets already, and
        # the consumer's position may be past batches still in flight (the worker pipelines four deep),
        # whose messages the next owner must get again. Its later commit skips these partitions.
        self._assigned -= {(p.topic, p.partition) for p in partitions}
        for p in partitions:  # its next owner commits it now: a stale offset of ours must not go at close
            self._committing.pop((p.topic, p.partition), None)

    def poll(self, max_messages: int, timeout_s: float) -> list[Any]:
        messages = self._consumer.consume(max_messages, timeout_s)
        out = []
        for message in messages:
            if message.error():
                log.warning("consumer error: %s", message.error())
                continue
            out.append(
                RawMessage(
                    message.value(), message.key(), message.topic(), message.partition(), message.offset()
                )
            )
        self._maybe_report_lag()
        return out

    def commit(self, messages: Sequence[RawMessage]) -> None:
        """Commit exactly these messages as processed (the offset after each partition's last one), not the
        consumer's position, which may already be past a later batch still in flight.

        Asynchronous: the worker calls this only once the batch's effects are durable and acknowledged, so
        nothing needs to wait for the group coordinator's answer (a synchronous commit was a round trip on
        the worker's critical path, and giving up the GIL for it cost up to a switch interval more). A
        commit that fails is superseded by the next one on its partition, and :meth:`close` commits the
        last offsets synchronously; a commit that never lands only redelivers messages whose effects are
        idempotent. A commit the group refuses because this consumer is no longer a member of it (its
        session expired while the broker or this process stalled; the group has moved on) commits nothing,
        as for revoked partitions: the next poll rejoins, and whoever owns the partitions then gets these
        messages again from the last commit."""
        offsets = commit_offsets(messages, self._assigned)
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            if exc.args[0].code() not in _NOT_A_MEMBER:
                raise
            log.warning("commit refused (%s): not a group member now; the batch will be redelivered", exc)
            return
        self._committing.update({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def _on_commit(self, error: Any, partitions: list[Any]) -> None:
        failed = [p for p in partitions or [] if p.error is not None]
        if error is None and not failed:
            return
        reason = error if error is not None else failed[0].error
        metrics.WORKER_COMMIT_FAILURES.inc()
        log.warning(
            "offset commit failed (%s); a later commit covers it, else the messages are redelivered", reason
        )

    def _maybe_report_lag(self, every_s: float = 5.0) -> None:
        now = time.monotonic()
        if now - self._last_lag_check < every_s:
            return
        self._last_lag_check = now
        try:
            assignment = self._consumer.assignment()
            for tp, position in zip(assignment, self._consumer.position(assignment), strict=True):
                low, high = self._consumer.get_watermark_offsets(tp, timeout=1.0)
                consumed = position.offset if position.offset >= 0 else low
                metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(high - consumed, 0)
                )
        except KafkaException as exc:
            log.debug("lag check failed: %s", exc)

    def close(self) -> None:
        """Commit the last offsets synchronously (the asynchronous ones may still be on their way), then
        leave the group at once, so the partitions move to the other workers without a session timeout."""
        final = [
            TopicPartition(topic, partition, offset)
            for (topic, partition), offset in self._committing.items()
            if (topic, partition) in self._assigned
        ]
        if final:
            try:
                self._consumer.commit(offsets=final, asynchronous=False)
            except KafkaException as exc:
                metrics.WORKER_COMMIT_FAILURES.inc()
                log.warning("final offset commit failed (%s): the last batches will be redelivered", exc)
        self._consumer.close()


class KafkaSink:
    """Publishes decisions (keyed by entity) and dead letters (original bytes + the error in a header)."""

    def __init__(self, settings: Settings) -> None:
        self._producer = Producer(producer_config(settings))
        self.decisions_topic = settings.kafka_decisions_topic
        self.dlq_topic = settings.kafka_dlq_topic
        self.timeout_s = settings.worker_publish_timeout_s
        self._errors: list[str] = []

    def _delivered(self, error: Any, _message: Any) -> None:
        if error is not None:
            self._errors.append(str(error))

    def decisions(self, responses: Sequence[dict[str, Any]]) -> None:
        """Queue a batch of decisions; :meth:`flush` waits for them. Delivery reports are served once a
        batch (and only failures make one: ``delivery.report.only.error``), not once a message."""
        for response in responses:
            key, value = str(response["entity_id"]).encode(), orjson.dumps(response)
            try:
                self._producer.produce(
                    self.decisions_topic, key=key, value=value, on_delivery=self._delivered
                )
            except BufferError:  # the local queue is full: let it drain, then queue this one
                self._producer.poll(1.0)
                self._producer.produce(
                    self.decisions_topic, key=key, value=value, on_delivery=self._delivered
                )
        self._producer.poll(0)

    def dead_letter(self, message: Any, error: str) -> None:
        headers = {
            "error": error.encode()[:1000],
            "source": f"{message.topic}/{message.partition}/{message.offset}".encode(),
        }
        key, value = message.key, message.value
        if len(key or b"") + len(value or b"") > DEAD_LETTER_MAX_BYTES:
            # A message the broker took (its limit, ~1 MiB, is above the producer's 1,000,000 bytes) could
            # not be produced again: produce() raised, the batch was retried forever and its partition
            # stood still. The dead letter keeps the head of it, and says how long it was.
            headers["truncated-from"] = f"{len(key or b'')}/{len(value or b'')}".encode()
            key = key[:MAX_DEAD_LETTER_KEY_BYTES] if key is not None else None
            value = value[: DEAD_LETTER_MAX_BYTES - len(key or b"")] if value is not None else None
        self._producer.produce(
            self.dlq_topic, key=key, value=value, headers=headers, on_delivery=self._delivered
        )

    def flush(self, timeout_s: float | None = None) -> None:
        remaining = self._producer.flush(self.timeout_s if timeout_s is None else timeout_s)
        errors, self._errors = self._errors, []
        if remaining or errors:
            raise BrokerUnavailableError(f"{remaining} messages unacknowledged, {len(errors)} failed")


def commit_offsets(messages: Sequence[RawMessage], assigned: set[tuple[str, int]]) -> list[TopicPartition]:
    """The offsets that mark ``messages`` processed: one per partition still assigned, after its last."""
    last: dict[tuple[str, int], int] = {}
    for message in messages:
        key = (message.topic, message.partition)
        if key in assigned and message.offset >= last.get(key, -1):
            last[key] = message.offset
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]
