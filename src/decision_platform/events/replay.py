"""Replay a labelled data set as live traffic: into Kafka, or over HTTP to /decide."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from decision_platform.config import Settings
from decision_platform.events.kafka import EventProducer, ensure_topics
from decision_platform.events.schema import Event


@dataclass
class ReplaySummary:
    sent: int = 0
    acknowledged: int = 0
    errors: int = 0
    seconds: float = 0.0
    first_error: str | None = None

    @property
    def rate(self) -> float:
        return self.acknowledged / self.seconds if self.seconds else 0.0


def shift_to_now(events: Sequence[Event]) -> list[Event]:
    """The same events, moved in time so that the last one happens now (windows stay live)."""
    if not events:
        return []
    offset = time.time() - max(e.timestamp for e in events)
    # model_construct: the values are already valid (only the time moves), and this is ~20x faster.
    return [Event.model_construct(**{**dict(e), "timestamp": e.timestamp + offset}) for e in events]


def _paced(events: Sequence[Event], rate: float, chunk: int) -> Iterator[Sequence[Event]]:
    """Chunks of events, released so that the overall rate stays at ``rate`` events/s (0: no limit)."""
    started = time.perf_counter()
    for start in range(0, len(events), chunk):
        if rate > 0:
            due = started + start / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        yield events[start : start + chunk]


def replay(
    events: Sequence[Event],
    send: Callable[[Sequence[Event]], None],
    rate: float,
    chunk: int,
    console: Console | None = None,
    workers: int = 1,
) -> ReplaySummary:
    """Send ``events`` in chunks at ``rate`` with ``workers`` concurrent senders; count what was acked."""
    summary = ReplaySummary()
    lock = threading.Lock()
    started = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]:,.0f} ev/s"),
        console=console or Console(),
    )

    def deliver(batch: Sequence[Event]) -> None:
        try:
            send(batch)
            with lock:
                summary.acknowledged += len(batch)
        except Exception as exc:  # counted and reported, the replay goes on
            with lock:
                summary.errors += len(batch)
                summary.first_error = summary.first_error or f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - started
        progress.update(task, advance=len(batch), rate=summary.acknowledged / elapsed if elapsed else 0.0)

    with progress, ThreadPoolExecutor(max_workers=workers) as pool:
        task = progress.add_task("replay", total=len(events), rate=0.0)
        futures = []
        for batch in _paced(events, rate, chunk):
            summary.sent += len(batch)
            futures.append(pool.submit(deliver, batch))
        for future in futures:
            future.result()
    summary.seconds = time.perf_counter() - started
    return summary


def kafka_sender(settings: Settings) -> Callable[[Sequence[Event]], None]:
    ensure_topics(settings)
    producer = EventProducer(settings)
    return producer.send


def http_sender(url: str, timeout_s: float = 10.0) -> Callable[[Sequence[Event]], None]:
    """Posts each event to /decide (the live path); a non-2xx answer is an error."""
    client = httpx.Client(base_url=url, timeout=timeout_s)

    def send(batch: Sequence[Event]) -> None:
        for event in batch:
            body = {"entity_id": event.entity_id, "event": event.model_dump(mode="json")}
            response = client.post("/decide", json=body)
            if response.status_code >= 300:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

    return send
