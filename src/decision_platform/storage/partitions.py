"""The decision log's daily partitions on PostgreSQL: create them ahead, list them, drop the old ones.

``decisions`` is range-partitioned on its **id** (migration 0005). The id is time-ordered (core/ids.py: its
first 41 bits are the millisecond it was made), so a range of ids is a range of decision time: the
partition of UTC day D holds the ids from ``id_at(D 00:00)`` to ``id_at(D+1 00:00)``. Partitioning on the
id rather than ``created_at`` keeps the primary key ``(id)`` and the ``outcomes`` foreign key global (a
partitioned table's unique constraints must contain its partition key), and every look-up by id touches
one partition.

A ``decisions_default`` partition catches ids no day partition covers (days not created in time, or
hand-made small ids in tests), so an insert never fails for want of a partition. A day whose ids already
sit in the default partition cannot get its own partition afterwards (PostgreSQL refuses): those rows
stay in the default, which retention never drops, and :func:`ensure_partitions` says so.

Retention drops whole partitions whose every id is older than the cut-off, together with what belongs to
their decisions: outcomes, narratives and event claims (``decision_events``), so no foreign key dangles.
SQLite keeps one plain table: these functions are PostgreSQL only (:func:`is_partitioned`).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import sqlalchemy as sa

from decision_platform.storage.review import id_at
from decision_platform.storage.sql import is_postgresql

__all__ = [
    "DEFAULT_PARTITION",
    "EnsureResult",
    "Partition",
    "PartitionKeeper",
    "day_bounds",
    "drop_partitions_before",
    "ensure_partitions",
    "is_partitioned",
    "list_partitions",
]

log = logging.getLogger(__name__)

DEFAULT_PARTITION = "decisions_default"
#: Longest a partition command waits for its lock: serving writes keep going, the next run tries again.
LOCK_TIMEOUT = "5s"
#: A transaction-scoped advisory lock per schema around partition changes (creation and retention).
_SERIALIZE = "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.decisions partitions'))"
_BOUND = re.compile(r"FOR VALUES FROM \((MINVALUE|'?-?\d+'?)\) TO \((MAXVALUE|'?-?\d+'?)\)")


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition of ``decisions``: ids in ``[low, high)`` (None: unbounded; both None: the default)."""

    name: str
    low: int | None
    high: int | None
    #: The planner's row estimate (pg_class.reltuples; -1 or 0 until analysed).
    rows_estimate: int

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_PARTITION


@dataclass(frozen=True, slots=True)
class EnsureResult:
    """What :func:`ensure_partitions` did: days created, and days left to the default partition."""

    created: list[str]
    in_default: list[str]


def day_bounds(day: date) -> tuple[int, int]:
    """The ids of decisions made on UTC ``day``: ``[low, high)``."""
    start = datetime.combine(day, time(), tzinfo=UTC)
    return id_at(start), id_at(start + timedelta(days=1))


def partition_name(day: date) -> str:
    return f"decisions_p{day:%Y%m%d}"


def is_partitioned(engine: sa.Engine) -> bool:
    """True when ``decisions`` is a partitioned table (PostgreSQL after migration 0005)."""
    if not is_postgresql(engine):
        return False
    with engine.connect() as connection:
        return bool(
            connection.execute(
                sa.text(
                    "SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
                    "WHERE c.oid = to_regclass('decisions')"
                )
            ).first()
        )


