"""The API's micro-batcher: features fetched a step ahead of the decider, batches merged, failures kept apart.

An engine stand-in records what the batcher asks of it; the real engine's side of the contract
(``read_features`` / ``submit_batch(features=...)``) is covered by the API tests and test_fast_path.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from decision_platform.features import FeatureResult
from decision_platform.serving.batcher import DecisionBatcher
from decision_platform.serving.engine import DecisionRequest, PendingDecision, StageError

WAIT_S = 5.0


class RecordingEngine:
    """Fetches instantly (failing for entity "down"); the first decision blocks until ``release``."""

    def __init__(self) -> None:
        self.fetched: list[list[str]] = []
        self.submitted: list[tuple[list[str], str]] = []
        self.release = threading.Event()
        self.first_submit = threading.Event()
        self._lock = threading.Lock()

    def read_features(self, requests: Sequence[DecisionRequest]) -> list[FeatureResult]:
        with self._lock:
            self.fetched.append([r.entity_id for r in requests])
        if any(r.entity_id == "down" for r in requests):
            raise StageError("feature_store_unavailable")
        return [FeatureResult(values=np.zeros(1)) for _ in requests]

    def submit_batch(
        self, requests: Sequence[DecisionRequest], features: Any, started: float | None = None
    ) -> list[PendingDecision]:
        kind = features.reason if isinstance(features, StageError) else f"{len(features)} fetched"
        self.submitted.append(([r.entity_id for r in requests], kind))
        if len(self.submitted) == 1:
            self.first_submit.set()
            assert self.release.wait(WAIT_S), "the test never released the first batch"
        durable: Future[list[str]] = Future()
        durable.set_result(["stored"] * len(requests))
        return [PendingDecision(r, durable, i, None) for i, r in enumerate(requests)]  # type: ignore[arg-type]

    def answers(self, pending: Sequence[PendingDecision]) -> list[Any]:
        return [f"decided {p.record.entity_id}" for p in pending]  # type: ignore[attr-defined]


async def wait_until(condition: Any) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.005)


def test_the_next_batch_is_fetched_while_one_is_decided_and_ready_batches_are_decided_as_one() -> None:
    engine = RecordingEngine()
    batcher = DecisionBatcher(engine)  # type: ignore[arg-type]

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(batcher.decide(DecisionRequest("a", None)))
        await wait_until(engine.first_submit.is_set)
        # The decider is busy with "a": "b" and then "c" are fetched meanwhile, each in its own round trip.
        second = asyncio.ensure_future(batcher.decide(DecisionRequest("b", None)))
        await wait_until(lambda: len(engine.fetched) == 2)
        third = asyncio.ensure_future(batcher.decide(DecisionRequest("c", None)))
        await wait_until(lambda: len(engine.fetched) == 3)
        engine.release.set()
        return list(await asyncio.gather(first, second, third))

    try:
        assert asyncio.run(scenario()) == ["decided a", "decided b", "decided c"]
    finally:
        batcher.close()
    assert engine.fetched == [["a"], ["b"], ["c"]]
    assert engine.submitted == [(["a"], "1 fetched"), (["b", "c"], "2 fetched")]


def test_a_failed_fetch_falls_back_its_own_batch_only() -> None:
    engine = RecordingEngine()
    batcher = DecisionBatcher(engine)  # type: ignore[arg-type]

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(batcher.decide(DecisionRequest("a", None)))
        await wait_until(engine.first_submit.is_set)
        down = asyncio.ensure_future(batcher.decide(DecisionRequest("down", None)))
        await wait_until(lambda: len(engine.fetched) == 2)
        up = asyncio.ensure_future(batcher.decide(DecisionRequest("up", None)))
        await wait_until(lambda: len(engine.fetched) == 3)
        engine.release.set()
        return list(await asyncio.gather(first, down, up))

    try:
        assert asyncio.run(scenario()) == ["decided a", "decided down", "decided up"]
    finally:
        batcher.close()
    assert sorted(engine.submitted[1:]) == [(["down"], "feature_store_unavailable"), (["up"], "1 fetched")]


def test_close_decides_what_is_queued_then_stops_both_threads() -> None:
    engine = RecordingEngine()
    engine.release.set()
    batcher = DecisionBatcher(engine)  # type: ignore[arg-type]

    async def scenario() -> list[Any]:
        return list(await asyncio.gather(*(batcher.decide(DecisionRequest(f"u{k}", None)) for k in range(5))))

    assert asyncio.run(scenario()) == [f"decided u{k}" for k in range(5)]
    batcher.close()
    assert not batcher._reader.is_alive() and not batcher._thread.is_alive()
