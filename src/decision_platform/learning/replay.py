"""Replay a labelled data set as live traffic: into Kafka, or over HTTP to /decide.

Over HTTP, the replay can also close the learning loop: an :class:`OutcomeReporter` posts the
ground-truth outcome of every decision to /outcome a little later, as a real business would once it
learns whether a payment was fraud. The outcome comes from the event's true label and the action the
platform took, with the same rule the policy was trained with (``simulate_outcome``).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np

from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.core.rewards import SimulationSettings
from decision_platform.events.kafka import EventProducer, ensure_topics
from decision_platform.training.progress import SILENT, Progress
from decision_platform.training.simulator import simulate_outcome


@dataclass
class ReplaySummary:
    sent: int = 0
    acknowledged: int = 0
    errors: int = 0
    #: Seconds spent sending (the rate is over these); waiting for the last outcomes is not counted.
    seconds: float = 0.0
    first_error: str | None = None
    # With outcomes (--outcomes): 201 or 200 (the same outcome again) from /outcome is posted; 409 (a
    # different outcome was already recorded; outcomes are final) is a conflict; anything else failed.
    outcomes_posted: int = 0
    outcomes_conflicts: int = 0
    outcomes_failed: int = 0
    #: Outcome name -> how many were posted.
    outcomes: dict[str, int] = field(default_factory=dict)
    first_outcome_error: str | None = None

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


def ground_truth_outcome(
    event_id: str, label: int, action: int, seed: int, simulation: SimulationSettings
) -> str:
    """The outcome that the true ``label`` and the platform's ``action`` lead to.

    The draw (only a throttle is random: a customer may abandon, a fraudster may give up) comes from a
    generator seeded by ``seed`` and the event id, not from one shared stream: the result then does not
    depend on the order in which concurrent senders got their answers, and replaying the same data set
    again posts the same outcomes (idempotent 200s rather than 409 conflicts).
    """
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    rng = np.random.default_rng([seed, int.from_bytes(digest, "big")])
    return simulate_outcome(label, action, rng, simulation)[0]


class OutcomeReporter:
    """Posts each decision's ground-truth outcome to /outcome, ``delay_s`` after the decision.

    Real outcomes arrive later than decisions (a chargeback takes weeks); the delay keeps that shape so
    that what learns from outcomes sees them arrive after the fact. One scheduler thread keeps a heap of
    due times and hands due posts to ``workers`` posting threads, so :meth:`schedule` never blocks the
    senders. :meth:`drain` waits until every scheduled outcome has been posted.
    """

    def __init__(
        self,
        url: str,
        labels: Mapping[str, int],
        simulation: SimulationSettings,
        delay_s: float = 2.0,
        seed: int = 0,
        workers: int = 1,
        timeout_s: float = 10.0,
    ) -> None:
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        self.labels = labels
        self.simulation = simulation
        self.delay_s = delay_s
        self.seed = seed
        self._client = httpx.Client(base_url=url, timeout=timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="outcome-post")
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, int, str]] = []  # (due, tie-breaker, decision id, outcome)
        self._order = itertools.count()
        self._stopped = False
        self.scheduled = 0
        self.finished = 0
        self.posted = 0
        self.conflicts = 0
        self.failed = 0
        self.outcomes: Counter[str] = Counter()
        self.first_error: str | None = None
        self._scheduler = threading.Thread(target=self._run, name="outcome-scheduler", daemon=True)
        self._scheduler.start()

    def schedule(self, event_id: str, decision_id: int, action: int) -> None:
        """Derive the outcome of a decision now and post it once ``delay_s`` has passed."""
        label = self.labels.get(event_id)
        with self._cond:
            self.scheduled += 1
            if label is None:  # not an error of the API: counted, and the replay goes on
                self._finish_locked(f"no label for event {event_id!r}")
                return
        outcome = ground_truth_outcome(event_id, int(label), action, self.seed, self.simulation)
        due = time.monotonic() + self.delay_s
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._order), decision_id, outcome))
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Outcomes scheduled but not posted (or failed) yet."""
        with self._cond:
            return self.scheduled - self.finished

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every scheduled outcome is posted; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self.finished >= self.scheduled, timeout)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Post what is still pending (unless ``drain`` is False: then it is dropped), stop, release.

        Draining by default: an outcome silently lost would bias whatever learns from them.
        """
        if drain:
            self.drain(timeout)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._scheduler.join(timeout=5.0)
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> OutcomeReporter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def fill(self, summary: ReplaySummary) -> None:
        """Copy the counts into ``summary``."""
        with self._cond:
            summary.outcomes_posted = self.posted
            summary.outcomes_conflicts = self.conflicts
            summary.outcomes_failed = self.failed
            summary.outcomes = dict(sorted(self.outcomes.items()))
            summary.first_outcome_error = self.first_error

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, _, decision_id, outcome = heapq.heappop(self._heap)
                    self._pool.submit(self._post, decision_id, outcome)  # never blocks
                wait = self._heap[0][0] - now if self._heap else None
                self._cond.wait(wait)

    def _post(self, decision_id: int, outcome: str) -> None:
        error: str | None = None
        status = 0
        try:
            response = self._client.post("/outcome", json={"decision_id": decision_id, "outcome": outcome})
            status = response.status_code
            if status not in (200, 201, 409):
                error = f"HTTP {status} for decision {decision_id}: {response.text[:200]}"
        except Exception as exc:  # counted and reported, the replay goes on
            error = f"{type(exc).__name__}: {exc}"
        with self._cond:
            if status == 409:
                self.conflicts += 1
            elif error is None:
                self.posted += 1
                self.outcomes[outcome] += 1
            self._finish_locked(error)

    def _finish_locked(self, error: str | None) -> None:
        if error is not None:
            self.failed += 1
            self.first_error = self.first_error or error
        self.finished += 1
        self._cond.notify_all()


def replay(
    events: Sequence[Event],
    send: Callable[[Sequence[Event]], None],
    rate: float,
    chunk: int,
    progress: Progress = SILENT,
    workers: int = 1,
    outcomes: OutcomeReporter | None = None,
) -> ReplaySummary:
    """Send ``events`` in chunks at ``rate`` with ``workers`` concurrent senders; count what was acked.

    With ``outcomes`` (the reporter that ``send`` schedules into), wait until every outcome has been
    posted before returning, so that the summary is complete and nothing is lost when the process exits.
    """
    summary = ReplaySummary()
    lock = threading.Lock()
    started = time.perf_counter()

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
        achieved = summary.acknowledged / elapsed if elapsed else 0.0
        progress.advance(task, len(batch), note=f"{achieved:,.0f} ev/s")

    task = "replaying"
    progress.start(task, len(events))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = []
        for batch in _paced(events, rate, chunk):
            summary.sent += len(batch)
            futures.append(pool.submit(deliver, batch))
        for future in futures:
            future.result()
    summary.seconds = time.perf_counter() - started
    if outcomes is not None:
        # The last decisions' outcomes are still waiting out their delay: show them being posted.
        # Every send is done, so no more are scheduled: the total is final.
        waiting, shown = "outcomes", 0
        progress.start(waiting, outcomes.scheduled, note=f"posted {outcomes.delay_s:g} s after each decision")
        while True:
            drained = outcomes.drain(timeout=0.1)
            finished = outcomes.finished
            progress.advance(waiting, finished - shown)
            shown = finished
            if drained:
                break
        outcomes.fill(summary)
    return summary


def kafka_sender(settings: Settings) -> Callable[[Sequence[Event]], None]:
    ensure_topics(settings)
    producer = EventProducer(settings)
    return producer.send


def http_sender(
    url: str, timeout_s: float = 10.0, outcomes: OutcomeReporter | None = None
) -> Callable[[Sequence[Event]], None]:
    """Posts each event to /decide (the live path); a non-2xx answer is an error.

    With ``outcomes``, every decision (a repeated event's too: its outcome is still owed) is handed
    to the reporter, which posts its ground-truth outcome later.
    """
    client = httpx.Client(base_url=url, timeout=timeout_s)

    def send(batch: Sequence[Event]) -> None:
        for event in batch:
            body = {"entity_id": event.entity_id, "event": event.model_dump(mode="json")}
            response = client.post("/decide", json=body)
            if response.status_code >= 300:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            if outcomes is not None:
                decision = response.json()
                outcomes.schedule(event.event_id, int(decision["decision_id"]), int(decision["action"]))

    return send
