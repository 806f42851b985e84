"""Micro-batching for the API: concurrent ``POST /decide`` requests are decided together, by one thread.

Why: every stage of the engine is vectorised. Sixteen concurrent requests decided as one batch cost one
Redis pipeline, one pass of each model and one group commit -- little more than one request -- where a
thread per request pays all of it sixteen times and fights the others for the GIL. So the routes put
their request on a queue and await a future; one decider thread takes whatever has queued (up to
``max_batch``; waiting up to ``max_wait_s`` for more when it is set), decides it with
:meth:`DecisionEngine.submit_batch` and goes straight on to the next batch while this one's group commit
runs. Each request's future resolves from the writer thread only when its own row is durable (stored or
spooled), so an acknowledged decision is exactly as durable as before; a write that fails (nothing
durable) fails its request, which the route answers 503.

Under light load a batch is one request and nothing waits for company (``max_wait_s`` is 0 by default):
batches grow by themselves while the decider is busy, which is exactly when they pay.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future

from decision_platform.observability import metrics
from decision_platform.serving.engine import Decision, DecisionEngine, DecisionRequest, PendingDecision

log = logging.getLogger(__name__)

_Item = tuple[DecisionRequest, asyncio.AbstractEventLoop, "asyncio.Future[PendingDecision]"]


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
        future: asyncio.Future[PendingDecision] = loop.create_future()
        self._queue.put((request, loop, future))
        async with asyncio.timeout(timeout_s):
            pending = await future
        if pending.needs_lookup:  # a retried event: its first decision is read (rare; off the loop)
            return await asyncio.to_thread(self.engine.finish, pending)
        return self.engine.finish(pending)

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
        for (_, loop, future), decision in zip(batch, pending, strict=True):
            decision.storage.add_done_callback(_Resolver(loop, future, decision))


class _Resolver:
    """Called (writer thread) once a row is durable: wakes its request's coroutine on its own loop."""

    __slots__ = ("decision", "future", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[PendingDecision],
        decision: PendingDecision,
    ) -> None:
        self.loop, self.future, self.decision = loop, future, decision

    def __call__(self, storage: Future[str]) -> None:
        error = storage.exception()
        try:
            if error is not None:
                self.loop.call_soon_threadsafe(_fail, self.future, error)
            else:
                self.loop.call_soon_threadsafe(_succeed, self.future, self.decision)
        except RuntimeError:  # the loop is closed: the request is gone with it
            pass


def _succeed(future: asyncio.Future[PendingDecision], decision: PendingDecision) -> None:
    if not future.done():  # cancelled: the client went away or the request timed out
        future.set_result(decision)


def _fail(future: asyncio.Future[PendingDecision], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