def list_partitions(engine: sa.Engine) -> list[Partition]:
    """Every partition of ``decisions``, by id range (the default last)."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples::bigint "
                "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = to_regclass('decisions')"
            )
        ).all()
    partitions = []
    for name, bound, rows_estimate in rows:
        if bound == "DEFAULT":
            partitions.append(Partition(name, None, None, int(rows_estimate)))
            continue
        match = _BOUND.fullmatch(bound)
        if match is None:
            raise ValueError(f"partition {name} has a bound this platform did not make: {bound}")
        low, high = (None if v.endswith("VALUE") else int(v.strip("'")) for v in match.groups())
        partitions.append(Partition(name, low, high, int(rows_estimate)))
    # MINVALUE sorts first, the default last.
    return sorted(partitions, key=lambda p: (p.is_default, -1 if p.low is None else p.low))


def ensure_partitions(engine: sa.Engine, ahead_days: int, today: date | None = None) -> EnsureResult:
    """Create the day partitions of ``today`` (UTC) and the ``ahead_days`` after it, where missing.

    Idempotent; a day overlapping an existing partition (e.g. the pre-partitioning ``decisions_legacy``)
    is left to it. Each day is its own short transaction with a lock timeout, so a busy table delays
    creation, never the decisions.
    """
    if not is_partitioned(engine):
        return EnsureResult([], [])
    today = today or datetime.now(UTC).date()
    existing = [p for p in list_partitions(engine) if not p.is_default]
    created, in_default = [], []
    for offset in range(ahead_days + 1):
        day = today + timedelta(days=offset)
        low, high = day_bounds(day)
        if any(_overlaps(p, low, high) for p in existing):
            continue
        name = partition_name(day)
        try:
            with engine.begin() as connection:
                connection.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
                # Every API and worker process does this at start: one at a time per schema, and a day
                # another process made meanwhile is seen here, not created twice.
                connection.execute(sa.text(_SERIALIZE))
                if connection.execute(sa.text("SELECT to_regclass(:name)"), {"name": name}).scalar():
                    continue
                bounds = f"FOR VALUES FROM ({low}) TO ({high})"
                connection.execute(sa.text(f'CREATE TABLE "{name}" PARTITION OF decisions {bounds}'))
        except sa.exc.IntegrityError:
            # "updated partition constraint for default partition would be violated": rows of that day
            # already sit in the default partition; they stay there (still read, never dropped).
            in_default.append(name)
            continue
        created.append(name)
        existing.append(Partition(name, low, high, 0))
    return EnsureResult(created, in_default)


def drop_partitions_before(engine: sa.Engine, cutoff: datetime, *, dry_run: bool = False) -> list[Partition]:
    """Drop every partition all of whose decisions were made before ``cutoff`` (never the default), with
    the outcomes, narratives and event claims of its decisions. Returns the partitions (to be) dropped."""
    if not is_partitioned(engine):
        return []
    bound = id_at(cutoff)
    old = [p for p in list_partitions(engine) if not p.is_default and p.high is not None and p.high <= bound]
    if dry_run:
        return old
    for partition in old:
        low = -(2**63) if partition.low is None else partition.low
        ids = {"low": low, "high": partition.high}
        with engine.begin() as connection:
            connection.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            connection.execute(sa.text(_SERIALIZE))
            for table in ("outcomes", "explanations", "decision_events"):
                connection.execute(
                    sa.text(f"DELETE FROM {table} WHERE decision_id >= :low AND decision_id < :high"), ids
                )
            connection.execute(sa.text(f'ALTER TABLE decisions DETACH PARTITION "{partition.name}"'))
            connection.execute(sa.text(f'DROP TABLE "{partition.name}"'))
    return old


def _overlaps(partition: Partition, low: int, high: int) -> bool:
    below = partition.high is not None and partition.high <= low
    above = partition.low is not None and partition.low >= high
    return not (below or above)


class PartitionKeeper:
    """A daemon thread of long-running processes (API, worker): keeps ``ahead_days`` of day partitions
    created as the days pass, every ``interval_s``. Failures (database down, lock timeout) are logged and
    tried again at the next interval; rows meanwhile go to the default partition, never fail."""

    def __init__(self, engine: sa.Engine, ahead_days: int, interval_s: float) -> None:
        self.engine = engine
        self.ahead_days = ahead_days
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="partition-keeper", daemon=True)

    def start(self) -> PartitionKeeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                result = ensure_partitions(self.engine, self.ahead_days)
            except Exception as exc:  # keep serving; the next interval tries again
                log.warning("could not create the decision log's partitions ahead: %s", exc)
                continue
            if result.created:
                log.info("created decision partitions %s", ", ".join(result.created))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
