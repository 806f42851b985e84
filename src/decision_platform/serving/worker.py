"""The stream worker: events topic -> feature windows -> decisions -> PostgreSQL + decisions topic.

At-least-once delivery, exactly-once effects: an offset is committed only after its batch's effects are
durable (windows updated, decisions stored, decisions and dead letters acknowledged by the broker),
and every effect is idempotent by event_id (the Lua script skips a known event; the decisions table
holds one decision per event). A batch redelivered after a crash therefore changes nothing.

The same ``StreamWorker.process`` runs behind Kafka (``decision-platform worker``) and, with no broker
configured, in-process behind ``POST /events``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from decision_platform.config import Settings
from decision_platform.core.events import Event, ahead_of_clock
from decision_platform.core.records import DUPLICATE, REFUSED
from decision_platform.events.messages import RawMessage
from decision_platform.features import FeatureResult, FeatureStore
from decision_platform.observability import metrics
from decision_platform.serving.engine import Decision, DecisionEngine, DecisionRequest, PendingDecision

log = logging.getLogger(__name__)


class EventSource(Protocol):
    def poll(self, max_messages: int, timeout_s: float) -> list[RawMessage]: ...
    def commit(self, messages: Sequence[RawMessage]) -> None: ...
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
    #: One per decided event, in order; None where the event was refused (its id is another entity's).
    decision_ids: list[int | None] = field(default_factory=list)


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
        #: Cumulative seconds per stage: where a worker's time goes.
        self.stage_seconds: dict[str, float] = dict.fromkeys(
            ("parse", "features", "decide", "store", "publish", "acknowledge"), 0.0
        )
        #: The event ids and decisions of the batch last handed to the group commit (see _after_first_copies).
        self._handed: tuple[set[str], list[PendingDecision]] = (set(), [])

    def _lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.stage_seconds[stage] += now - since
        return now

    def process(self, messages: Sequence[RawMessage]) -> BatchSummary:
        """Apply one batch; raises (so nothing gets committed) if an effect could not be made durable."""
        return self.complete(self.begin(messages))

    def begin(self, messages: Sequence[RawMessage]) -> InFlight:
        """Parse, update windows and decide one batch, handing its decisions to the group commit without
        waiting for them to be durable (:meth:`complete` waits). Raises if the windows could not be
        updated: nothing of the batch is then decided."""
        batch = self._parse(messages)
        return self._decide(batch, self._windows_of(batch))

    def _parse(self, messages: Sequence[RawMessage], background: Executor | None = None) -> Parsed:
        """Parse a batch (poison and far-ahead events go to the dead letters) and, with ``background``,
        start its windows update there (:meth:`_windows_of` waits for it, or updates them inline)."""
        started = time.perf_counter()
        metrics.WORKER_BATCH_SIZE.observe(len(messages))
        summary = BatchSummary(consumed=len(messages))
        events: list[Event] = []
        sources: list[RawMessage] = []  # each event's message, for a dead letter decided later
        consumed: dict[str, int] = {}
        now, max_ahead_s = time.time(), self.settings.max_event_ahead_s
        for message in messages:
            consumed[message.topic] = consumed.get(message.topic, 0) + 1
            try:
                event = parse(message)
            except (ValueError, ValidationError) as exc:  # poison: park it, never stop on it
                reason = "schema" if isinstance(exc, ValidationError) else "unreadable"
                self._dead_letter(message, describe_error(exc), reason, summary)
                continue
            ahead = ahead_of_clock(event.timestamp, now, max_ahead_s)
            if ahead is not None:  # it would take its entity's later events out of the windows
                self._dead_letter(message, ahead, "ahead", summary)
                continue
            events.append(event)
            sources.append(message)
        for topic, count in consumed.items():  # one labelled increment a topic, not one a message
            metrics.EVENTS_CONSUMED.labels(topic=topic).inc(count)
        self._lap("parse", started)
        windows = background.submit(self._update_windows, events) if background and events else None
        return Parsed(list(messages), summary, events, started, sources, windows)

    def _dead_letter(self, message: RawMessage, error: str, reason: str, summary: BatchSummary) -> None:
        self.sink.dead_letter(message, error)
        metrics.EVENTS_DEAD_LETTERED.labels(reason=reason).inc()
        summary.dead_lettered += 1

    def process_events(self, events: Sequence[Event]) -> BatchSummary:
        """Apply already validated events (``POST /events`` with no broker: no serialise-then-parse)."""
        started = time.perf_counter()
        metrics.WORKER_BATCH_SIZE.observe(len(events))
        metrics.EVENTS_CONSUMED.labels(topic=self.settings.kafka_events_topic).inc(len(events))
        summary = BatchSummary(consumed=len(events))
        batch = Parsed([], summary, list(events), started)
        return self.complete(self._decide(batch, self._windows_of(batch)))

    def _update_windows(self, events: list[Event]) -> list[FeatureResult]:
        # Windows come first, outside the engine's fallback: if Redis is down this raises, the batch is not
        # committed and is retried, instead of deciding without ever counting the events.
        try:
            return self.store.update(events)
        except Exception:
            metrics.FEATURE_STORE_ERRORS.labels(operation="update").inc()
            raise

    def _windows_of(self, batch: Parsed) -> list[FeatureResult]:
        """The batch's window features: the background update's (waiting for it) or updated now. Raises
        if the windows could not be updated: nothing of the batch may then be decided."""
        lap = time.perf_counter()
        if not batch.events:
            return []
        features = batch.windows.result() if batch.windows is not None else self._update_windows(batch.events)
        self._lap("features", lap)
        return features

    def _decide(self, batch: Parsed, features: list[FeatureResult]) -> InFlight:
        """Decide the batch on its window features, handing the decisions to the group commit."""
        lap = time.perf_counter()
        pending: list[PendingDecision] = []
        if batch.events and self.settings.worker_decide:
            ids = {e.event_id for e in batch.events}
            self._after_first_copies(ids)
            requests = [DecisionRequest(e.entity_id, e) for e in batch.events]
            pending = self.engine.submit_batch(requests, features=features)
            self._handed = (ids, pending)
            self._lap("decide", lap)
        return InFlight(batch.summary, pending, batch.started, batch.sources)

    def _after_first_copies(self, event_ids: set[str], timeout_s: float = 60.0) -> None:
        """Wait until the batch handed over before this one is durable if this one redelivers any of its
        events. The writer's threads commit batches concurrently, so without the wait the redelivered copy
        (decided on the windows as they are later) could be stored first and become the event's decision.
        Redeliveries are rare: the pipeline is kept otherwise."""
        ids, pending = self._handed
        if ids.isdisjoint(event_ids):
            return
        for storage in {id(p.storage): p.storage for p in pending}.values():
            with contextlib.suppress(Exception):  # its failure is that batch's to settle, not this one's
                storage.result(timeout=timeout_s)

    def complete(self, batch: InFlight) -> BatchSummary:
        """Wait until the batch's decisions are durable, then publish them (and its dead letters) and wait
        for the broker's acknowledgement; raises if any of that failed (nothing may be committed then)."""
        summary = self.publish(batch)
        self.acknowledge(batch.started)
        return summary

    def publish(self, batch: InFlight) -> BatchSummary:
        """Wait until the batch's decisions are durable, then hand them to the sink, without waiting for
        the broker's acknowledgement (:meth:`acknowledge` waits). Raises if a decision was not made
        durable."""
        lap = time.perf_counter()
        summary = batch.summary
        if batch.pending:
            decisions = self.engine.finish_batch(batch.pending)
            lap = self._lap("store", lap)
            answered = [d for d in decisions if d.storage not in REFUSED]
            if len(answered) < len(decisions):
                self._dead_letter_taken(batch, decisions)
            self.sink.decisions([d.response for d in answered])
            summary.decided = len(answered)
            summary.duplicates = sum(d.storage == DUPLICATE for d in answered)
            summary.decision_ids = [
                None if d.storage in REFUSED else d.response["decision_id"] for d in decisions
            ]
        self._lap("publish", lap)
        return summary

    def acknowledge(self, started: float) -> None:
        """Wait until the broker has acknowledged everything published so far (decisions and dead
        letters); raises if it did not, so that nothing gets committed."""
        lap = time.perf_counter()
        self.sink.flush()
        self._lap("acknowledge", lap)
        metrics.WORKER_BATCH_SECONDS.observe(time.perf_counter() - started)

    def _dead_letter_taken(self, batch: InFlight, decisions: list[Decision]) -> None:
        """Park the events the engine refused (core.records.REFUSED), each with its refusal's words: another
        entity's event holds their id (publishing that entity's decision for them would answer a different
        event; the engine has taken them out of the windows), one of the entity's with other content, or
        their first decision is stored damaged (a redelivery: publishing that row would publish what the
        platform never decided, deciding again would decide the event twice)."""
        for i, decision in enumerate(decisions):
            if decision.storage not in REFUSED:
                continue
            event = batch.pending[i].event
            assert event is not None, "only an event's decision can be refused"
            message = batch.sources[i] if batch.sources is not None else None
            if message is None:  # POST /events in-process: the event as it would have come as a message
                message = RawMessage(
                    value=event.model_dump_json().encode(),
                    key=event.entity_id.encode(),
                    topic=self.settings.kafka_events_topic,
                )
            self._dead_letter(message, decision.refusal, decision.storage, batch.summary)

    def run(self, source: EventSource, stop: threading.Event, poll_timeout_s: float = 0.5) -> int:
        """Consume until ``stop`` is set; returns the number of messages processed.

        Pipelined, four batches deep: while batch k+2's windows are updated (Redis' time, on a background
        thread), batch k's decisions are stored (PostgreSQL's time) and batch k-1's publication is on its
        way to the broker, this thread decides batch k+1; then it waits for the broker's acknowledgement of
        k-1 and commits *k-1's* offsets, explicitly; then it publishes k once it is durable. A batch's
        windows are started only once the batch before it has its own (an entity's events reach Redis in
        order), and the writer stores batches in the order they were handed over, so a redelivered event
        finds the earlier copy's decision as its first.

        On a failed stage the worker settles every uncommitted batch from the failed one on, in order, one
        at a time: it waits for what they have in flight, backs off and re-processes each (effects are
        idempotent) until it succeeds or the worker is stopped; their offsets stay uncommitted meanwhile.
        On stop it completes what is in flight, in order.
        """
        processed = 0
        published: _Published | None = None  # durable, its publication not yet acknowledged
        storing: tuple[list[RawMessage], InFlight] | None = None  # decided, on its way to durability
        windowing: Parsed | None = None  # polled, its windows being updated in the background
        background = ThreadPoolExecutor(1, thread_name_prefix="dp-windows")
        try:
            while not stop.is_set():
                # With a batch in flight, take only what has already arrived: waiting for more would hold
                # back the in-flight batches' answers (and offsets) for up to a poll timeout.
                idle = published is None and storing is None and windowing is None
                polled = source.poll(self.settings.worker_batch_size, poll_timeout_s if idle else 0.0)
                retry: list[Parsed | list[RawMessage]] = []  # uncommitted, to settle in order
                current, windowing, decided = windowing, None, None
                features: list[FeatureResult] = []
                if current is not None:
                    try:
                        features = self._windows_of(current)
                    except Exception as exc:
                        _failed(exc, "retrying it on its own")
                        retry.append(current.messages)
                if polled and retry:
                    retry.append(polled)
                elif polled:  # its windows go to Redis while this thread decides the current batch
                    windowing = self._parse(polled, background)
                if current is not None and not retry:
                    try:
                        decided = (current.messages, self._decide(current, features))
                    except Exception as exc:
                        _failed(exc, "retrying it on its own")
                        retry.append(current.messages)
                        if windowing is not None:
                            retry.append(windowing)
                            windowing = None
                # Oldest first: a batch's offsets are committed only after every batch before it.
                if published is not None:
                    if self._try_acknowledge(published, source):
                        processed += len(published.messages)
                    else:  # it and everything after it go again, in order
                        retry = [published.messages, *_in_order(storing, decided), *retry]
                        if windowing is not None:
                            retry.append(windowing)
                        storing = decided = windowing = None
                    published = None
                if storing is not None:
                    messages, previous = storing
                    if self._try_publish(previous):
                        published = _Published(messages, previous.started)
                    else:  # everything after it goes again too, after it
                        retry = [messages, *_in_order(None, decided), *retry]
                        decided = None
                        if windowing is not None:
                            retry.append(windowing)
                            windowing = None
                storing = decided
                if retry and published is not None:  # settled one at a time, after the batch before them
                    if self._try_acknowledge(published, source):
                        processed += len(published.messages)
                    else:
                        retry.insert(0, published.messages)
                    published = None
                for batch in retry:
                    if isinstance(batch, Parsed):
                        batch.abandon()
                        batch = batch.messages
                    if not self._settle(batch, source, stop):
                        return processed
                    processed += len(batch)
            processed += self._drain(published, storing, windowing, source)
        finally:
            background.shutdown(wait=True)
            source.close()
        return processed

    def _drain(
        self,
        published: _Published | None,
        storing: tuple[list[RawMessage], InFlight] | None,
        windowing: Parsed | None,
        source: EventSource,
    ) -> int:
        """On stop: complete the batches in flight, in order; the first that fails and all after it stay
        uncommitted (redelivered later: committing a later offset would commit the failed one too)."""
        processed = 0
        in_order: list[_Published | tuple[list[RawMessage], InFlight] | Parsed] = [
            batch for batch in (published, storing, windowing) if batch is not None
        ]
        for i, batch in enumerate(in_order):
            if isinstance(batch, Parsed):
                try:
                    decided = self._decide(batch, self._windows_of(batch))
                except Exception as exc:
                    _failed(exc, "left for redelivery")
                    return processed
                batch = (batch.messages, decided)
            if isinstance(batch, tuple):
                messages, flight = batch
                if not self._try_publish(flight):
                    for later in in_order[i + 1 :]:
                        if isinstance(later, Parsed):
                            later.abandon()
                    return processed
                batch = _Published(messages, flight.started)
            if not self._try_acknowledge(batch, source):
                for later in in_order[i + 1 :]:
                    if isinstance(later, Parsed):
                        later.abandon()
                    elif isinstance(later, tuple):
                        _abandon(later[1])
                return processed
            processed += len(batch.messages)
        return processed

    def _try_publish(self, batch: InFlight) -> bool:
        try:
            self.publish(batch)
        except Exception as exc:
            _failed(exc, "retrying it on its own")
            return False
        return True

    def _try_acknowledge(self, batch: _Published, source: EventSource) -> bool:
        try:
            self.acknowledge(batch.started)
            source.commit(batch.messages)
        except Exception as exc:
            _failed(exc, "retrying it on its own")
            return False
        return True

    def _settle(self, messages: list[RawMessage], source: EventSource, stop: threading.Event) -> bool:
        """Process one batch until it succeeds, then commit it; False if stopped first (not committed)."""
        backoff = 0.1
        while True:
            try:
                self.process(messages)
                source.commit(messages)
                return True
            except Exception as exc:
                _failed(exc, f"retrying in {backoff:.1f} s")
                if stop.wait(backoff):
                    return False  # stopping: leave the offsets uncommitted; redelivered later
                backoff = min(backoff * 2, 5.0)


