"""The durable spool: decisions and outcomes acknowledged while the database could not take them.

Layout of ``spool_dir``::

    segment-<pid>-<ns>.jsonl    append-only JSON lines, one record each, fsynced before acknowledging
    quarantine.jsonl            records the database refused for good (never replayed automatically)
    events/<hash>.json          which spooled decision holds an event (shared by the processes)

Why it looks like this (each point was a measured failure of the earlier one-file-per-batch spool):

- One open segment per process, appended to and fsynced: the cost of a write does not grow with the
  length of an outage (no directory scans, no file per batch). Segments rotate at a size bound.
- A process holds an exclusive ``flock`` on every segment it owns, so several API workers can share the
  directory, and the segments of a process that died (SIGKILL, power cut) are adopted by the next one
  that looks: the lock vanished with the process.
- An in-memory index (decision id -> file offset, event id -> decision id, decision id -> spooled outcome)
  answers "is this decision / event / outcome already here?" without reading files: a retried event gets
  its first decision's id, and a spooled decision can be read back (``GET /decisions/{id}``) before the
  database has it. The index is rebuilt from the segments at start-up.
- Replay reads a segment in order, a chunk at a time, through a cursor: the writer inserts a chunk,
  then calls :meth:`Spool.consume`, and a fully replayed segment is deleted.
- One decision per event across processes: the API's ``--workers`` share the directory, and a retried
  event may reach another process than its first try while the database is away. A spooled decision
  with an event id claims it in ``events/`` (a complete file linked into place: atomic, first one wins);
  another process that would spool the same event finds the claim and answers with the claimed decision,
  read from the claimant's segment. A claim is released when its decision is replayed; one left behind
  by a crash is recognised as stale (its segment is gone, or it does not hold the decision and no live
  process owns the segment) and taken over.

- The index has its own lock, never held across disk I/O; appends are serialised by another one. A disk
  that hangs (an fsync that does not return) holds up only the append in flight and the next appends: the
  index is read by every batch of the writer, by ``/ready`` and ``GET /decisions/{id}``, and a lock held
  across the fsync froze all of them behind the disk. The writer gives an append a deadline (the append
  runs on a thread of its own, storage/writer.py); the events of an append still in flight are known
  (``decision_for_event`` waits for them, then raises :class:`SpoolTimeout`), so no retry is ever
  answered with a decision whose fsync has not returned -- it read as another process's live claim.

The spool only stores; what is replayed when, and how refused records are isolated, is the writer's
business (storage/writer.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

from decision_platform.core.ids import NODE_BITS
from decision_platform.core.records import DecisionRecord

log = logging.getLogger(__name__)

DECISION: Literal["decision"] = "decision"
OUTCOME: Literal["outcome"] = "outcome"
RecordKind = Literal["decision", "outcome"]

#: Segment files, and the names earlier versions of the spool used (adopted and replayed the same way).
_SEGMENT_PATTERNS = ("segment-*.jsonl", "decisions-*.jsonl", "decisions-*.jsonl.replaying-*")
QUARANTINE_FILE = "quarantine.jsonl"
CLAIMS_DIR = "events"
#: Where the processes sharing this spool claim their decision-id node numbers (core/ids.py), a lock each.
NODES_DIR = "nodes"
#: How long a read of another process's claimed decision waits for its append to reach the disk.
FOREIGN_READ_WAIT_S = 0.5


class SpoolTimeout(TimeoutError):
    """The spool's disk did not make a record durable in time (an append, or the first try of an event,
    still waiting for its fsync): nothing is acknowledged, the caller answers 503 and the client retries."""


@dataclass(frozen=True)
class SpooledOutcome:
    decision_id: int
    outcome: str
    reward: float
    received_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "outcome": self.outcome,
            "reward": self.reward,
            "received_at": self.received_at.isoformat(),
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SpooledOutcome:
        return cls(
            int(body["decision_id"]),
            str(body["outcome"]),
            float(body["reward"]),
            datetime.fromisoformat(body["received_at"]),
        )


@dataclass(frozen=True)
class SpoolRecord:
    """One spooled record: a decision row (the columns of ``tables.decisions``) or an outcome."""

    kind: RecordKind
    decision: dict[str, Any] | None = None
    outcome: SpooledOutcome | None = None

    @property
    def decision_id(self) -> int:
        if self.outcome is not None:
            return self.outcome.decision_id
        assert self.decision is not None
        return int(self.decision["id"])

    @property
    def event_id(self) -> str | None:
        """The event a decision was made for (None: an outcome, or a decision without an event)."""
        if self.decision is None or not self.decision.get("event_id"):
            return None
        return str(self.decision["event_id"])

    def to_line(self) -> str:
        if self.kind == OUTCOME:
            assert self.outcome is not None
            body: dict[str, Any] = {"kind": OUTCOME, "outcome": self.outcome.to_json()}
        else:
            assert self.decision is not None
            row = dict(self.decision)
            row["created_at"] = row["created_at"].isoformat()
            body = {"kind": DECISION, "row": row}
        # Standard json, not orjson: it writes any Python int and escapes lone surrogates, so even a record
        # the database will refuse is kept intact, to be quarantined rather than lost.
        return json.dumps(body, separators=(",", ":")) + "\n"

    @classmethod
    def from_line(cls, line: str) -> SpoolRecord:
        """The record a spool line holds; ValueError for a line that holds none (a damaged disk, a hand
        edit): its reader quarantines it as text and goes on with the others."""
        body = json.loads(line)
        if not isinstance(body, dict):
            raise ValueError("a spool line is a JSON object")
        kind = body.get("kind")
        if kind == OUTCOME:
            outcome = body.get("outcome")
            if not isinstance(outcome, dict):
                raise ValueError("an outcome record without its outcome")
            try:
                return cls(OUTCOME, outcome=SpooledOutcome.from_json(outcome))
            except (KeyError, TypeError) as exc:
                raise ValueError(f"an outcome record of the wrong shape: {exc!r}") from exc
        if kind not in (DECISION, None):
            raise ValueError(f"unknown spool record kind {kind!r}")
        row = body.get("row") if kind == DECISION else body  # earlier versions: the bare row
        # What the index and the replay read of a row; a bool is no id although Python counts it an int.
        if not isinstance(row, dict) or type(row.get("id")) is not int:
            raise ValueError("a decision record needs a row with an integer id")
        if not isinstance(row.get("created_at"), str):
            raise ValueError("a decision record needs a created_at time")
        row["created_at"] = datetime.fromisoformat(row["created_at"])
        return cls(DECISION, decision=row)


@dataclass(frozen=True)
class QuarantineEntry:
    """A record the database refused, with when and why."""

    quarantined_at: str
    error: str
    record: dict[str, Any] | str  # the spool line as JSON, or the raw text of a line that did not parse
    decision_id: int | None

    def to_line(self) -> str:
        body = {"quarantined_at": self.quarantined_at, "error": self.error, "record": self.record}
        return json.dumps(body, default=str, separators=(",", ":")) + "\n"

    @classmethod
    def from_line(cls, line: str) -> QuarantineEntry:
        """ValueError for a line that is not an entry."""
        body = json.loads(line)
        if not isinstance(body, dict) or not isinstance(body.get("record"), dict | str):
            raise ValueError("a quarantine line is a JSON object with a record")
        record = body["record"]
        decision_id = None
        if isinstance(record, dict):
            try:
                decision_id = SpoolRecord.from_line(json.dumps(record)).decision_id
            except ValueError:
                record = json.dumps(record)  # not a record the spool can replay: requeue leaves it here
        return cls(str(body.get("quarantined_at", "")), str(body.get("error", "")), record, decision_id)


@dataclass
class _Segment:
    path: Path
    handle: Any  # the open file (binary, append), which also holds the flock
    size: int
    #: Where replay has got to: bytes before it are in the database.
    cursor: int = 0
    open_for_append: bool = True


@dataclass(frozen=True)
class _Location:
    segment: Path
    offset: int
    length: int


@dataclass(frozen=True)
class ReplayChunk:
    """Records read from one segment, and where the segment's cursor goes once they are in the database."""

    segment: Path
    records: list[SpoolRecord]
    end: int
    #: Lines that could not be parsed (a torn write from a crash is not counted: it was never acknowledged).
    unreadable: list[str] = field(default_factory=list)


