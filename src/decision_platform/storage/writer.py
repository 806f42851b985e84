"""Group commit with a durable spool: how a decision is acknowledged without ever being lost.

Single-row commits cap PostgreSQL at ~2.6k rows/s on these machines; batches of a few hundred reach
~24-60k. So concurrent requests hand their rows to the writer threads (two by default: one commits while
the next batch is sent), each inserting whatever has queued up in one transaction, and each request waits
for *its* batch to be durable before answering.

What "durable" means under each fault (README, "What is promised under faults"):

- **Database down or stalled.** Every database call of the writer runs on one "lane" thread with a
  deadline (``write_timeout_s``): a refused connection fails at once, a frozen one is given up after the
  deadline. Either way the batch is appended to the local spool and fsynced, the decision is acknowledged,
  and the database is marked *down*: later batches go straight to the spool (no waiting on a dead server)
  until a probe, every ``probe_interval_s`` with backoff, finds it answering again.
- **Replay in the background.** As soon as the database is up and the spool holds records, the writer
  thread replays them a chunk at a time *between* live batches, so new decisions never queue behind an
  outage's backlog, and nothing waits for a new request to arrive.
- **A record the database refuses** (``errors.is_record_error``: a NUL byte, an integer beyond 64 bits,
  a violated constraint) never blocks the others: the chunk is split in halves until the refused record is
  alone, and that record is moved to ``quarantine.jsonl`` (metric + a log line naming the decision id).
- **A retried event** gets its first decision: an event id already in the spool is answered as a
  duplicate, in every state (spooling, replaying, database back), as the database's unique index does.
- **Outcomes** of decisions still in the spool are spooled behind them (same order, same replay).
- **The spool's disk hangs** (an fsync or a write that does not return; the database away too). Every
  append (and quarantine write) runs on one "disk lane" thread with a deadline (``spool_timeout_s``): past
  it the batch fails (:class:`SpoolTimeout`, 503 + Retry-After, ``dp_spool_timeouts_total``), and while
  the append is stuck later ones fail at once -- one thread waits on the disk, the writer threads never
  do. Nothing is acknowledged before its fsync returns. The stuck append is abandoned, not undone: once
  the disk answers, its records are durable and replayed like any other (never acknowledged: their
  clients got a 503 and retry), or it fails and is cut off as a failed append is. A retry of an event
  whose first try is still in flight waits for it (up to the deadline, else 503): afterwards it gets the
  first decision if that became durable, else a decision of its own -- one decision either way. This
  needed the spool's index lock split from its append lock (storage/spool.py): held across the fsync,
  every batch's event look-up, ``/ready`` and ``GET /decisions/{id}`` waited on the disk, so a deadline
  on the append alone freed nothing.

Reads for the API (:meth:`DecisionWriter.find_decision`) look in the spool first, then ask the database
with the same bounded wait; when the database is down they raise :class:`DatabaseUnavailable` (503).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from decision_platform.core.records import DUPLICATE, SPOOLED, STORED, DecisionRecord, RowStatus
from decision_platform.observability import metrics
from decision_platform.storage.errors import (
    DamagedRowError,
    DatabaseUnavailable,
    is_data_error,
    is_record_error,
)
from decision_platform.storage.repository import DecisionRow, OutcomeResult, OutcomeStatus, Repository
from decision_platform.storage.spool import (
    DECISION,
    OUTCOME,
    ReplayChunk,
    Spool,
    SpooledOutcome,
    SpoolRecord,
    SpoolTimeout,
)

log = logging.getLogger(__name__)


T = TypeVar("T")

#: After the spool could not quarantine a refused record (its disk full), the replay waits this long.
QUARANTINE_RETRY_S = 1.0


class _QuarantineFailed(Exception):
    """A record the database refuses could not be written to the quarantine file (the spool's disk)."""


#: Probes of a down database back off to this: a refused connect costs little, and the replay should
#: start within about a second of the database answering again.
MAX_PROBE_INTERVAL_S = 1.0


class _Lane:
    """Runs database calls on its own threads so that a call that hangs can be given up after a deadline.

    A frozen server (or a network partition) can keep a socket waiting for minutes; no driver timeout
    covers every case (a statement timeout is enforced by the server, which may be the frozen party).
    A call that misses its deadline keeps its thread until the socket wakes up; while ``max_stalled``
    calls are stuck (running for ``stall_after_s`` or more), new calls fail at once instead of piling up
    threads. Calls merely in flight are not stuck: a burst of more concurrent reads than threads queues
    (micro-batched answers arrive in bursts, and so do the outcomes that follow them; counting every call
    in flight as stuck marked a healthy database down under such a burst).
    """

    def __init__(
        self,
        name: str,
        threads: int = 1,
        max_stalled: int = 1,
        stall_after_s: float = 0.0,
        unavailable: Callable[[str], Exception] = DatabaseUnavailable,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._inflight: dict[Future[Any], float] = {}
        self._lock = threading.Lock()
        self.max_stalled = max_stalled
        self.stall_after_s = stall_after_s
        #: The error of a call given up (the database's lanes: DatabaseUnavailable; the spool's disk lane:
        #: SpoolTimeout).
        self._unavailable = unavailable

    def submit(self, call: Callable[[], T]) -> Future[T]:
        """Start a call without waiting for it (DatabaseUnavailable at once if the lane is stuck)."""
        with self._lock:
            now = time.monotonic()
            self._inflight = {f: t for f, t in self._inflight.items() if not f.done()}
            stalled = sum(1 for started in self._inflight.values() if now - started >= self.stall_after_s)
            if stalled >= self.max_stalled:
                raise self._unavailable("no answer to earlier calls yet")
            future = self._pool.submit(call)
            self._inflight[future] = now
        return future

    def run(self, call: Callable[[], T], timeout_s: float) -> T:
        future = self.submit(call)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            future.cancel()  # one still queued never runs: its caller has given up on it
            raise self._unavailable(f"no answer within {timeout_s:g} s") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Handover:
    """Rows handed to the group commit together, answered by one future once every row is durable.

    One future a batch, not one a row: a ``Future`` (a Condition and an RLock) made, resolved and waited
    for per row was ~7% of the stream worker thread's py-spy samples. Each row still gets its own answer.
    ``single``: the future answers the one row's status (or raises its error) instead of the list.
    """

    __slots__ = ("future", "rows", "single", "statuses")

    def __init__(self, rows: list[DecisionRow], future: Future[Any], single: bool) -> None:
        self.rows, self.future, self.single = rows, future, single
        self.statuses: list[RowStatus] = [DUPLICATE] * len(rows)  # each one set again by _store

    def resolve(self) -> None:
        if not self.single:
            self.future.set_result(self.statuses)
        elif isinstance(self.statuses[0], BaseException):
            self.future.set_exception(self.statuses[0])
        else:
            self.future.set_result(self.statuses[0])


@dataclass(frozen=True)
class WriterStatus:
    """What /ready and /metrics say about the write path."""

    database_up: bool
    last_error: str | None
    pending: int
    #: Records in quarantine, or why it cannot be read ("unreadable: Is a directory").
    quarantined: int | str


class DecisionWriter:
    """A background thread that stores decisions in batches; ``write`` returns once the row is durable."""

    def __init__(
        self,
        repository: Repository,
        spool: Spool,
        batch_size: int = 256,
        write_timeout_s: float = 1.0,
        read_timeout_s: float = 2.0,
        probe_interval_s: float = 0.5,
        replay_chunk: int = 500,
        on_recover: Callable[[], None] | None = None,
        threads: int = 2,
        spool_timeout_s: float = 5.0,
    ) -> None:
        self.repository = repository
        self.spool = spool
        self.batch_size = batch_size
        self.write_timeout_s = write_timeout_s
        self.read_timeout_s = read_timeout_s
        self.probe_interval_s = probe_interval_s
        self.replay_chunk = replay_chunk
        self.spool_timeout_s = spool_timeout_s
        #: Run once when the database first answers (e.g. migrations after a start while it was down).
        self._on_recover = on_recover
        # One lane per writer thread, one call at a time on each: any call still running is stuck. The
        # first thread's lane also carries the probes and the replay.
        self._lanes = [_Lane(f"db-write{i}") for i in range(max(1, threads))]
        self._writes = self._lanes[0]
        self._reads = _Lane("db-read", threads=4, max_stalled=4, stall_after_s=read_timeout_s)
        # Spool writes (appends, quarantine) on one thread with a deadline: a disk that hangs holds that
        # thread only; while a write is stuck past the deadline, the next fail at once (see the docstring).
        self._disk = _Lane(
            "spool-disk",
            stall_after_s=spool_timeout_s,
            unavailable=lambda why: SpoolTimeout(f"the spool's disk did not answer: {why}"),
        )
        self._state_lock = threading.Lock()
        #: Serialises "is an outcome spooled for it?" with appending one.
        self._spool_lock = threading.Lock()
        self._up = on_recover is None
        self._last_error: str | None = None if self._up else "not reached yet"
        self._next_probe = 0.0
        #: The probe in flight: never waited for on the writer thread, which must keep spooling meanwhile
        #: (a probe of a frozen server can hang for as long as the connect timeout).
        self._probing: Future[None] | None = None
        self._backoff = probe_interval_s
        #: The replay waits until then after the spool could not quarantine a record (see _replay).
        self._replay_after = 0.0
        # SimpleQueue (C, no Condition): a put from a deciding thread does not wake the writer through a
        # Python-level lock (queue.Queue.put was 7% of a 500-row batch in cProfile).
        self._queue: queue.SimpleQueue[_Handover | None] = queue.SimpleQueue()
        # Several writer threads take batches off the one queue: while one waits for its commit (an fsync,
        # ~4 ms here), the next batch is already on its way, so a request waits for about one commit instead
        # of the rest of the one in flight plus its own (PostgreSQL flushes concurrent commits together).
        # Only the first thread probes a down database and replays the spool.
        self._threads = [
            threading.Thread(target=self._run, args=(lane, i == 0), name=f"decision-writer-{i}", daemon=True)
            for i, lane in enumerate(self._lanes)
        ]
        self._set_gauges()
        for thread in self._threads:
            thread.start()

    # --- the API of the write path
    def submit(self, record: DecisionRecord) -> Future[str]:
        """Hand a decision to the group commit; the future resolves once it is durable."""
        future: Future[str] = Future()
        # The one place a record becomes a table row: the queue, the spool and the insert carry rows.
        self._queue.put(_Handover([record.to_row()], future, single=True))
        return future

    def submit_many(self, records: list[DecisionRecord]) -> Future[list[RowStatus]]:
        """Hand several decisions to the group commit at once; the one future resolves once all of them
        are durable, with each record's status in order (an exception for a record that could not be
        made durable: the caller must not acknowledge that one)."""
        future: Future[list[RowStatus]] = Future()
        self._queue.put(_Handover([record.to_row() for record in records], future, single=False))
        return future

    def write(self, record: DecisionRecord, timeout: float = 30.0) -> str:
        """Store one decision; returns ``stored``, ``spooled`` or ``duplicate`` once it is durable."""
        return self.submit(record).result(timeout=timeout)

    def write_many(self, records: list[DecisionRecord], timeout: float = 60.0) -> list[str]:
        """Store several decisions (they share group commits); one result per record, in order."""
        answers: list[str] = []
        for status in self.submit_many(records).result(timeout=timeout):
            if isinstance(status, BaseException):
                raise status
            answers.append(status)
        return answers

    @property
    def database_up(self) -> bool:
        return self._up

    def status(self) -> WriterStatus:
        try:
            quarantined: int | str = self.spool.quarantined()
        except OSError as exc:  # the spool's disk, not the database: said here, never a 500 of /ready
            quarantined = f"unreadable: {exc.strerror or exc}"
        return WriterStatus(self._up, self._last_error, self.spool.pending(), quarantined)

    def wait_replayed(self, timeout_s: float) -> bool:
        """Wait until the spool is empty (tests, and a graceful stop); True if it is."""
        deadline = time.monotonic() + timeout_s
        while self.spool.has_work():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self, drain_s: float = 5.0) -> None:
        """Finish the queued writes and, for up to ``drain_s``, the replay; what is still spooled stays on
        disk for the next start."""
        if self._up:
            self.wait_replayed(drain_s)
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        for lane in self._lanes:
            lane.close()
        self._reads.close()
        self._disk.close()
        self.spool.close()

    # --- reads that know about the spool
    def find_decision(self, decision_id: int) -> DecisionRecord | None:
        """The decision, from the spool if it is still there, else from the database (bounded wait)."""
        spooled = self.spool.get_decision(decision_id)
        if spooled is not None:
            return spooled
        stored = self.query(lambda: self.repository.get_decision(decision_id))
        return stored if stored is not None else self.spool.find_elsewhere(decision_id)

    def find_decision_by_event(self, event_id: str) -> DecisionRecord | None:
        """The decision made for an event: spooled or stored."""
        decision_id = self.spool.decision_for_event(event_id)
        if decision_id is not None:
            spooled = self.spool.get_decision(decision_id)
            if spooled is not None:
                return spooled
        return self.query(lambda: self.repository.get_decision_by_event(event_id))

    def query(self, call: Callable[[], T]) -> T:
        """A database call for a request: fails fast while the database is known to be down, and within
        ``read_timeout_s`` when it stalls (both :class:`DatabaseUnavailable`, which the API answers 503).

        A statement the database refuses for the data it met (``errors.is_data_error``: SQLite's "malformed
        JSON" on a row a hand edit left, a PostgreSQL data exception) is neither an outage nor a bug. SQLite's
        was taken for an outage -- the database marked down, /ready 503, every decision spooled until the
        next probe, the request 503 -- while the database answered everything else; PostgreSQL's reached the
        API as a 500 with a traceback. It is :class:`DamagedRowError` (409) for this request alone, counted
        under "database read" and logged. So is a row the driver cannot convert (a ``ValueError`` /
        ``TypeError`` out of SQLAlchemy's processing of a result: SQLite's ``created_at`` holding
        "yesterday"), which reached the API as a 500: the database answered, one row is not what the
        platform writes."""
        if not self._up:
            raise DatabaseUnavailable(self._last_error or "down", self.probe_interval_s * 2)
        try:
            return self._reads.run(call, self.read_timeout_s)
        except Exception as exc:
            if is_data_error(exc) or isinstance(exc, ValueError | TypeError | OverflowError):
                why = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
                metrics.DAMAGED_ROWS.labels(reader="database read").inc()
                log.warning("a read failed on what the database holds (%s); the database is up", why)
                raise DamagedRowError(
                    f"the database cannot read what it holds for this request ({why}): a stored row holds "
                    "what the platform never writes (a hand edit or an older version)"
                ) from exc
            if is_record_error(exc):
                raise
            self._mark_down(exc)
            raise DatabaseUnavailable(_describe(exc)) from exc

    # --- outcomes
    def record_outcome(self, decision_id: int, outcome: str, reward: float) -> OutcomeResult:
        """Record an outcome: spooled behind its decision if that is still in the spool, else stored.

        The same rules either way: the first outcome wins, the same one again is idempotent, a different
        one is a conflict. A decision not in the spool needs the database (:class:`DatabaseUnavailable`),
        and so does one only another process's spool holds yet.
        """
        spooled = self.spool.outcome_for(decision_id)
        if spooled is not None:
            return _against(spooled, outcome)
        if self.spool.holds_decision(decision_id):
            record = SpooledOutcome(decision_id, outcome, reward, datetime.now(UTC))
            with self._spool_lock:
                again = self.spool.outcome_for(decision_id)  # a concurrent request spooled one first
                if again is not None:
                    return _against(again, outcome)
                try:
                    self._append([SpoolRecord(OUTCOME, outcome=record)])
                except OSError as exc:  # the API answers 503: nothing acknowledged
                    metrics.SPOOL_ERRORS.labels(kind=OUTCOME).inc()
                    if isinstance(exc, SpoolTimeout):
                        metrics.SPOOL_TIMEOUTS.labels(kind=OUTCOME).inc()
                    raise
            metrics.SPOOL_APPENDED.labels(kind=OUTCOME).inc()
            self._set_gauges()
            return OutcomeResult(OutcomeStatus.CREATED, outcome, reward, record.received_at)
        result = self.query(lambda: self.repository.record_outcome(decision_id, outcome, reward))
        if result.status is OutcomeStatus.NOT_FOUND and self.spool.find_elsewhere(decision_id) is not None:
            # Spooled here, it could replay before its decision and be quarantined: the caller retries.
            raise DatabaseUnavailable(
                f"decision {decision_id} is in another process's spool, not in the database yet", 1.0
            )
        return result

    # --- the writer thread
    def _run(self, lane: _Lane, primary: bool) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=self._idle_wait() if primary else None)
            except queue.Empty:
                first = _IDLE
            if first is None:
                break
            batch = [] if first is _IDLE else [first]
            rows = sum(len(item.rows) for item in batch)
            while batch and rows < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                rows += len(item.rows)
            if batch:
                try:
                    self._store(batch, lane)
                except Exception as exc:
                    self._fail(batch, exc)
            if not primary:
                continue
            try:
                self._background_step()
            except Exception as exc:  # never let the writer thread die: decisions depend on it
                log.exception("spool replay step failed; retrying after a pause")
                self._mark_down(exc)  # backs off like an outage instead of spinning on the failure

    def _idle_wait(self) -> float | None:
        """How long the writer may sleep waiting for decisions before it has background work to do."""
        if self._up:
            paused = self._replay_after - time.monotonic()
            return (0.0 if paused <= 0 else min(paused, 1.0)) if self.spool.has_work() else 1.0
        if self._probing is not None:
            return 0.02  # look again soon: the probe may answer any moment
        return max(0.0, self._next_probe - time.monotonic())

    def _store(self, batch: list[_Handover], lane: _Lane) -> None:
        """Store the rows of these hand-overs in one transaction (or the spool), then answer each one."""
        fresh: list[tuple[DecisionRow, _Handover, int]] = []
        #: Event id -> where its first copy in this batch is; and the later copies of each.
        seen: dict[str, tuple[_Handover, int]] = {}
        copies: list[tuple[str, _Handover, int]] = []
        others = self.spool.others_hold_events()  # once a batch: no file look-ups when none is spooled
        #: How long the batch may wait for the first tries of its events still being spooled.
        deadline = time.monotonic() + self.spool_timeout_s
        for item in batch:
            for i, row in enumerate(item.rows):
                event_id = row.get("event_id")
                if event_id and event_id in seen:  # a retry racing its first try into this batch
                    item.statuses[i] = DUPLICATE
                    copies.append((event_id, item, i))
                    continue
                try:
                    spooled = (
                        self.spool.decision_for_event(event_id, others, deadline - time.monotonic())
                        if event_id
                        else None
                    )
                except SpoolTimeout as exc:  # its first try is still waiting for the disk: not durable
                    item.statuses[i] = exc
                    metrics.SPOOL_TIMEOUTS.labels(kind=DECISION).inc()
                    continue
                if spooled is not None:
                    item.statuses[i] = DUPLICATE  # a retry of an event whose decision is spooled
                    continue
                if event_id:
                    seen[event_id] = (item, i)
                fresh.append((row, item, i))
        if fresh:
            self._store_fresh(fresh, lane)
        for event_id, item, i in copies:
            first, k = seen[event_id]
            if isinstance(first.statuses[k], BaseException):
                # Its first copy is durable nowhere: a duplicate of it would be acknowledged as a decision
                # that does not exist (with the database up, the engine answered the copy's own record).
                item.statuses[i] = first.statuses[k]
        for item in batch:
            item.resolve()

    def _fail(self, batch: list[_Handover], exc: Exception) -> None:
        """Answer a batch that could not be stored with its error (503), keeping the writer thread alive.

        ``_store`` reads the spool directory for every batch with an event id, the database healthy or
        not; an error there (the disk failing, ``events/`` not a directory) killed this thread, and every
        request after it waited its full timeout for a 503, for good."""
        log.error("storing a batch of %d hand-overs failed: %r", len(batch), exc)
        metrics.SPOOL_ERRORS.labels(kind=DECISION).inc(sum(len(item.rows) for item in batch))
        for item in batch:
            if not item.future.done():
                item.statuses = [exc] * len(item.rows)
                item.resolve()

    def _store_fresh(self, fresh: list[tuple[DecisionRow, _Handover, int]], lane: _Lane) -> None:
        rows = [row for row, _, _ in fresh]
        if self._up:
            try:
                inserted = self._insert(rows, lane)
            except Exception as exc:
                metrics.DB_ERRORS.labels(operation="insert_decisions").inc()
                if is_record_error(exc):
                    # One of these rows is refused: keep them all durable; replay isolates the bad one.
                    log.warning("the database refused a batch of %d decisions (%s); spooled", len(rows), exc)
                else:
                    self._mark_down(exc)
            else:
                metrics.DB_BATCH_SIZE.observe(len(rows))
                taken = self._ids_taken([row["id"] for row in rows if row["id"] not in inserted], lane)
                for row, item, i in fresh:
                    if row["id"] in taken:
                        item.statuses[i] = taken[row["id"]]
                    else:
                        item.statuses[i] = STORED if row["id"] in inserted else DUPLICATE
                return
        self._spool(fresh)

    def _ids_taken(self, skipped: list[int], lane: _Lane) -> dict[int, Exception]:
        """The error of each new decision the database skipped because another decision holds its id.

        A new decision's id is fresh from this process, so a stored one under it is another process's (two
        processes drew the same node id, core/ids.py; or a restart after the clock went back): the row was
        answered "duplicate" -- acknowledged, never stored, and its outcome would land on the other decision.
        Such a row is not acknowledged (503: the client's retry is decided under a new id). Rows skipped for
        their event (a retry) are duplicates as before; if the database cannot say which is which, none of
        the skipped rows is acknowledged."""
        if not skipped:
            return {}
        try:
            stored = lane.run(lambda: self.repository.existing_ids(skipped), self.write_timeout_s)
        except Exception as exc:
            log.warning("could not tell %d skipped decisions from retries: %r", len(skipped), exc)
            return {i: DatabaseUnavailable(f"decision {i} not confirmed stored; retry") for i in skipped}
        if stored:
            metrics.DB_ERRORS.labels(operation="decision_id_taken").inc(len(stored))
            log.error("decision ids %s are taken by other decisions (a node id drawn twice?)", sorted(stored))
        return {
            i: DatabaseUnavailable(f"decision id {i} is taken by another decision; retry") for i in stored
        }

    def _append(self, records: list[SpoolRecord]) -> set[int]:
        """``Spool.append`` within ``spool_timeout_s`` (SpoolTimeout past it: nothing acknowledged)."""
        return self._disk.run(lambda: self.spool.append(records), self.spool_timeout_s)

    def _insert(self, rows: list[DecisionRow], lane: _Lane | None = None) -> set[int]:
        insert = lambda: self.repository.insert_decisions(rows)  # noqa: E731
        return (lane or self._writes).run(insert, self.write_timeout_s)

    def _spool(self, batch: list[tuple[DecisionRow, _Handover, int]]) -> None:
        try:
            with self._spool_lock:
                # Skipped: another process spooled a decision of the same event (a retry that reached
                # another --workers process during the outage); that first decision is the answer.
                skipped = self._append([SpoolRecord(DECISION, decision=row) for row, _, _ in batch])
        except Exception as exc:  # nowhere durable to put them: the callers must not acknowledge
            log.error("cannot spool %d decisions: %s", len(batch), exc)
            metrics.SPOOL_ERRORS.labels(kind=DECISION).inc(len(batch))
            if isinstance(exc, SpoolTimeout):
                metrics.SPOOL_TIMEOUTS.labels(kind=DECISION).inc(len(batch))
            for _, item, i in batch:
                item.statuses[i] = exc
            return
        spooled = len(batch) - len(skipped)
        metrics.DECISIONS_SPOOLED.inc(spooled)
        metrics.SPOOL_APPENDED.labels(kind=DECISION).inc(spooled)
        self._set_gauges()
        for k, (_, item, i) in enumerate(batch):
            item.statuses[i] = DUPLICATE if k in skipped else SPOOLED

    # --- health
    def _mark_down(self, exc: BaseException) -> None:
        with self._state_lock:
            reason = _describe(exc)
            if self._up:
                log.warning("database unavailable (%s): spooling until it answers", reason)
            self._up = False
            self._last_error = reason
            self._next_probe = time.monotonic() + self.probe_interval_s
        self._set_gauges()

    def _probe(self) -> None:
        """Start one call to see whether the database is back (and to migrate it, the first time), or
        collect the answer of the one in flight. Never blocks the writer thread."""
        if self._probing is None:
            if time.monotonic() < self._next_probe:
                return
            try:
                self._probing = self._writes.submit(self._on_recover or self._ping_in_time)
            except DatabaseUnavailable as exc:  # an earlier call is still stuck: the database is not back
                self._probe_failed(exc)
                return
        if not self._probing.done():
            return
        probing, self._probing = self._probing, None
        error = probing.exception()
        if error is not None:
            self._probe_failed(error)
            return
        self._on_recover = None
        with self._state_lock:
            self._up, self._last_error, self._backoff = True, None, self.probe_interval_s
        log.info("database answers again; replaying %d spooled records", self.spool.pending())
        self._set_gauges()

    def _ping_in_time(self) -> None:
        """The probe of a down database: it must answer within the write deadline. A database that answers
        every call, but later than that (overloaded, a slow link), was marked up by each slow ping, and the
        next batch then waited the whole deadline before being spooled -- again after every probe: /decide
        paid the deadline over and over and /ready flapped for as long as the database was slow."""
        started = time.monotonic()
        self.repository.ping()
        took = time.monotonic() - started
        if took > self.write_timeout_s:
            raise DatabaseUnavailable(
                f"answers, but in {took:.1f} s: over the {self.write_timeout_s:g} s to write"
            )

    def _probe_failed(self, exc: BaseException) -> None:
        with self._state_lock:
            self._last_error = _describe(exc)
            self._backoff = min(self._backoff * 2, MAX_PROBE_INTERVAL_S)
            self._next_probe = time.monotonic() + self._backoff

    def _background_step(self) -> None:
        if not self._up:
            self._probe()
            return
        if time.monotonic() < self._replay_after:
            return
        self.spool.adopt_orphans(min_interval_s=5.0)
        chunk = self.spool.next_chunk(self.replay_chunk)
        if chunk is not None:
            self._replay(chunk)

    # --- replay
    def _replay(self, chunk: ReplayChunk) -> None:
        """Apply one chunk in order; on an outage stop (the chunk is replayed again later, idempotently).

        A record the spool cannot quarantine (its disk full) pauses the replay only: taken for an outage,
        it marked the healthy database down again after every probe, and live decisions went to the spool
        -- the full one: 503s with the database answering."""
        try:
            for text in chunk.unreadable:
                self._quarantine(text, "unreadable spool line", "unreadable")
            run: list[SpoolRecord] = []
            for record in chunk.records:
                if record.kind == DECISION:
                    run.append(record)
                    continue
                self._replay_decisions(run)
                run = []
                self._replay_outcome(record)
            self._replay_decisions(run)
        except _QuarantineFailed as exc:
            log.error("replay paused for %s s: %s", QUARANTINE_RETRY_S, exc)
            self._replay_after = time.monotonic() + QUARANTINE_RETRY_S
            return
        except Exception as exc:  # record errors are isolated below: what reaches here is an outage
            metrics.DB_ERRORS.labels(operation="replay").inc()
            self._mark_down(exc)
            return
        self.spool.consume(chunk)
        metrics.SPOOL_REPLAYED.inc(len(chunk.records))
        self._set_gauges()
        if not self.spool.has_work():
            log.info("spool replayed: every acknowledged record is in the database")

    def _replay_decisions(self, records: list[SpoolRecord]) -> None:
        if not records:
            return
        rows = [r.decision for r in records if r.decision is not None]
        try:
            inserted = self._insert(rows)
        except Exception as exc:
            if not is_record_error(exc):
                raise
            if len(records) == 1:
                self._quarantine(records[0], f"{exc.__class__.__name__}: {exc}", DECISION)
                return
            middle = len(records) // 2
            self._replay_decisions(records[:middle])
            self._replay_decisions(records[middle:])
            return
        skipped = [row for row in rows if row["id"] not in inserted]
        if skipped:
            self._check_skipped(skipped)

    def _check_skipped(self, rows: list[DecisionRow]) -> None:
        """Rows not inserted are already stored (an earlier, interrupted replay) -- or their event was
        decided under another id by a process that did not know about this spool, or another process's
        decision took their id (a node id drawn twice, core/ids.py; taken for this row, it was deleted with
        its segment): keep those, quarantined."""
        owners = self._writes.run(
            lambda: self.repository.stored_owners([row["id"] for row in rows]), self.write_timeout_s
        )
        for row in rows:
            owner = owners.get(row["id"])
            mine = (row.get("entity_id"), row.get("event_id"), _instant(row.get("created_at")))
            if owner is None:
                error = f"event {row.get('event_id')!r} was already decided under another id"
            elif (owner[0], owner[1], _instant(owner[2])) != mine:
                error = f"decision id {row['id']} is taken by another decision (entity {owner[0]!r})"
            else:
                continue  # this very decision, stored by an earlier replay
            self._quarantine(SpoolRecord(DECISION, decision=row), error, DECISION)

    def _replay_outcome(self, record: SpoolRecord) -> None:
        outcome = record.outcome
        assert outcome is not None
        try:
            result = self._writes.run(
                lambda: self.repository.record_outcome(
                    outcome.decision_id, outcome.outcome, outcome.reward, outcome.received_at
                ),
                self.write_timeout_s,
            )
        except Exception as exc:
            if not is_record_error(exc):
                raise
            self._quarantine(record, f"{exc.__class__.__name__}: {exc}", OUTCOME)
            return
        if result.status is OutcomeStatus.NOT_FOUND:
            self._quarantine(record, "its decision is not in the database (quarantined?)", OUTCOME)
        elif result.status is OutcomeStatus.CONFLICT:
            self._quarantine(record, f"the decision already has outcome {result.outcome!r}", OUTCOME)

    def _quarantine(self, record: SpoolRecord | str, error: str, kind: str) -> None:
        if isinstance(record, SpoolRecord):
            payload: dict[str, Any] | str = json.loads(record.to_line())
            what = f"{record.kind} {record.decision_id}"
        else:
            payload, what = record, "an unreadable line"
        try:
            self._disk.run(lambda: self.spool.quarantine(payload, error), self.spool_timeout_s)
        except OSError as exc:
            metrics.SPOOL_ERRORS.labels(kind=DECISION if kind == "unreadable" else kind).inc()
            raise _QuarantineFailed(f"cannot quarantine {what} ({error}): {exc}") from exc
        metrics.SPOOL_QUARANTINED.labels(kind=kind).inc()
        log.error("quarantined %s: the database refuses it (%s); see %s", what, error, self.spool.directory)

    def _set_gauges(self) -> None:
        metrics.DATABASE_UP.set(1 if self._up else 0)
        metrics.SPOOL_PENDING.set(self.spool.pending())


_IDLE: Any = object()


def _against(spooled: SpooledOutcome, outcome: str) -> OutcomeResult:
    status = OutcomeStatus.DUPLICATE if spooled.outcome == outcome else OutcomeStatus.CONFLICT
    return OutcomeResult(status, spooled.outcome, spooled.reward, spooled.received_at)


def _instant(value: object) -> object:
    """A time as an instant (a naive one read as UTC), for comparing a spooled row's with the stored one."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DatabaseUnavailable) else exc.__class__.__name__