@dataclass
class Parsed:
    """A parsed batch whose windows may be on their way (:meth:`StreamWorker._parse`)."""

    messages: list[RawMessage]
    summary: BatchSummary
    events: list[Event]
    started: float
    sources: list[RawMessage] | None = None  # each event's message, when they came as messages
    #: The windows update running in the background, if one was started.
    windows: Future[list[FeatureResult]] | None = None

    def abandon(self) -> None:
        """Wait for the windows update before the batch is processed again (its retry then finds the
        events stored: duplicates, counted once)."""
        if self.windows is not None:
            with contextlib.suppress(Exception):  # the retry will find out again
                self.windows.result(timeout=60.0)


@dataclass
class InFlight:
    """A batch whose decisions are on their way to durability (:meth:`StreamWorker.begin`)."""

    summary: BatchSummary
    pending: list[PendingDecision]
    started: float
    sources: list[RawMessage] | None = None  # the pending decisions' messages, when they came as messages


@dataclass
class _Published:
    """A batch whose decisions are durable and handed to the sink, its offsets not yet committed."""

    messages: list[RawMessage]
    started: float


def _in_order(
    storing: tuple[list[RawMessage], InFlight] | None, decided: tuple[list[RawMessage], InFlight] | None
) -> list[list[RawMessage]]:
    """The messages of begun batches to process again, in order, once their writes are done (see
    :func:`_abandon`)."""
    out = []
    for batch in (storing, decided):
        if batch is not None:
            _abandon(batch[1])
            out.append(batch[0])
    return out


def _failed(exc: Exception, then: str) -> None:
    """A failed batch attempt (it stays uncommitted): counted by the error's type, and logged."""
    metrics.WORKER_BATCH_FAILURES.labels(error=type(exc).__name__).inc()
    log.warning("batch failed (%s: %s); %s", type(exc).__name__, exc, then)


def _abandon(batch: InFlight | None) -> None:
    """Wait for a begun batch's writes before it is processed again (its retry then sees them as
    duplicates, in order); their outcome does not matter, the retry decides what is durable."""
    if batch is None:
        return
    if batch.pending:  # one future answers the whole batch
        with contextlib.suppress(Exception):  # the retry will find out again
            batch.pending[0].storage.result(timeout=60.0)


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