class Spool:
    """Append-only segments of not-yet-stored records, with an index of what they hold. Thread-safe."""

    def __init__(self, directory: Path, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        #: Guards the index and the segment list; never held across disk I/O of an append.
        self._lock = threading.RLock()
        #: Notified when an append ends (durable or not): who waits for an event in flight looks again.
        self._settled = threading.Condition(self._lock)
        #: Serialises appends (each goes at the end of the open segment); held across the write and fsync.
        self._append_lock = threading.Lock()
        #: Serialises writes of the quarantine file.
        self._quarantine_lock = threading.Lock()
        #: Events of the append in flight (claimed, not yet durable) -> their decision; and its segment.
        self._inflight: dict[str, int] = {}
        self._appending_to: _Segment | None = None
        self._segments: list[_Segment] = []  # oldest first; the last one may be open for appends
        self._decisions: dict[int, _Location] = {}
        self._events: dict[str, int] = {}
        self._outcomes: dict[int, SpooledOutcome] = {}
        #: Decisions of other processes this one answered a retried event with: where to read them.
        self._foreign: dict[int, _Location] = {}
        self._claims = self.directory / CLAIMS_DIR
        #: Files named like segments that are none (warned about once each).
        self._foreign_files: set[Path] = set()
        self._counter = 0
        self._last_adopt = 0.0
        #: The lock file of the node number this process claimed (claim_node_id), held until close.
        self._node: BinaryIO | None = None
        self.adopt_orphans()

    # --- what is here
    def pending(self) -> int:
        """Records waiting for the database (decisions and outcomes)."""
        with self._lock:
            return len(self._decisions) + len(self._outcomes)

    def has_work(self) -> bool:
        with self._lock:
            return any(s.cursor < s.size for s in self._segments)

    def decision_for_event(self, event_id: str, others: bool = True, wait_s: float = 0.0) -> int | None:
        """The spooled decision of an event: this process's, or (``others``) one another process claimed.

        An event whose decision this process is appending right now (claimed, fsync not returned) is waited
        for up to ``wait_s``; still in flight then, :class:`SpoolTimeout`. Its claim is not an answer: the
        append may still fail, and the decision is not durable before its fsync returns."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while event_id in self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SpoolTimeout(f"the first decision of {event_id!r} is not durable yet")
                self._settled.wait(left)
            own = self._events.get(event_id)
        if own is not None or not others:
            return own
        claim = _read_claim(self._claim_path(event_id))
        if claim is None or not claim.is_live():
            return None
        with self._lock:
            self._foreign[claim.decision_id] = claim.location
        return claim.decision_id

    def others_hold_events(self) -> bool:
        """Whether any process's spool claims an event now (one directory read: asked once a batch, so
        that a healthy write path pays no file look-up per event)."""
        try:
            with os.scandir(self._claims) as entries:
                return next(entries, None) is not None
        except FileNotFoundError:
            return False

    def outcome_for(self, decision_id: int) -> SpooledOutcome | None:
        with self._lock:
            return self._outcomes.get(decision_id)

    def holds_decision(self, decision_id: int) -> bool:
        with self._lock:
            return decision_id in self._decisions

    def get_decision(self, decision_id: int) -> DecisionRecord | None:
        """A spooled decision, read back from its segment (None if not spooled, or replayed meanwhile)."""
        with self._lock:
            own = self._decisions.get(decision_id)
            location = own or self._foreign.get(decision_id)
        if location is None:
            return None
        # Another process's decision may still be on its way to the disk (claimed, not yet fsynced).
        row = _read_decision(location, wait_s=0.0 if own else FOREIGN_READ_WAIT_S)
        return DecisionRecord.from_row(row) if row is not None else None

    def find_elsewhere(self, decision_id: int) -> DecisionRecord | None:
        """A decision in a segment of another process sharing this directory, not replayed yet (None if no
        segment holds it). Asked only when the database does not have it: with ``--workers`` a decision's
        outcome or read may reach another process than the one that spooled it, and "no decision" was
        answered for an acknowledged one. A search of the files (with no outage there are none to search)."""
        with self._lock:
            owned = {s.path for s in self._segments}
        for path in sorted(self._candidates()):
            # Not a regular file (a pipe named like a segment would block the open): left alone, as ever.
            row = None if path in owned or not path.is_file() else _search_decision(path, decision_id)
            if row is not None:
                return DecisionRecord.from_row(row)
        return None

    # --- writing
    def append(self, records: list[SpoolRecord]) -> set[int]:
        """Append records durably (fsync) and index them; raises OSError when the disk cannot take them.

        Returns the positions of decisions *not* appended: their event is claimed by a decision another
        process (or writer thread) spooled first (:meth:`decision_for_event` names it).

        Only ``_append_lock`` is held across the disk I/O; the index is updated under ``_lock`` once the
        fsync has returned, so readers never wait for the disk, and never see a record before it is durable.
        """
        if not records:
            return set()
        with self._append_lock:
            segment = self._writable_segment()
            offset = segment.size
            kept: list[tuple[SpoolRecord, bytes, _Location]] = []
            claimed: list[tuple[str, int]] = []
            #: The events this append put in flight (see decision_for_event).
            mine: list[tuple[str, int]] = []
            skipped: set[int] = set()
            try:
                for i, record in enumerate(records):
                    line = record.to_line().encode("utf-8")
                    location = _Location(segment.path, offset, len(line))
                    event_id = record.event_id
                    if event_id is not None:
                        with self._lock:
                            own = self._events.get(event_id)
                            fresh = own is None and event_id not in self._inflight
                            if fresh:  # in flight before its claim exists (see decision_for_event)
                                self._inflight[event_id] = record.decision_id
                                mine.append((event_id, record.decision_id))
                        if own is not None and own != record.decision_id:
                            skipped.add(i)  # another writer thread spooled this event's decision a moment ago
                            continue
                        if own is None:
                            if not fresh:
                                skipped.add(i)  # a copy of an event earlier in this append
                                continue
                            if not self._claim(event_id, record.decision_id, location):
                                skipped.add(i)
                                continue
                            claimed.append((event_id, record.decision_id))
                    kept.append((record, line, location))
                    offset += len(line)
                if kept:
                    _write_all(segment.handle.fileno(), b"".join(line for _, line, _ in kept))
                    os.fsync(segment.handle.fileno())
            except OSError:
                # Nothing of the batch is acknowledged: take back its part on disk and every claim it made
                # (a claim left behind points into this live segment, so it looks live: a retry of its
                # event was answered with a decision that was never durable, and stored nowhere).
                self._undo_append(segment)
                for event_id, decision_id in claimed:
                    self._release(event_id, decision_id)
                raise
            else:
                with self._lock:
                    for record, _, location in kept:
                        self._index(record, location)
                    segment.size = offset
            finally:
                self._settle(mine, segment)
        return skipped

    def _settle(self, events: list[tuple[str, int]], segment: _Segment) -> None:
        """An append is over (durable or not): its events are no longer in flight; wake who waits."""
        with self._lock:
            for event_id, decision_id in events:
                if self._inflight.get(event_id) == decision_id:
                    del self._inflight[event_id]
            self._appending_to = None
            self._retire_if_replayed(segment)
            self._settled.notify_all()

    def _retire_if_replayed(self, segment: _Segment) -> None:
        """Delete a segment closed for appends once everything in it is replayed (under ``_lock``); one an
        append is writing to is left for that append to finish (its records are not in the index yet)."""
        if segment is self._appending_to or segment.open_for_append or segment.cursor < segment.size:
            return
        if segment in self._segments:
            self._segments.remove(segment)
            segment.path.unlink(missing_ok=True)
            segment.handle.close()  # releases the lock

    def _undo_append(self, segment: _Segment) -> None:
        """Cut a failed append (a full disk, a file size limit, an I/O error) off the segment.

        The write may have put part of the batch on disk before it failed. Left there, the next append
        went after it while the index and the replay cursor counted from the old end: an acknowledged
        record was read back as another one, or never replayed and deleted with its segment, and records
        whose callers got a 503 were replayed. If the segment cannot be cut back, it takes no more
        appends (the next go to a fresh segment) and replay stops at its last acknowledged byte.
        """
        try:
            os.ftruncate(segment.handle.fileno(), segment.size)
        except OSError as exc:
            log.error("cannot cut a failed append off %s (%s); closing it for appends", segment.path, exc)
            with self._lock:
                segment.open_for_append = False

    # --- event claims shared by the processes
    def _claim_path(self, event_id: str) -> Path:
        digest = hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        return self._claims / f"{digest}.json"

    def _claim(self, event_id: str, decision_id: int, location: _Location) -> bool:
        """Claim the event for this decision; False if a live claim of another decision holds it."""
        path = self._claim_path(event_id)
        self._claims.mkdir(parents=True, exist_ok=True)
        staging = self._claims / f".{os.getpid()}-{threading.get_ident()}.tmp"
        body = _Claim(event_id, decision_id, location).to_json()
        staging.write_text(body, "utf-8")
        try:
            for _ in range(3):
                try:
                    os.link(staging, path)  # atomic and complete: no reader ever sees a half claim
                    return True
                except FileExistsError:
                    holder = _read_claim(path)
                    if holder is not None and holder.decision_id == decision_id:
                        return True
                    if holder is not None and holder.is_live():
                        return False
                    # Stale: its decision was replayed meanwhile, or its process died before the fsync.
                    path.unlink(missing_ok=True)
            return True  # claims keep vanishing under us: the database's unique index still holds
        finally:
            staging.unlink(missing_ok=True)

    def _release(self, event_id: str, decision_id: int) -> None:
        path = self._claim_path(event_id)
        holder = _read_claim(path)
        if holder is not None and holder.decision_id == decision_id:
            path.unlink(missing_ok=True)

    def _writable_segment(self) -> _Segment:
        """The segment the append (holding ``_append_lock``) writes to; opening a new one is disk I/O, done
        outside ``_lock``."""
        with self._lock:
            current = self._segments[-1] if self._segments else None
            if current is not None and current.open_for_append and current.size < self.segment_bytes:
                self._appending_to = current
                return current
            if current is not None:
                current.open_for_append = False
            self._counter += 1
            path = self.directory / f"segment-{os.getpid()}-{time.time_ns()}-{self._counter}.jsonl"
        self.directory.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a failed write must leave nothing behind in a buffer that a later flush would write.
        handle = open(path, "ab", buffering=0)  # noqa: SIM115 - held open (and locked) for the segment's life
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        segment = _Segment(path, handle, 0)
        with self._lock:
            self._segments.append(segment)
            self._appending_to = segment
        return segment

    def _index(self, record: SpoolRecord, location: _Location) -> None:
        if record.kind == OUTCOME:
            assert record.outcome is not None
            self._outcomes[record.outcome.decision_id] = record.outcome
            return
        assert record.decision is not None
        decision_id = int(record.decision["id"])
        self._decisions[decision_id] = location
        if record.decision.get("event_id"):
            self._events[str(record.decision["event_id"])] = decision_id

    def _unindex(self, record: SpoolRecord) -> None:
        if record.kind == OUTCOME:
            assert record.outcome is not None
            spooled = self._outcomes.get(record.outcome.decision_id)
            if spooled == record.outcome:
                del self._outcomes[record.outcome.decision_id]
            return
        assert record.decision is not None
        decision_id = int(record.decision["id"])
        self._decisions.pop(decision_id, None)
        event_id = record.event_id
        if event_id is not None and self._events.get(event_id) == decision_id:
            del self._events[event_id]
            self._release(event_id, decision_id)

    # --- replay
    def next_chunk(self, max_records: int) -> ReplayChunk | None:
        """The next records to replay, oldest first; None when everything is in the database."""
        with self._lock:
            for segment in self._segments:
                if segment.cursor < segment.size:
                    break
            else:
                return None
            if segment.open_for_append:
                segment.open_for_append = False  # new appends go to a fresh segment
            path, start, size = segment.path, segment.cursor, segment.size
        records: list[SpoolRecord] = []
        unreadable: list[str] = []
        with open(path, "rb") as handle:
            handle.seek(start)
            end = start
            while end < size and len(records) + len(unreadable) < max_records:
                raw = handle.readline()
                if not raw.endswith(b"\n"):  # a torn last line: its append never completed its fsync
                    end = size
                    break
                end += len(raw)
                text = raw.decode("utf-8", errors="replace")
                try:
                    records.append(SpoolRecord.from_line(text))
                except ValueError:
                    unreadable.append(text)
        return ReplayChunk(path, records, end, unreadable)

    def consume(self, chunk: ReplayChunk) -> None:
        """The chunk's records are in the database (or quarantined): forget them; delete a done segment."""
        with self._lock:
            for record in chunk.records:
                self._unindex(record)
            for segment in list(self._segments):
                if segment.path != chunk.segment:
                    continue
                segment.cursor = max(segment.cursor, chunk.end)
                self._retire_if_replayed(segment)

    def quarantine(self, payload: dict[str, Any] | str, error: str) -> None:
        """Keep a record the database refuses for good, with why, where an operator can find it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        line = QuarantineEntry(datetime.now().astimezone().isoformat(), error, payload, None).to_line()
        with self._quarantine_lock, open(self.directory / QUARANTINE_FILE, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def quarantined(self) -> int:
        path = self.directory / QUARANTINE_FILE
        if not path.exists():
            return 0
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)

    def quarantine_entries(self) -> list[QuarantineEntry]:
        """What the quarantine holds, oldest first."""
        path = self.directory / QUARANTINE_FILE
        if not path.exists():
            return []
        entries = []
        for line in path.read_text("utf-8", errors="replace").splitlines():
            try:
                entries.append(QuarantineEntry.from_line(line))
            except ValueError:  # a damaged line of the quarantine itself: kept, shown as it is
                entries.append(QuarantineEntry("", "unreadable quarantine line", line, None))
        return entries

    def requeue_quarantined(self) -> int:
        """Move quarantined records back into a segment, to be replayed again (after the cause was fixed,
        e.g. a constraint dropped). Lines that never parsed stay in quarantine. Returns how many moved."""
        with self._quarantine_lock:
            entries = self.quarantine_entries()
            movable = [e for e in entries if isinstance(e.record, dict)]
            if not movable:
                return 0
            self.append([SpoolRecord.from_line(json.dumps(e.record)) for e in movable])
            kept = [e for e in entries if not isinstance(e.record, dict)]
            path = self.directory / QUARANTINE_FILE
            staging = path.with_name(f".{QUARANTINE_FILE}.{os.getpid()}")
            staging.write_text("".join(e.to_line() for e in kept), "utf-8")
            staging.replace(path)
        return len(movable)

    # --- decision-id node numbers
    def claim_node_id(self, nodes: int = 1 << NODE_BITS) -> int:
        """A node number for this process's decision ids (core/ids.py) that no live process sharing this
        spool holds: a lock on ``nodes/<n>``, kept until :meth:`close` (a dead process's lock goes with it).

        Why: ids are unique only if node numbers are. Drawn at random, two of six processes on one host
        share one at 1.5% of starts (``serve --workers``, stream workers); their decisions in the same
        millisecond then have the same id, and the second was answered but never stored. Processes on other
        hosts do not share the spool: give them distinct ``DP_NODE_ID`` settings instead. If every number is
        taken or the directory takes no file, a random one, with a warning (the collision is then caught
        by the writer: a 503, never a decision acknowledged and lost)."""
        start = int.from_bytes(os.urandom(2), "big") % nodes
        directory = self.directory / NODES_DIR
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for k in range(nodes):
                n = (start + k) % nodes
                handle = open(directory / str(n), "ab")  # noqa: SIM115 - held open (and locked) until close
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                with self._lock:
                    if self._node is not None:
                        self._node.close()
                    self._node = handle
                return n
            log.warning("spool: every decision-id node number is held by a live process; one at random")
        except OSError as exc:
            log.warning("spool: cannot claim a decision-id node number (%s); one at random", exc)
        return start

    # --- other processes' segments
    def adopt_orphans(self, min_interval_s: float = 0.0) -> int:
        """Take over segments no live process holds (their owner died); returns how many were adopted."""
        now = time.monotonic()
        if now - self._last_adopt < min_interval_s or not self.directory.is_dir():
            return 0
        self._last_adopt = now
        adopted = 0
        with self._lock:
            owned = {s.path for s in self._segments}
            for path in sorted(self._candidates()):
                if path in owned:
                    continue
                handle = self._open_orphan(path)
                if handle is None:
                    continue
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a live process owns it
                    handle.close()
                    continue
                if not path.exists():  # replayed and deleted by its owner just before we locked it
                    handle.close()
                    continue
                segment = _Segment(path, handle, path.stat().st_size, open_for_append=False)
                # Adopted segments go first: they are older than anything this process appended.
                self._segments.insert(adopted, segment)
                self._index_segment(segment)
                adopted += 1
        if adopted:
            log.info("adopted %d spool segments (%d records pending)", adopted, self.pending())
        return adopted

    def _open_orphan(self, path: Path) -> BinaryIO | None:
        """``path`` opened to be adopted; None if it is gone or no segment file (a directory, a pipe, one
        this process may not write: something else's, named like a segment), which is left alone with one
        warning -- it made the start fail, or every replay step (the healthy database taken for down)."""
        try:
            if path.is_file():
                return open(path, "ab")  # held open (and locked) until replayed
            reason = "not a regular file"
        except FileNotFoundError:
            return None
        except OSError as exc:
            reason = exc.strerror or str(exc)
        if path not in self._foreign_files:
            self._foreign_files.add(path)
            log.warning("spool: %s is named like a segment but cannot be one (%s); left alone", path, reason)
        return None

    def _candidates(self) -> Iterator[Path]:
        for pattern in _SEGMENT_PATTERNS:
            yield from self.directory.glob(pattern)

    def _index_segment(self, segment: _Segment) -> None:
        offset = 0
        with open(segment.path, "rb") as handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break
                with contextlib.suppress(ValueError):  # replay quarantines it
                    record = SpoolRecord.from_line(raw.decode("utf-8"))
                    self._index(record, _Location(segment.path, offset, len(raw)))
                offset += len(raw)

    def close(self) -> None:
        """Release the segments (still on disk if not replayed: the next start adopts them)."""
        with self._lock:
            for segment in self._segments:
                # One an append is stuck in (a disk that hangs) stays open: its descriptor number, closed and
                # reused under the write, could take the rest of the write into another file.
                if segment is not self._appending_to:
                    segment.handle.close()
            self._segments.clear()
            self._decisions.clear()
            self._events.clear()
            self._outcomes.clear()
            if self._node is not None:
                self._node.close()
                self._node = None


@dataclass(frozen=True)
class _Claim:
    """Which spooled decision holds an event, and where it lies."""

    event_id: str
    decision_id: int
    location: _Location

    def to_json(self) -> str:
        where = self.location
        return json.dumps(
            {
                "event_id": self.event_id,
                "decision_id": self.decision_id,
                "segment": str(where.segment),
                "offset": where.offset,
                "length": where.length,
            }
        )

    def is_live(self) -> bool:
        """Whether the claimed decision is in its segment, or the segment is still owned by a live process
        that may be appending it right now. Never waits: the writer thread asks this. (A replayed segment
        is deleted: its decisions are in the database, and its claims are stale.)"""
        row = _read_decision(self.location)
        if row is not None and int(row["id"]) == self.decision_id:
            return True
        return _owned_by_a_live_process(self.location.segment)


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte (``os.write`` may write part of them); raises OSError when the disk refuses."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_decision(location: _Location, wait_s: float = 0.0) -> dict[str, Any] | None:
    """The decision row at ``location``; None if its segment is gone (replayed) or no complete decision
    line is there, after waiting up to ``wait_s`` for one being appended."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(location.segment, "rb") as handle:
                handle.seek(location.offset)
                line = handle.read(location.length).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        with contextlib.suppress(ValueError):
            if line.endswith("\n"):
                return SpoolRecord.from_line(line).decision
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def _search_decision(segment: Path, decision_id: int) -> dict[str, Any] | None:
    """The row of ``decision_id`` in ``segment``, found without reading every line (a decision line
    holds ``"id":<id>,``); None if no complete line holds it, or the file cannot be read."""
    needle = b'"id":%d,' % decision_id
    with contextlib.suppress(OSError, ValueError), open(segment, "rb") as handle:
        view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError: an empty file
        with view:
            at = view.find(needle)
            while at >= 0:
                start, end = view.rfind(b"\n", 0, at) + 1, view.find(b"\n", at)
                if end < 0:  # a line still being appended: not acknowledged yet
                    return None
                with contextlib.suppress(ValueError):
                    record = SpoolRecord.from_line(view[start : end + 1].decode("utf-8"))
                    if record.kind == DECISION and record.decision_id == decision_id:
                        return record.decision
                at = view.find(needle, end)
    return None


def _read_claim(path: Path) -> _Claim | None:
    """The claim at ``path``; None if there is none or it is damaged (a stale claim: taken over). Numbers no
    location has (a bit flip: -1, 1e400) are damage too: they raised out of the batch's look-up."""
    try:
        body = json.loads(path.read_text("utf-8"))
        where = _Location(Path(body["segment"]), int(body["offset"]), int(body["length"]))
        if where.offset < 0 or where.length < 0:
            return None
        return _Claim(str(body["event_id"]), int(body["decision_id"]), where)
    except (FileNotFoundError, ValueError, KeyError, TypeError, OverflowError):
        return None


def _owned_by_a_live_process(segment: Path) -> bool:
    """A segment is flock'ed by its owner for as long as the owner lives (see :class:`Spool`)."""
    try:
        handle = open(segment, "rb")  # noqa: SIM115 - closed below; a shared probe of the owner's lock
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False
