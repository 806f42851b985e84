"""What every store shares: the engine, and the one place that asks which database it is talking to.

PostgreSQL and SQLite differ in a few spots (bulk insert path, ``ON CONFLICT``, JSON type test, how
times compare); each store asks these helpers instead of reading ``engine.dialect`` itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

__all__ = ["Engine", "Store", "insert_ignoring_conflicts", "is_postgresql", "json_type", "time_bound"]


class Store:
    """Data access over one SQLAlchemy engine (PostgreSQL or SQLite); the concern stores share it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

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


def time_bound(engine: Engine, value: datetime) -> datetime:
    """A time to compare stored times with: SQLite compares the stored text, so hand it a naive UTC time
    in the same format."""
    if is_postgresql(engine):
        return value
    return value.astimezone(UTC).replace(tzinfo=None)
