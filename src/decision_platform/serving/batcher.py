"""Micro-batching for the API: concurrent ``POST /decide`` requests are decided together, by one thread.

Why: every stage of the engine is vectorised. Sixteen concurrent requests decided as one batch cost one
Redis pipeline, one pass of each model and one group commit -- little more than one request -- where a
thread per request pays all of it sixteen times and fights the others for the GIL. So the routes put
their request on a queue and await a future; one decider thread takes whatever has queued (up to
``max_batch``; waiting up to ``max_wait_s`` for more when it is set), decides it with
:meth:`DecisionEngine.submit_batch` and goes straight on to the next batch while this one's group commit
runs. Each request's future resolves from the writer thread only when its batch is durable (its own row
stored or spooled), so an acknowledged decision is exactly as durable as before; a write that fails (nothing
durable) fails its request, which the route answers 503.

Under light load a batch is one request and nothing waits for company (``max_wait_s`` is 0 by default):
batches grow by themselves while the decider is busy, which is exactly when they pay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from decision_platform.core.records import RowStatus
from decision_platform.observability import metrics
from decision_platform.serving.engine import Decision, DecisionEngine, DecisionRequest, PendingDecision

log = logging.getLogger(__name__)

_Item = tuple[DecisionRequest, asyncio.AbstractEventLoop, "asyncio.Future[Decision | PendingDecision]"]


class DecisionBatcher:
    """One decider thread serving any number of coroutines (one per request)."""

    def __init__(self, engine: DecisionEngine, max_batch: int = 64, max_wait_s: float = 0.0) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="decider", daemon=True)
        self._closed = False
        self._thread.start()

    async def decide(self, request: DecisionRequest, timeout_s: float = 60.0) -> Decision:
        """The decision for ``request`` once it is durable. Raises what the write path raised (OSError:
        neither the database nor the spool took it) or TimeoutError: the route answers 503 to both."""
        if self._closed:
            raise RuntimeError("the decider is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision | PendingDecision] = loop.create_future()
        self._queue.put((request, loop, future))
        async with asyncio.timeout(timeout_s):
            answer = await future
        if isinstance(answer, PendingDecision):  # a retried event: its first decision is read, off the loop
            return await asyncio.to_thread(self.engine.first_decision, answer)
        return answer

    def close(self, timeout_s: float = 10.0) -> None:
        """Decide what is queued, then stop the thread."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)

    # --- the decider thread
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = self._gather(first)
            self._decide(batch)
            if stopping:
                return

    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                wait = deadline - time.monotonic()
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _decide(self, batch: list[_Item]) -> None:
        metrics.API_BATCH_SIZE.observe(len(batch))
        try:
            pending = self.engine.submit_batch([request for request, _, _ in batch])
        except BaseException as exc:  # the engine falls back on model failures; this is a bug: 500
            log.exception("deciding a batch of %d failed", len(batch))
            for _, loop, future in batch:
                loop.call_soon_threadsafe(_fail, future, exc)
            return
        if pending:  # one future for the whole batch: one callback answers every request of it
            pending[0].storage.add_done_callback(_Resolver(self.engine, batch, pending))


class _Resolver:
    """Called (writer thread) once the batch is durable: one callback per event loop (one per process when
    served) answers that loop's requests of the batch -- each with its decision or with what kept it from
    being durable. One wake-up a batch, not one a request; the answers are built on the loop."""

    __slots__ = ("batch", "engine", "pending")

    def __init__(self, engine: DecisionEngine, batch: list[_Item], pending: list[PendingDecision]) -> None:
        self.engine, self.batch, self.pending = engine, batch, pending

    def __call__(self, _storage: Future[list[RowStatus]]) -> None:
        rows_of: dict[asyncio.AbstractEventLoop, list[int]] = {}
        for i, (_, loop, _) in enumerate(self.batch):
            rows_of.setdefault(loop, []).append(i)
        for loop, rows in rows_of.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: its requests are gone with it
                loop.call_soon_threadsafe(self._answer, rows)

    def _answer(self, rows: list[int]) -> None:  # on the requests' event loop
        try:
            answers: list[Any] = self.engine.answers([self.pending[i] for i in rows])
        except BaseException as error:  # a bug: its requests get a 500, not a wait for the timeout
            log.exception("answering a batch of %d failed", len(rows))
            answers = [error] * len(rows)
        for i, answer in zip(rows, answers, strict=True):
            future = self.batch[i][2]
            if future.done():  # cancelled: the client went away or the request timed out
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
