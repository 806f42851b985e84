"""The durable write path (storage/writer.py, storage/spool.py) under the faults users meet: a refused
record, a stalled database, an outage with retries and outcomes, a restart in the middle of it all."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

import decision_platform
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.errors import DatabaseUnavailable
from decision_platform.storage.repository import OutcomeStatus, Repository
from decision_platform.storage.spool import DECISION, QUARANTINE_FILE, Spool, SpoolRecord, SpoolTimeout
from decision_platform.storage.writer import DUPLICATE, SPOOLED, STORED, DecisionWriter
from tests.conftest import HangingSpoolDisk, decision_record, decision_row


class FlakyRepository(Repository):
    """A real SQLite repository that can be made to refuse connections or to hang like a frozen server."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine)
        self.refusing = False
        #: Rows with these ids are refused like a CHECK constraint would refuse them.
        self.refused_ids: set[int] = set()
        self.thawed = threading.Event()
        self.thawed.set()

    def _gate(self) -> None:
        if self.refusing:
            raise sa.exc.OperationalError("INSERT", {}, ConnectionRefusedError("refused"))
        self.thawed.wait(timeout=30)

    def insert_decisions(self, rows):  # type: ignore[no-untyped-def]
        self._gate()
        if any(row["id"] in self.refused_ids for row in rows):
            raise sa.exc.IntegrityError("INSERT", {}, ValueError("CHECK constraint failed"))
        return super().insert_decisions(rows)

    def ping(self) -> None:
        self._gate()
        super().ping()


@pytest.fixture
def repository(tmp_path: Path) -> FlakyRepository:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    return FlakyRepository(engine)


def stored_ids(repository: Repository) -> list[int]:
    with repository.engine.connect() as connection:
        return [r[0] for r in connection.execute(sa.text("SELECT id FROM decisions ORDER BY id"))]


def writer_for(repository: Repository, spool_dir: Path, **options: float) -> DecisionWriter:
    defaults = {"write_timeout_s": 0.3, "read_timeout_s": 0.3, "probe_interval_s": 0.05}
    return DecisionWriter(repository, Spool(spool_dir), batch_size=16, **{**defaults, **options})


