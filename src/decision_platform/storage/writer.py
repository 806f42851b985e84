"""Group commit with a durable spool: how a decision is acknowledged without being lost.

Single-row commits cap PostgreSQL at ~2.6k rows/s on these machines; batches of a few hundred reach
~24-60k. So concurrent requests hand their rows to one writer thread that inserts whatever has queued
up in one transaction, and each request waits for *its* batch to be durable before answering.

If the database is unreachable, the batch is appended to a local spool file and fsynced instead: the
decision is still acknowledged and durable, and the spool is replayed (idempotently, by id) as soon as
the database answers again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import uuid
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path

from decision_platform.observability import metrics
from decision_platform.storage.repository import DecisionRow, Repository

log = logging.getLogger(__name__)

STORED = "stored"
SPOOLED = "spooled"
DUPLICATE = "duplicate"  # a decision for this event (or id) was already stored; nothing was written


class DecisionSpool:
    """Append-only JSON-lines files of decisions not yet in the database.

    Each process appends to its own file (``decisions-<pid>.jsonl``), so several API workers sharing the
    directory never interleave or delete each other's lines. Replay claims a file by renaming it first
    (atomic), then inserts its rows (idempotently, by id) and deletes it; a crash in between leaves a
    claimed file that the next replay picks up again.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"decisions-{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    def append(self, rows: list[DecisionRow]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(_to_json(row)) + "\n" for row in rows)
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def pending(self) -> bool:
        return self.directory.is_dir() and any(self.directory.glob("decisions-*.jsonl*"))

    def replay(self, repository: Repository) -> int:
        """Move every spooled decision (any process's) into the database; returns how many."""
        replayed = 0
        with self._lock:
            for path in sorted(self.directory.glob("decisions-*.jsonl")):
                # A unique name: an earlier claimed file whose replay failed must not be overwritten.
                claimed = path.with_name(f"{path.name}.replaying-{uuid.uuid4().hex}")
                try:
                    path.rename(claimed)
                except FileNotFoundError:  # another process claimed it first
                    continue
            # Ours, and any left by a process that died while replaying (inserts are idempotent, so a
            # file two processes replay at once is harmless).
            for claimed in sorted(self.directory.glob("decisions-*.jsonl.replaying-*")):
                try:
                    lines = claimed.read_text("utf-8").splitlines()
                except FileNotFoundError:
                    continue
                rows = [_from_json(json.loads(line)) for line in lines if line]
                repository.insert_decisions(rows)  # idempotent: known ids are skipped
                claimed.unlink(missing_ok=True)
                replayed += len(rows)
        if replayed:
            log.info("replayed %d spooled decisions", replayed)
        return replayed


def _to_json(row: DecisionRow) -> dict:
    out = dict(row)
    out["created_at"] = row["created_at"].isoformat()
    return out


def _from_json(row: dict) -> DecisionRow:
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


class DecisionWriter:
    """A background thread that stores decisions in batches; ``write`` returns once durable."""

    def __init__(self, repository: Repository, spool: DecisionSpool, batch_size: int = 256) -> None:
        self.repository = repository
        self.spool = spool
        self.batch_size = batch_size
        self._queue: queue.Queue[tuple[DecisionRow, Future[str]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="decision-writer", daemon=True)
        self._thread.start()

    def submit(self, row: DecisionRow) -> Future[str]:
        future: Future[str] = Future()
        self._queue.put((row, future))
        return future

    def write(self, row: DecisionRow, timeout: float = 30.0) -> str:
        """Store one decision; returns ``stored``, ``spooled`` or ``duplicate`` once it is durable."""
        return self.submit(row).result(timeout=timeout)

    def write_many(self, rows: list[DecisionRow], timeout: float = 60.0) -> list[str]:
        """Store several decisions (they share group commits); one result per row, in order."""
        futures = [self.submit(row) for row in rows]
        return [future.result(timeout=timeout) for future in futures]

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._flush(batch)

    def _flush(self, batch: list[tuple[DecisionRow, Future[str]]]) -> None:
        rows = [row for row, _ in batch]
        try:
            if self.spool.pending():
                self.spool.replay(self.repository)
            inserted = self.repository.insert_decisions(rows)
            metrics.DB_BATCH_SIZE.observe(len(rows))
        except Exception as exc:  # database down or failing: keep the decisions durable locally
            log.warning(
                "database write failed (%s); spooling %d decisions", exc.__class__.__name__, len(rows)
            )
            metrics.DB_ERRORS.labels(operation="insert_decisions").inc()
            try:
                self.spool.append(rows)
                metrics.DECISIONS_SPOOLED.inc(len(rows))
            except Exception as spool_exc:  # nowhere durable to put it: the caller must not acknowledge
                for _, future in batch:
                    future.set_exception(spool_exc)
                return
            for _, future in batch:
                future.set_result(SPOOLED)
            return
        for row, future in batch:
            future.set_result(STORED if row["id"] in inserted else DUPLICATE)
