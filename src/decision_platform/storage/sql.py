"""What every store shares: the engine, and the one place that asks which database it is talking to.

PostgreSQL and SQLite differ in a few spots (bulk insert path, ``ON CONFLICT``, JSON type test, how
times compare); each store asks these helpers instead of reading ``engine.dialect`` itself.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy import Engine

from decision_platform.core.events import INT64_MAX
from decision_platform.core.ids import EPOCH_MS, NODE_BITS, SEQUENCE_BITS
from decision_platform.storage.tables import decisions

__all__ = [
    "Engine",
    "Store",
    "decided_between",
    "id_at",
    "insert_ignoring_conflicts",
    "is_postgresql",
    "json_dumps",
    "json_type",
    "parsed_json",
    "time_bound",
]

#: How far a decision's id time may be from its ``created_at``. Both are taken together (serving/engine.py);
#: ids never go back when the wall clock does (core/ids.py), created_at does: minutes cover a clock step.
ID_TIME_SLACK = timedelta(minutes=5)


def json_dumps(value: Any) -> bytes:
    """``value`` as JSON for a JSON(B) column, a float from 1e16 up spelled with its ".0".

    orjson writes such a float in exponent form ("1e+16"); JSONB keeps a number's value, not its spelling,
    and prints it back as "10000000000000000", which reads as an int: a float attribute came back from
    PostgreSQL an int. Every float that large is a whole number, so its digits and ".0" are exact, and
    JSONB keeps the ".0". Only a payload with an exponent ("e+") is walked again."""
    text = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    if b"e+" not in text:
        return text
    return orjson.dumps(_spelled_large_floats(value), option=orjson.OPT_SERIALIZE_NUMPY)


def _spelled_large_floats(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        if math.isfinite(value) and abs(value) >= 1e16:
            return orjson.Fragment(f"{int(value)}.0")
        return value
    if isinstance(value, dict):
        return {key: _spelled_large_floats(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_spelled_large_floats(item) for item in value]
    if isinstance(value, np.ndarray):
        return _spelled_large_floats(value.tolist())
    return value


class Store:
    """Data access over one SQLAlchemy engine (PostgreSQL or SQLite); the concern stores share it.

    ``batch_engine``: where the decision writer's one-statement batches go, if not through ``engine``
    (database.make_batch_engine: autocommit, one round trip a batch; the serving platform passes it)."""

    def __init__(self, engine: Engine, batch_engine: Engine | None = None) -> None:
        self.engine = engine
        self.batch_engine = batch_engine

    def _first(self, query: sa.Select[Any]) -> dict[str, Any] | None:
        """The query's first row as a dict (None: no row)."""
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
        return dict(row) if row else None

    def _all(self, query: sa.Select[Any]) -> list[dict[str, Any]]:
        """Every row of the query, as dicts."""
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query).mappings()]


def is_postgresql(engine: Engine) -> bool:
    """The dialect switch: True on PostgreSQL, False on SQLite."""
    return engine.dialect.name == "postgresql"


def insert_ignoring_conflicts(engine: Engine, table: sa.Table) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for ``table`` in this engine's dialect."""
    if is_postgresql(engine):
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing()


def json_type(engine: Engine) -> Any:
    """The SQL function naming a JSON value's type (``'object'``, ``'null'``...)."""
    return sa.func.jsonb_typeof if is_postgresql(engine) else sa.func.json_type


def parsed_json(engine: Engine, column: Any) -> Any:
    """``column`` as a JSON function's argument: on SQLite NULL where the column holds text that is not
    JSON (a hand edit's; PostgreSQL's jsonb never does), which fails the whole statement ("malformed
    JSON") instead of that row."""
    if is_postgresql(engine):
        return column
    return sa.case((sa.func.json_valid(column) == 1, column))


def time_bound(engine: Engine, value: datetime) -> datetime:
    """A time to compare stored times with: SQLite compares the stored text, so hand it a naive UTC time
    in the same format."""
    if is_postgresql(engine):
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


def id_at(moment: datetime) -> int:
    """The smallest decision id generated at or after ``moment`` (ids start with their millisecond),
    clamped to what a BIGINT holds (a year-9999 bound must not overflow the database's comparison)."""
    ms = max(0, int(moment.timestamp() * 1000) - EPOCH_MS)
    return min(ms << (NODE_BITS + SEQUENCE_BITS), INT64_MAX)


def decided_between(
    engine: Engine, since: datetime | None = None, until: datetime | None = None
) -> list[sa.ColumnElement[bool]]:
    """Conditions for decisions made in ``[since, until)`` (either end open when None).

    The window is on ``created_at``; on PostgreSQL the same window on the id (the partition key of the
    decision log, storage/partitions.py), widened by ID_TIME_SLACK, is added so the planner reads only the
    partitions of the window. The id range contains the created_at range, so the rows are the same.
    """
    conditions: list[sa.ColumnElement[bool]] = []
    if since is not None:
        conditions.append(decisions.c.created_at >= time_bound(engine, since))
        if is_postgresql(engine) and since - datetime.min.replace(tzinfo=since.tzinfo) > ID_TIME_SLACK:
            conditions.append(decisions.c.id >= id_at(since - ID_TIME_SLACK))
    if until is not None:
        conditions.append(decisions.c.created_at < time_bound(engine, until))
        if is_postgresql(engine) and datetime.max.replace(tzinfo=until.tzinfo) - until > ID_TIME_SLACK:
            conditions.append(decisions.c.id < id_at(until + ID_TIME_SLACK))
    return conditions