def test_a_refused_record_is_quarantined_and_never_blocks_the_others(
    repository: FlakyRepository, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = writer_for(repository, tmp_path / "spool")
    repository.refusing = True
    rows = [decision_record(i) for i in range(1, 8)]
    rows[3] = decision_record(
        4, proposed_action=2**70
    )  # SQLite cannot hold it: a record error, not an outage
    assert writer.write_many(rows) == [SPOOLED] * 7
    with caplog.at_level(logging.ERROR, logger="decision_platform.storage.writer"):
        repository.refusing = False
        assert writer.wait_replayed(10)
    assert stored_ids(repository) == [1, 2, 3, 5, 6, 7]
    assert "decision 4" in caplog.text  # the log line names the refused decision
    quarantine = (tmp_path / "spool" / QUARANTINE_FILE).read_text()
    assert '"id":4' in quarantine and "1180591620717411303424" in quarantine  # kept intact, with why
    assert writer.status().quarantined == 1
    # The writer goes on as if nothing happened.
    assert writer.write(decision_record(9)) == STORED
    writer.close()


def test_a_refused_record_in_a_live_batch_is_spooled_then_isolated(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    writer = writer_for(repository, tmp_path / "spool")
    rows = [decision_record(1), decision_record(2, proposed_action=2**70), decision_record(3)]
    assert writer.write_many(rows) == [SPOOLED] * 3  # one transaction refused: all kept durable
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == [1, 3]
    assert writer.database_up  # a refused record is not an outage
    writer.close()


def test_a_stalled_database_is_spooled_within_the_write_timeout(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    writer = writer_for(repository, tmp_path / "spool")
    repository.thawed.clear()  # every call now hangs, like a frozen server
    started = time.monotonic()
    assert writer.write(decision_record(1)) == SPOOLED
    assert time.monotonic() - started < 2.0  # bounded by write_timeout_s (0.3 s), not by the freeze
    started = time.monotonic()
    assert writer.write_many([decision_record(i) for i in range(2, 50)]) == [SPOOLED] * 48
    assert time.monotonic() - started < 0.5  # known down: straight to the spool, no waiting
    assert not writer.database_up
    assert writer.find_decision(7).id == 7  # readable from the spool during the freeze
    repository.thawed.set()
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == list(range(1, 50))
    writer.close()


class SlowRepository(FlakyRepository):
    """A database that answers, but every call takes ``delay_s`` (an overloaded server, a slow link)."""

    delay_s = 0.0

    def _gate(self) -> None:
        time.sleep(self.delay_s)
        super()._gate()


def test_a_database_slower_than_the_write_deadline_stays_down_until_it_is_fast_again(
    tmp_path: Path,
) -> None:
    """A database that answers every call, but later than ``write_timeout_s``: each probe's ping
    succeeded (slowly), the database was marked up, and the next batch waited the whole deadline before
    being spooled -- again after every probe, so /decide kept paying the deadline (p99 ~1 s by default)
    and /ready flapped for as long as the database was slow. Now a probe answered later than the write
    deadline does not count: one batch waits, the rest are spooled at once, and the replay starts when
    the database is fast again."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    repository = SlowRepository(engine)
    writer = writer_for(repository, tmp_path / "spool")
    repository.delay_s = 0.5  # write_timeout_s 0.3, probes every 0.05 s
    waits = []
    deadline = time.monotonic() + 3.0
    i = 0
    while time.monotonic() < deadline:
        i += 1
        started = time.monotonic()
        assert writer.write(decision_record(i)) == SPOOLED
        waits.append(time.monotonic() - started)
        time.sleep(0.02)
    assert sum(wait >= 0.25 for wait in waits) == 1, [round(w, 2) for w in waits if w >= 0.25]
    assert not writer.database_up
    repository.delay_s = 0.0
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == list(range(1, i + 1))
    writer.close()


def test_a_decision_whose_id_another_decision_holds_is_not_acknowledged(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    """Decision ids carry a random 10-bit node id per process (core/ids.py): two processes that drew the
    same one (``serve --workers``, stream workers, another host: ~1.5% of the starts of six processes),
    or one restarted after the clock went back, make the same id in the same millisecond. The database
    keeps the first decision; the second was answered "duplicate" -- acknowledged with its id, never
    stored, and an outcome posted for it landed on the other decision. Now it is not acknowledged
    (DatabaseUnavailable: 503 + Retry-After; the client's retry is decided under a new id), and a retried
    event is still answered with its first decision."""
    writer = writer_for(repository, tmp_path / "spool")
    assert writer.write(decision_record(7, entity_id="first")) == STORED
    with pytest.raises(DatabaseUnavailable, match="decision id 7 is taken"):
        writer.write(decision_record(7, entity_id="second", event_id="ev-second"))
    with pytest.raises(DatabaseUnavailable, match="decision id 7 is taken"):
        writer.write(decision_record(7, entity_id="third"))
    assert writer.database_up
    assert writer.write(decision_record(8, event_id="ev-retried")) == STORED
    assert writer.write(decision_record(9, event_id="ev-retried")) == DUPLICATE
    assert repository.get_decision(7).entity_id == "first"
    assert writer.find_decision_by_event("ev-second") is None
    writer.close()


def test_a_spooled_decision_whose_id_another_decision_took_meanwhile_is_quarantined(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    """The same id collision during an outage: this process spooled decision 7, another one stored its own
    decision 7. The replay skipped the spooled one, found id 7 stored and took it for its own, replayed
    by an earlier, interrupted replay: the acknowledged decision was deleted with its segment. Now it is
    quarantined, named, for ``spool status`` and the RecordsQuarantined alert."""
    writer = writer_for(repository, tmp_path / "spool")
    repository.refusing = True
    assert writer.write(decision_record(7, entity_id="spooled")) == SPOOLED
    assert writer.write(decision_record(8, entity_id="spooled")) == SPOOLED
    Repository(repository.engine).insert_decisions([decision_record(7, entity_id="elsewhere").to_row()])
    repository.refusing = False
    try:
        assert writer.wait_replayed(10)
        assert writer.status().quarantined == 1
    finally:
        writer.close()
    (line,) = (tmp_path / "spool" / QUARANTINE_FILE).read_text().splitlines()
    entry = json.loads(line)
    assert '"entity_id":"spooled"' in json.dumps(entry["record"], separators=(",", ":")), line
    assert "decision id 7 is taken by another decision" in entry["error"]
    assert repository.get_decision(8) is not None


def test_the_spool_cost_does_not_grow_with_the_outage(repository: FlakyRepository, tmp_path: Path) -> None:
    writer = writer_for(repository, tmp_path / "spool")
    repository.refusing = True
    for i in range(1, 301):
        assert writer.write(decision_record(i)) == SPOOLED
    assert len(list((tmp_path / "spool").glob("segment-*.jsonl"))) == 1  # one segment, not one per batch
    assert writer.status().pending == 300
    repository.refusing = False
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == list(range(1, 301))
    assert not list((tmp_path / "spool").glob("segment-*.jsonl"))
    writer.close()


def test_a_retried_event_gets_its_first_decision_in_every_state(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    writer = writer_for(repository, tmp_path / "spool")
    repository.refusing = True
    assert writer.write(decision_record(1, event_id="ev-1")) == SPOOLED
    assert writer.write(decision_record(2, event_id="ev-1")) == DUPLICATE  # retried during the outage
    assert writer.find_decision_by_event("ev-1").id == 1
    # Two copies of one event submitted together (one batch, or two writer threads' batches): one decision,
    # and the copy answered DUPLICATE is answered with the one that was kept.
    results = writer.write_many([decision_record(3, event_id="ev-2"), decision_record(4, event_id="ev-2")])
    assert sorted(results) == sorted([SPOOLED, DUPLICATE])
    kept = 3 if results[0] == SPOOLED else 4
    assert writer.find_decision_by_event("ev-2").id == kept
    repository.refusing = False
    assert writer.wait_replayed(10)
    assert writer.write(decision_record(5, event_id="ev-1")) == DUPLICATE  # and after recovery
    assert writer.find_decision_by_event("ev-1").id == 1
    assert stored_ids(repository) == [1, kept]
    writer.close()


def test_a_retry_on_another_process_during_an_outage_gets_the_first_decision(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    """Two --workers processes share the spool directory; a client retries an event and the retry reaches
    the other process while the database is away: one decision, the first, in every state."""
    spool_dir = tmp_path / "spool"
    repository.refusing = True
    first, second = writer_for(repository, spool_dir), writer_for(repository, spool_dir)
    assert first.write(decision_record(1, event_id="x")) == SPOOLED
    assert second.write(decision_record(2, event_id="x")) == DUPLICATE
    answered = second.find_decision_by_event("x")  # read from the first process's segment
    assert answered is not None and answered.id == 1
    assert second.write(decision_record(3, event_id="y")) == SPOOLED  # other events are its own
    assert first.write(decision_record(4, event_id="y")) == DUPLICATE
    assert second.status().pending == 1 and first.status().pending == 1
    repository.refusing = False
    assert first.wait_replayed(10) and second.wait_replayed(10)
    assert stored_ids(repository) == [1, 3]
    assert first.status().quarantined == 0
    assert not list((spool_dir / "events").iterdir())  # claims are released once replayed
    assert second.write(decision_record(5, event_id="x")) == DUPLICATE  # the database's index now
    first.close()
    second.close()


def test_a_decision_another_process_has_not_replayed_yet_is_never_a_404(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    """``serve --workers 2``: one process spooled a decision during an outage; the database is back but that
    process has not replayed it yet (a long backlog, a probe still to come, or it died and its segment
    waits to be adopted). Its outcome, or a read of it, reaching the other process was a 404 "no decision":
    the client gave up on an acknowledged decision's outcome. Now the decision is read from the other
    process's segment, and its outcome is a 503 to retry (spooled here, it could replay ahead of its
    decision and be quarantined)."""
    spool_dir = tmp_path / "spool"
    repository.refusing = True
    first = writer_for(repository, spool_dir, probe_interval_s=60)  # replays only after its next probe
    assert first.write(decision_record(1)) == SPOOLED
    assert first.write(decision_record(2, event_id="y")) == SPOOLED
    repository.refusing = False
    second = writer_for(repository, spool_dir)
    found = second.find_decision(2)
    assert found is not None and found.id == 2 and found.event_id == "y"
    with pytest.raises(DatabaseUnavailable, match="another process"):
        second.record_outcome(2, "fraud", -20.0)
    os.mkfifo(spool_dir / "segment-0-0-0.jsonl")  # something else's, named like a segment: never opened
    assert second.find_decision(3) is None  # an unknown decision is still unknown
    assert second.record_outcome(3, "fraud", -20.0).status is OutcomeStatus.NOT_FOUND
    first.close()  # it stops; its segment is adopted and replayed by the other process
    assert second.spool.adopt_orphans() == 1
    assert second.wait_replayed(15) and stored_ids(repository) == [1, 2]
    assert second.record_outcome(2, "fraud", -20.0).status is OutcomeStatus.CREATED
    second.close()


def test_a_claim_left_by_a_process_that_died_before_its_fsync_is_taken_over(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    repository.refusing = True
    writer = writer_for(repository, spool_dir)
    claims = spool_dir / "events"
    claims.mkdir(parents=True)
    for event_id, segment in (
        ("gone", spool_dir / "segment-1-1-1.jsonl"),
        ("torn", spool_dir / "torn.jsonl"),
    ):
        path = writer.spool._claim_path(event_id)
        body = {"event_id": event_id, "decision_id": 99, "segment": str(segment), "offset": 0, "length": 50}
        path.write_text(json.dumps(body))
    (spool_dir / "torn.jsonl").write_text('{"kind":"decision","row":{"id":99')  # no live owner holds it
    assert writer.write(decision_record(1, event_id="gone")) == SPOOLED
    assert writer.write(decision_record(2, event_id="torn")) == SPOOLED
    assert writer.find_decision_by_event("torn").id == 2
    writer.close()


class SlowSpool(Spool):
    """A spool whose appends take a while (a slow disk): a second writer thread checks for the event's
    decision while the first is still appending it."""

    def append(self, records):  # type: ignore[no-untyped-def]
        time.sleep(0.1)
        return super().append(records)


def test_writer_threads_racing_to_spool_one_event_keep_one_decision(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    """Retries of one event during an outage land in different writer threads' batches; whichever spools
    first is the event's decision, the other is a DUPLICATE of it."""
    writer = DecisionWriter(repository, SlowSpool(tmp_path / "spool"), threads=2, probe_interval_s=60)
    repository.refusing = True
    assert writer.write(decision_record(1, event_id="warm-up")) == SPOOLED  # the database is now "down"
    first = writer.submit(decision_record(2, event_id="race"))
    time.sleep(0.03)  # one thread is appending it; the retry goes to the other thread
    retry = writer.submit(decision_record(3, event_id="race"))
    assert (first.result(timeout=10), retry.result(timeout=10)) == (SPOOLED, DUPLICATE)
    assert writer.find_decision_by_event("race").id == 2
    repository.refusing = False
    writer.close(drain_s=0)


def test_outcomes_of_spooled_decisions_are_spooled_behind_them(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    writer = writer_for(repository, tmp_path / "spool")
    repository.refusing = True
    assert writer.write(decision_record(1)) == SPOOLED
    first = writer.record_outcome(1, "fraud", -20.0)
    assert first.status is OutcomeStatus.CREATED
    assert writer.record_outcome(1, "fraud", -20.0).status is OutcomeStatus.DUPLICATE
    assert writer.record_outcome(1, "success", 1.0).status is OutcomeStatus.CONFLICT
    repository.refusing = False
    assert writer.wait_replayed(10)
    stored = repository.get_outcome(1)
    assert stored is not None and (stored.outcome, stored.reward) == ("fraud", -20.0)
    # Same rules once in the database.
    assert writer.record_outcome(1, "success", 1.0).status is OutcomeStatus.CONFLICT
    writer.close()


def test_a_restart_adopts_the_spool_and_ignores_a_torn_last_line(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    repository.refusing = True
    first = writer_for(repository, tmp_path / "spool")
    assert first.write_many([decision_record(1, event_id="a"), decision_record(2)]) == [SPOOLED, SPOOLED]
    first.close()  # as if the process died: the files stay
    (segment,) = (tmp_path / "spool").glob("segment-*.jsonl")
    with open(segment, "a") as handle:
        handle.write('{"kind":"decision","row":{"id":3')  # a write that never reached its fsync
    second = writer_for(repository, tmp_path / "spool")
    assert second.status().pending == 2
    assert second.find_decision_by_event("a").id == 1  # the index is rebuilt from the segments
    repository.refusing = False
    assert second.wait_replayed(10)
    assert stored_ids(repository) == [1, 2]
    assert second.status().quarantined == 0
    second.close()


def test_a_segment_held_by_a_live_process_is_left_alone(repository: FlakyRepository, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    repository.refusing = True
    owner = writer_for(repository, spool_dir)
    assert owner.write(decision_record(1)) == SPOOLED
    # The owner still holds its segment's lock, as a live process would.
    (segment,) = spool_dir.glob("segment-*.jsonl")
    with open(segment, "ab") as probe, pytest.raises(BlockingIOError):
        fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    other = Spool(spool_dir)
    assert other.pending() == 0  # not adopted while its owner lives
    other.close()
    owner.close()
    adopted = Spool(spool_dir)
    assert adopted.pending() == 1  # its owner is gone: adopted
    adopted.close()


def test_a_start_while_the_database_is_down_migrates_when_it_answers(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'later.sqlite'}")
    repository = FlakyRepository(engine)
    repository.refusing = True
    migrated = threading.Event()

    def recover() -> None:
        repository.ping()  # still refused: the writer keeps spooling and probing
        migrate(engine)
        migrated.set()

    writer = DecisionWriter(
        repository,
        Spool(tmp_path / "spool"),
        write_timeout_s=0.3,
        probe_interval_s=0.05,
        on_recover=recover,
    )
    assert not writer.database_up
    assert writer.write(decision_record(1)) == SPOOLED
    repository.refusing = False
    assert migrated.wait(10)
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == [1]
    writer.close()


def test_quarantined_records_can_be_requeued_once_the_cause_is_fixed(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    writer = writer_for(repository, tmp_path / "spool")
    repository.refused_ids = {2}
    assert writer.write_many([decision_record(1), decision_record(2), decision_record(3)]) == [SPOOLED] * 3
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == [1, 3]
    (entry,) = writer.spool.quarantine_entries()
    assert entry.decision_id == 2 and "CHECK constraint failed" in entry.error
    repository.refused_ids = set()  # the operator fixed the constraint
    assert writer.spool.requeue_quarantined() == 1
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == [1, 2, 3]
    assert writer.status().quarantined == 0
    writer.close()


def test_one_future_answers_a_batch_row_by_row(
    repository: FlakyRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``submit_many``: one future for the batch, and each row still gets its own answer -- including
    the rows that could not be made durable anywhere, which must not be acknowledged."""
    writer = writer_for(repository, tmp_path / "spool")
    assert writer.write(decision_record(1, event_id="ev-1")) == STORED
    batch = [
        decision_record(2, event_id="ev-1"),  # already stored: the database skips it
        decision_record(3, event_id="ev-2"),
        decision_record(4, event_id="ev-2"),  # twice in one batch: one decision
        decision_record(5),
    ]
    assert writer.submit_many(batch).result(timeout=10) == [DUPLICATE, STORED, DUPLICATE, STORED]
    assert stored_ids(repository) == [1, 3, 5]

    def full_disk(_records: object) -> None:
        raise OSError("no space left on device")

    repository.refusing = True
    monkeypatch.setattr(writer.spool, "append", full_disk)
    refused_before = REGISTRY.get_sample_value("dp_spool_errors_total", {"kind": "decision"}) or 0.0
    statuses = writer.submit_many(
        [decision_record(6, event_id="ev-3"), decision_record(7, event_id="ev-3")]
    ).result(timeout=10)
    assert isinstance(statuses[0], OSError) and isinstance(statuses[1], OSError)  # a copy of a failed row
    with pytest.raises(OSError):
        writer.write_many([decision_record(8)])
    with pytest.raises(OSError):
        writer.write(decision_record(9))
    # Counted: a full disk during an outage is a 503 for every caller, and an operator must hear of it.
    refused = REGISTRY.get_sample_value("dp_spool_errors_total", {"kind": "decision"}) or 0.0
    assert refused - refused_before == 3
    assert not writer.spool.has_work()  # nothing of the refused rows was kept anywhere
    writer.close()


#: A process whose spool meets a full disk halfway through an append (RLIMIT_FSIZE: the write puts part of
#: the batch on disk, then fails with EFBIG, as ENOSPC does), then gets room again. It prints, as JSON, which
#: appends were acknowledged, which decision each acknowledged id reads back as, and what replay would read.
_FULL_DISK_CHILD = """
import json, resource, signal, sys
from pathlib import Path
from decision_platform.storage.spool import Spool, SpoolRecord
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us
directory, lines = Path(sys.argv[1]), json.loads(sys.stdin.read())
records = [SpoolRecord.from_line(line) for line in lines]
spool = Spool(directory)
acked, refused = [], []
spool.append([records[0]]); acked.append(1)
(segment,) = directory.glob("segment-*.jsonl")
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size + 300, hard))
try:
    spool.append(records[1:3]); acked += [2, 3]
except OSError:
    refused += [2, 3]
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
spool.append([records[3]]); acked.append(4)
read_back = {i: getattr(spool.get_decision(i), "id", None) for i in acked}
chunk = spool.next_chunk(100)
print(json.dumps({"acked": acked, "refused": refused, "read_back": read_back,
                  "replay": [r.decision_id for r in chunk.records], "unreadable": len(chunk.unreadable)}))
"""


def test_a_full_disk_in_the_middle_of_an_append_corrupts_nothing(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    """A spool append the disk refuses halfway (full disk): nothing of it is acknowledged, and nothing of
    it may stay behind. It did: the part already written (or still in the file's buffer) sat before the
    next append, so an acknowledged decision read back as another one, replay stopped short of it and
    deleted its segment (lost), and the refused decisions were replayed into the database."""
    spool_dir = tmp_path / "spool"
    rows = [decision_row(i, event_id=f"ev-{i}") for i in range(1, 5)]
    lines = [SpoolRecord(DECISION, decision=row).to_line() for row in rows]
    source_dir = Path(decision_platform.__file__).parents[1]  # the child imports this checkout's code
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source_dir), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(spool_dir)],
        input=json.dumps(lines),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    seen = json.loads(child.stdout.splitlines()[-1])
    assert seen["refused"] == [2, 3] and seen["acked"] == [1, 4]
    assert seen["read_back"] == {"1": 1, "4": 4}  # each acknowledged id reads back as itself
    assert (seen["replay"], seen["unreadable"]) == ([1, 4], 0)
    # The process is gone; the next one adopts its segment and replays exactly what was acknowledged.
    writer = writer_for(repository, spool_dir)
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == [1, 4]
    assert writer.status().quarantined == 0
    writer.close()


def test_a_claim_that_fails_halfway_through_a_batch_leaves_no_claim_behind(
    repository: FlakyRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up between two event claims of one spooled batch: the append fails (503, nothing
    acknowledged) and must take back the claims it already made. One was left behind, pointing into this
    process's live segment: it looked live, so the client's retry of that event was answered as a
    duplicate of a decision that was never durable -- and the retry's own decision was never stored."""
    repository.refusing = True
    writer = writer_for(repository, tmp_path / "spool")
    claim = writer.spool._claim
    calls: list[str] = []

    def disk_fills_up(event_id: str, decision_id: int, location: object) -> bool:
        calls.append(event_id)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return claim(event_id, decision_id, location)  # type: ignore[arg-type]

    monkeypatch.setattr(writer.spool, "_claim", disk_fills_up)
    statuses = writer.submit_many(
        [decision_record(1, event_id="ev-1"), decision_record(2, event_id="ev-2")]
    ).result(timeout=10)
    assert all(isinstance(status, OSError) for status in statuses)  # 503 for both, nothing acknowledged
    monkeypatch.undo()  # room on the disk again
    assert writer.spool.decision_for_event("ev-1") is None
    repository.refusing = False
    assert writer.write(decision_record(3, event_id="ev-1")) in (STORED, SPOOLED)  # not a duplicate
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == [3]
    writer.close()


def test_a_copy_of_an_event_in_the_batch_whose_first_copy_could_not_be_stored_is_not_acknowledged(
    repository: FlakyRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copies of one event in one group commit (a client's retry racing its first try); the database
    answers but refuses the first copy's record, and the spool's disk is full: the first copy fails (503).
    The second copy was answered DUPLICATE -- of a decision stored nowhere. With the database up, the
    engine then looked for that first decision, found none, and acknowledged the second copy's own record,
    which was never stored either. It must fail like the copy it duplicates."""
    writer = writer_for(repository, tmp_path / "spool")

    def full_disk(_records: object) -> None:
        raise OSError(28, "No space left on device")

    repository.refused_ids = {1}
    monkeypatch.setattr(writer.spool, "append", full_disk)
    statuses = writer.submit_many(
        [decision_record(1, event_id="ev-1"), decision_record(2, event_id="ev-1"), decision_record(3)]
    ).result(timeout=10)
    assert isinstance(statuses[0], OSError) and isinstance(statuses[1], OSError), statuses
    assert isinstance(statuses[2], OSError)  # spooled with the refused batch: the disk refused it too
    assert writer.find_decision_by_event("ev-1") is None  # so nothing may claim to be its decision
    writer.close()


def test_a_broken_spool_directory_fails_the_batch_and_never_the_writer(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    """The spool's claims directory is unreadable (a disk error, or ``events`` replaced by a file): the
    writer looks there for every batch with an event id, even with the database healthy. The error killed
    the writer thread: that batch and every later one were never answered -- each /decide waited its full
    60 s for a 503, for good, with PostgreSQL up. Now the batch fails (503, counted), the writer goes on."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / "events").write_text("not a directory")
    writer = writer_for(repository, spool_dir)
    errors = REGISTRY.get_sample_value("dp_spool_errors_total", {"kind": "decision"}) or 0.0
    with pytest.raises(NotADirectoryError):
        writer.submit(decision_record(1, event_id="ev-1")).result(timeout=5)
    assert (REGISTRY.get_sample_value("dp_spool_errors_total", {"kind": "decision"}) or 0.0) == errors + 1
    (spool_dir / "events").unlink()  # repaired
    assert writer.submit(decision_record(2, event_id="ev-2")).result(timeout=5) == STORED
    assert stored_ids(repository) == [2]
    writer.close()


def test_a_quarantine_the_disk_refuses_pauses_the_replay_not_the_database(
    repository: FlakyRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay meets a record the database refuses, and the spool's disk is full, so it cannot be moved to
    the quarantine file. That failure was taken for a database outage: the healthy database was marked down
    again and again (each probe found it up, each replay failed the same way), and live decisions went to
    the spool meanwhile -- the full disk's spool: 503s with PostgreSQL answering. Now only the replay waits
    (counted), and live decisions are stored."""
    writer = writer_for(repository, tmp_path / "spool")
    repository.refusing = True
    assert writer.write_many([decision_record(i) for i in (1, 2, 3)]) == [SPOOLED] * 3
    repository.refused_ids = {2}

    def full_disk(_payload: object, _error: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.spool, "quarantine", full_disk)
    errors = REGISTRY.get_sample_value("dp_spool_errors_total", {"kind": "decision"}) or 0.0
    repository.refusing = False
    deadline = time.monotonic() + 10
    while (REGISTRY.get_sample_value("dp_spool_errors_total", {"kind": "decision"}) or 0.0) == errors:
        assert time.monotonic() < deadline, "the failed quarantine was not counted"
        time.sleep(0.05)
    statuses = [writer.write(decision_record(i)) for i in range(10, 20)]
    assert writer.database_up and statuses == [STORED] * 10, (writer.status(), statuses)
    monkeypatch.undo()  # room on the disk again: the replay goes on
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == [1, 3, *range(10, 20)] and writer.status().quarantined == 1
    writer.close()


def spool_timeouts() -> float:
    return REGISTRY.get_sample_value("dp_spool_timeouts_total", {"kind": "decision"}) or 0.0


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_spool_disk_that_hangs_fails_the_batch_within_the_spool_timeout(
    repository: FlakyRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is away and the spool's disk hangs (an fsync that does not return). The writer thread
    waited on it, the spool's lock held across the fsync: every batch (its event look-up), /ready and
    GET /decisions waited too, and /decide answered 503 only after the decider's 60 s. Now the batch fails
    within the spool's deadline (503, counted), later batches fail at once while the disk is stuck (one
    thread waits on it), reads answer, and a retry of the stuck event is not answered with a decision
    whose fsync has not returned (it read as a live claim). Once the disk answers, the stuck decision is
    durable: the retry gets it, and it is replayed once."""
    writer = writer_for(repository, tmp_path / "spool", spool_timeout_s=0.3)
    repository.refusing = True
    assert writer.write(decision_record(1, event_id="ev-1")) == SPOOLED  # the database is now "down"
    disk = HangingSpoolDisk(monkeypatch)
    timeouts = spool_timeouts()
    started = time.monotonic()
    with pytest.raises(SpoolTimeout):
        writer.write(decision_record(2, event_id="ev-2"), timeout=10)
    assert time.monotonic() - started < 2.0 and disk.hanging.is_set()
    started = time.monotonic()
    with pytest.raises(SpoolTimeout):  # the disk is still stuck: no waiting again
        writer.write(decision_record(3), timeout=10)
    assert time.monotonic() - started < 0.25
    assert sum(t.name.startswith("spool-disk") for t in threading.enumerate()) == 1
    started = time.monotonic()
    assert writer.status().pending == 1 and writer.find_decision(1).id == 1  # reads do not wait
    assert time.monotonic() - started < 0.25
    with pytest.raises(SpoolTimeout):  # its first try is not durable: no answer with it
        writer.write(decision_record(4, event_id="ev-2"), timeout=10)
    assert spool_timeouts() == timeouts + 3
    disk.release()  # the stuck append completes: durable, never acknowledged
    wait_for(lambda: writer.spool.holds_decision(2))
    assert writer.write(decision_record(5, event_id="ev-2")) == DUPLICATE  # the client's retry: the first
    assert writer.find_decision_by_event("ev-2").id == 2
    assert not writer.spool.holds_decision(3) and not writer.spool.holds_decision(4)
    repository.refusing = False
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == [1, 2] and writer.status().quarantined == 0
    writer.close()


def test_a_hung_append_that_fails_when_the_disk_answers_leaves_nothing_behind(
    repository: FlakyRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stuck fsync returns an I/O error once the disk answers: the abandoned append is cut off and its
    claim taken back, so the client's retry gets a decision of its own (the first one exists nowhere)."""
    writer = writer_for(repository, tmp_path / "spool", spool_timeout_s=0.3)
    repository.refusing = True
    assert writer.write(decision_record(1)) == SPOOLED
    disk = HangingSpoolDisk(monkeypatch)
    disk.failures = 1
    with pytest.raises(SpoolTimeout):
        writer.write(decision_record(2, event_id="ev-2"), timeout=10)
    disk.release()
    wait_for(lambda: not writer.spool._claim_path("ev-2").exists())
    assert writer.write(decision_record(3, event_id="ev-2")) == SPOOLED
    assert writer.find_decision_by_event("ev-2").id == 3
    repository.refusing = False
    assert writer.wait_replayed(10)
    assert stored_ids(repository) == [1, 3] and writer.status().quarantined == 0
    writer.close()


#: Lines a damaged disk or a hand edit can leave between good records: not JSON, JSON that is not a record,
#: records of the wrong shape. Each must be quarantined as it is, and the records around it replayed.
DAMAGED_SPOOL_LINES = [
    "not json at all",
    "123",
    "null",
    '["kind", "decision"]',
    '"a string"',
    '{"kind":"decision","row":[1]}',
    '{"kind":"decision","row":{"created_at":"2026-01-01T00:00:00+00:00"}}',  # no id
    '{"kind":"decision","row":{"id":"abc","created_at":"2026-01-01T00:00:00+00:00"}}',
    '{"kind":"decision","row":{"id":7,"created_at":5}}',
    '{"kind":"decision","row":{"id":7,"created_at":"yesterday"}}',
    '{"kind":"decision","row":{"id":true,"created_at":"2026-01-01T00:00:00+00:00"}}',
    '{"kind":"outcome","outcome":5}',
    '{"kind":"outcome","outcome":{"decision_id":1}}',
    '{"kind":"outcome","outcome":{"decision_id":[1],"outcome":"fraud","reward":1,"received_at":"x"}}',
    '{"kind":"something else"}',
]


def test_damaged_lines_in_the_middle_of_a_segment_are_quarantined_and_the_others_replayed(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    repository.refusing = True
    first = writer_for(repository, tmp_path / "spool")
    assert first.write_many([decision_record(1, event_id="a")]) == [SPOOLED]
    first.close()  # as if the process died: the files stay
    (segment,) = (tmp_path / "spool").glob("segment-*.jsonl")
    good = segment.read_text()
    later = SpoolRecord(DECISION, decision=decision_row(2, event_id="b")).to_line()
    segment.write_text(good + "".join(line + "\n" for line in DAMAGED_SPOOL_LINES) + later)

    # The restart adopts the segment (it used to fail on "123"): the index skips what it cannot read.
    second = writer_for(repository, tmp_path / "spool")
    assert second.find_decision_by_event("b").id == 2
    repository.refusing = False
    assert second.wait_replayed(10)
    assert stored_ids(repository) == [1, 2]
    # Each damaged line kept as it was, with why, and counted.
    entries = second.spool.quarantine_entries()
    assert sorted(e.record.strip() for e in entries) == sorted(DAMAGED_SPOOL_LINES), entries
    assert {e.error for e in entries} == {"unreadable spool line"}
    assert second.status().quarantined == len(DAMAGED_SPOOL_LINES) and second.status().pending == 0
    assert second.write(decision_record(9)) == STORED  # and the writer goes on
    second.close()
    # A damaged line of the quarantine itself is listed as it is; requeue moves no line that cannot replay.
    with open(tmp_path / "spool" / QUARANTINE_FILE, "a") as handle:
        handle.write('{"record": [1]}\n')
    spool = Spool(tmp_path / "spool")
    assert [e.record for e in spool.quarantine_entries()][-1] == '{"record": [1]}'
    assert spool.requeue_quarantined() == 0 and spool.pending() == 0
    assert len(spool.quarantine_entries()) == len(DAMAGED_SPOOL_LINES) + 1
    spool.close()


def test_a_foreign_file_named_like_a_segment_is_left_alone_and_the_rest_replayed(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    """A directory or a pipe named ``segment-*.jsonl`` in the spool directory (a backup an operator made
    there, another program's files): adopting it raised IsADirectoryError -- the server did not start --
    and, once it appeared under a running server, every replay step failed and marked the healthy
    database down: decisions went to the spool for good and were never replayed. (A pipe would have hung
    the start.) Now it is skipped with a warning, and the spool's own segments replay as usual."""
    spool_dir = tmp_path / "spool"
    repository.refusing = True
    first = writer_for(repository, spool_dir)
    assert first.write(decision_record(1, event_id="a")) == SPOOLED
    first.close()  # as if the process died: its segment stays, to be adopted
    (spool_dir / "segment-backup.jsonl").mkdir()
    os.mkfifo(spool_dir / "segment-pipe.jsonl")

    second = writer_for(repository, spool_dir)  # starts (was IsADirectoryError)
    assert second.find_decision_by_event("a").id == 1
    repository.refusing = False
    assert second.wait_replayed(10)
    (spool_dir / "decisions-later.jsonl").mkdir()  # appears while it runs: looked at within 5 s
    time.sleep(5.5)
    assert second.write(decision_record(2)) == STORED  # the database was never taken for down
    assert second.status().database_up
    assert stored_ids(repository) == [1, 2]
    second.close()


@pytest.mark.parametrize(
    ("field", "raw"), [("offset", "-1"), ("offset", "1e400"), ("length", "-5"), ("decision_id", "1e999")]
)
def test_a_damaged_claim_is_stale_and_never_fails_the_batch_it_is_read_in(
    repository: FlakyRepository, tmp_path: Path, field: str, raw: str
) -> None:
    """A claim file in ``events/`` whose JSON parses but whose numbers no location can have (a bit flip, a
    hand edit): int(1e400) raised OverflowError, a seek to -1 OSError -- out of the batch's claim look-up,
    failing every request of the batch (503s for the events beside it too, on every retry of that event,
    with the database up). Now such a claim is no claim: stale, taken over, one decision per event."""
    spool_dir = tmp_path / "spool"
    writer = writer_for(repository, spool_dir)
    (spool_dir / "events").mkdir(parents=True)
    segment = spool_dir / "segment-1-1-1.jsonl"
    segment.write_text(SpoolRecord(DECISION, decision=decision_row(99, event_id="hit")).to_line() + "\n")
    claim = {"event_id": "hit", "decision_id": 99, "segment": str(segment), "offset": 0, "length": 10}
    del claim[field]
    writer.spool._claim_path("hit").write_text(json.dumps(claim)[:-1] + f', "{field}": {raw}}}')
    batch = writer.write_many([decision_record(1, event_id="hit"), decision_record(2, event_id="beside")])
    assert batch == [STORED, STORED]
    assert stored_ids(repository) == [1, 2]
    writer.close()


def test_processes_sharing_a_spool_claim_distinct_node_numbers_and_a_dead_ones_is_free_again(
    tmp_path: Path,
) -> None:
    """Decision ids are unique only if node numbers are (core/ids.py): drawn at random, two of six processes
    on a host shared one at 1.5% of starts, and a decision of the second in the same millisecond was
    answered but never stored. Each process sharing the spool now holds a lock on its own number."""
    spools = [Spool(tmp_path / "spool") for _ in range(6)]  # each its own open file: a process apart
    numbers = [spool.claim_node_id() for spool in spools]
    assert len(set(numbers)) == 6
    spools[0].close()  # its owner stopped (or died: the lock goes with the process)
    again = Spool(tmp_path / "spool").claim_node_id(nodes=1 << 10)
    assert again not in numbers[1:]
    crowded = [Spool(tmp_path / "small") for _ in range(3)]
    assert sorted(spool.claim_node_id(nodes=2) for spool in crowded[:2]) == [0, 1]
    assert crowded[2].claim_node_id(nodes=2) in (0, 1)  # all held: one at random, with a warning


def test_a_platforms_decision_ids_carry_its_claimed_node_number_or_dp_node_id(
    make_settings: Callable[..., Any], start_platform: Callable[[Any], Any], tmp_path: Path
) -> None:
    first = start_platform(make_settings(spool_dir=tmp_path / "shared"))
    second = start_platform(make_settings(spool_dir=tmp_path / "shared"))
    assert first.engine.ids.node_id != second.engine.ids.node_id
    given = start_platform(make_settings(spool_dir=tmp_path / "shared", node_id=77))
    assert given.engine.ids.node_id == 77
    assert (given.engine.ids.next_id() >> 12) & 1023 == 77
