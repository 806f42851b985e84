"""The stream worker: events topic -> feature windows -> decisions -> PostgreSQL + decisions topic.

At-least-once delivery, exactly-once effects: an offset is committed only after its batch's effects are
durable (windows updated, decisions stored, decisions and dead letters acknowledged by the broker),
and every effect is idempotent by event_id (the Lua script skips a known event; the decisions table
holds one decision per event). A batch redelivered after a crash therefore changes nothing.

The same ``StreamWorker.process`` runs behind Kafka (``decision-platform worker``) and, with no broker
configured, in-process behind ``POST /events``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.events.messages import RawMessage
from decision_platform.features import FeatureStore
from decision_platform.observability import metrics
from decision_platform.serving.engine import DecisionEngine, DecisionRequest

log = logging.getLogger(__name__)


class EventSource(Protocol):
    def poll(self, max_messages: int, timeout_s: float) -> list[RawMessage]: ...
    def commit(self) -> None: ...
    def close(self) -> None: ...


class EventSink(Protocol):
    """Where decisions and dead letters go; ``flush`` returns once they are acknowledged."""

    def decisions(self, responses: Sequence[dict[str, Any]]) -> None: ...
    def dead_letter(self, message: RawMessage, error: str) -> None: ...
    def flush(self) -> None: ...


@dataclass
class BatchSummary:
    consumed: int = 0
    dead_lettered: int = 0
    decided: int = 0
    duplicates: int = 0
    decision_ids: list[int] = field(default_factory=list)


def parse(message: RawMessage) -> Event:
    if message.value is None:
        raise ValueError("empty message (tombstone)")
    return Event.model_validate_json(message.value)


def describe_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'event'}: {e['msg']}" for e in exc.errors()[:5]
        )
    return str(exc)


class StreamWorker:
    """Processes batches of raw event messages; owns no I/O loop (see ``run``)."""

    def __init__(
        self, settings: Settings, engine: DecisionEngine, store: FeatureStore, sink: EventSink
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.sink = sink
        #: Cumulative seconds per stage (parse, features, decide, publish): where a worker's time goes.
        self.stage_seconds: dict[str, float] = dict.fromkeys(("parse", "features", "decide", "publish"), 0.0)

    def _lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.stage_seconds[stage] += now - since
        return now

    def process(self, messages: Sequence[RawMessage]) -> BatchSummary:
        """Apply one batch; raises (so nothing gets committed) if an effect could not be made durable."""
        started = time.perf_counter()
        metrics.WORKER_BATCH_SIZE.observe(len(messages))
        summary = BatchSummary(consumed=len(messages))
        events: list[Event] = []
        for message in messages:
            metrics.EVENTS_CONSUMED.labels(topic=message.topic).inc()
            try:
                events.append(parse(message))
            except (ValueError, ValidationError) as exc:  # poison: park it, never stop on it
                reason = "schema" if isinstance(exc, ValidationError) else "unreadable"
                self.sink.dead_letter(message, describe_error(exc))
                metrics.EVENTS_DEAD_LETTERED.labels(reason=reason).inc()
                summary.dead_lettered += 1
        self._lap("parse", started)
        self._apply(events, summary)
        metrics.WORKER_BATCH_SECONDS.observe(time.perf_counter() - started)
        return summary

    def process_events(self, events: Sequence[Event]) -> BatchSummary:
        """Apply already validated events (``POST /events`` with no broker: no serialise-then-parse)."""
        started = time.perf_counter()
        metrics.WORKER_BATCH_SIZE.observe(len(events))
        metrics.EVENTS_CONSUMED.labels(topic=self.settings.kafka_events_topic).inc(len(events))
        summary = BatchSummary(consumed=len(events))
        self._apply(list(events), summary)
        metrics.WORKER_BATCH_SECONDS.observe(time.perf_counter() - started)
        return summary

    def _apply(self, events: list[Event], summary: BatchSummary) -> None:
        """Windows, decisions, publication of one batch's valid events."""
        lap = time.perf_counter()
        if events:
            # Windows first, outside the engine's fallback: if Redis is down this raises, the batch is not
            # committed and is retried, instead of deciding without ever counting the events.
            features = self.store.update(events)
            lap = self._lap("features", lap)
            if self.settings.worker_decide:
                requests = [DecisionRequest(e.entity_id, e) for e in events]
                decisions = self.engine.decide_batch(requests, features=features)
                lap = self._lap("decide", lap)
                self.sink.decisions([d.response for d in decisions])
                summary.decided = len(decisions)
                summary.duplicates = sum(d.storage == "duplicate" for d in decisions)
                summary.decision_ids = [d.response["decision_id"] for d in decisions]
        self.sink.flush()
        self._lap("publish", lap)

    def run(self, source: EventSource, stop: threading.Event, poll_timeout_s: float = 0.5) -> int:
        """Consume until ``stop`` is set; returns the number of messages processed.

        On a failed batch the worker backs off and re-processes the same messages (effects are idempotent)
        until they succeed or it is stopped; their offsets stay uncommitted meanwhile.
        """
        processed = 0
        try:
            while not stop.is_set():
                batch = source.poll(self.settings.worker_batch_size, poll_timeout_s)
                if not batch:
                    continue
                backoff = 0.1
                while True:
                    try:
                        self.process(batch)
                        break
                    except Exception as exc:
                        log.warning(
                            "batch failed (%s: %s); retrying in %.1f s", type(exc).__name__, exc, backoff
                        )
                        if stop.wait(backoff):
                            return processed  # stopping: leave the offsets uncommitted; redelivered later
                        backoff = min(backoff * 2, 5.0)
                source.commit()
                processed += len(batch)
        finally:
            source.close()
        return processed


class InProcessSink:
    """The embedded default: keeps the latest decisions and dead letters in memory (bounded)."""

    def __init__(self, keep: int = 1000) -> None:
        self.keep = keep
        self.published: list[dict[str, Any]] = []
        self.dead_letters: list[tuple[RawMessage, str]] = []
        self._lock = threading.Lock()

    def decisions(self, responses: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            self.published = (self.published + list(responses))[-self.keep :]

    def dead_letter(self, message: RawMessage, error: str) -> None:
        log.warning("dead letter: %s", error)
        with self._lock:
            self.dead_letters = ([*self.dead_letters, (message, error)])[-self.keep :]

    def flush(self) -> None:
        return None
