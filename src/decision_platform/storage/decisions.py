"""Decisions: the batch insert of the writer, look-ups, and the reads learning and reporting make."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from decision_platform.core.actions import is_action
from decision_platform.core.records import DecisionRecord
from decision_platform.observability import metrics
from decision_platform.storage.errors import DamagedDecisionError
from decision_platform.storage.sql import (
    Store,
    decided_between,
    insert_ignoring_conflicts,
    is_postgresql,
    json_dumps,
    json_type,
    parsed_json,
)
from decision_platform.storage.tables import decision_events, decisions, outcomes

log = logging.getLogger(__name__)

#: A decision row: the keys are the columns of ``tables.decisions``. Storage's own representation (what
#: the spool and the batch insert carry); what goes in and comes out of storage is a ``DecisionRecord``.
DecisionRow = dict[str, Any]

#: Plain str (not quoted_name): orjson takes only exact str keys.
_DECISION_COLUMNS = [str(c.name) for c in decisions.columns]


def _recordset_type(column: sa.Column[Any]) -> str:
    """A column's type in the batch's ``jsonb_to_recordset``: strings as text, so that the INSERT's
    assignment cast refuses an over-long value (an explicit varchar(n) cast would truncate it)."""
    if isinstance(column.type, sa.String):
        return "text"
    return column.type.compile(dialect=postgresql.dialect())


_COLUMN_LIST = ", ".join(_DECISION_COLUMNS)
#: A whole batch is one JSON array, parsed by the server: one orjson.dumps per batch instead of a
#: parameter adaptation (and a Jsonb wrapper) per value per row.
_INSERT_BATCH_SQL = (
    f"INSERT INTO decisions ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM jsonb_to_recordset(%s::jsonb) "
    f"AS batch({', '.join(f'{c.name} {_recordset_type(c)}' for c in decisions.columns)}) "
    "ON CONFLICT DO NOTHING RETURNING id"
)

#: What a decision logged of the models' state and the policy's choice (the off-policy data of learning/).
_LOGGED_STATE = (
    decisions.c.features,
    decisions.c.anomaly,
    decisions.c.risk,
    decisions.c.probabilities,
    decisions.c.action_mask,
    decisions.c.action,
    decisions.c.propensity,
)
#: Decisions left-joined with their outcome (None columns without one).
_WITH_OUTCOMES = decisions.outerjoin(outcomes, outcomes.c.decision_id == decisions.c.id)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _three(value: Any, item: Callable[[Any], bool]) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(item(v) for v in value)


def typical_range(value: Any) -> bool:
    """A stored normal range (``models.ranges.Typical.as_dict``) or none: what pages word values against."""
    return value is None or (
        isinstance(value, dict) and _number(value.get("low")) and _number(value.get("high"))
    )


def _fired_rule(rule: Any) -> bool:
    """A fired rule as readers take it: a dict naming the rule and its tier (what it did to the actions),
    and what it tested, if listed, a list of features."""
    inputs = rule.get("inputs") if isinstance(rule, dict) else None
    return (
        isinstance(rule, dict)
        and isinstance(rule.get("name"), str)
        and isinstance(rule.get("tier"), str)
        and (inputs is None or (isinstance(inputs, list) and all(isinstance(i, dict) for i in inputs)))
        and all(isinstance(i.get("feature"), str) and typical_range(i.get("typical")) for i in inputs or ())
    )


def _reason(reason: Any) -> bool:
    """A reason code as its readers (the decision page, the explanation's facts) take it."""
    return (
        isinstance(reason, dict)
        and isinstance(reason.get("feature"), str)
        and isinstance(reason.get("direction"), str)
        and _number(reason.get("value"))
        and _number(reason.get("weight"))
        and typical_range(reason.get("typical"))
    )


#: What readers of stored decisions take for granted of each column, when the row carries it: learning,
#: reporting and backtests over many rows, and the pages of one decision (its API record, explanation and
#: console page), which also read ``proposed_action`` and ``reasons``. The platform writes nothing else; a
#: hand edit or an older version may have.
_INTACT: dict[str, Callable[[Any], bool]] = {
    "features": lambda v: isinstance(v, dict) and all(_number(x) for x in v.values()),
    "amount": lambda v: v is None or _number(v),
    "anomaly": lambda v: v is None or _number(v),
    "risk": lambda v: v is None or _number(v),
    "probabilities": lambda v: v is None or _three(v, _number),
    "proposed_action": lambda v: v is None or is_action(v),
    "action_mask": lambda v: _three(v, lambda m: isinstance(m, bool)),
    "action": is_action,
    "propensity": lambda v: _number(v) and 0.0 < v <= 1.0,
    "rules_fired": lambda v: v is None or (isinstance(v, list) and all(_fired_rule(r) for r in v)),
    "reasons": lambda v: isinstance(v, list) and all(_reason(r) for r in v),
    "model_versions": lambda v: v is None or isinstance(v, dict),
    "attributes": lambda v: v is None or isinstance(v, dict),
    "shadow": lambda v: (
        v is None
        or (
            isinstance(v, dict)
            and isinstance(v.get("version"), str)
            and is_action(v.get("action"))
            and _three(v.get("probabilities"), _number)
        )
    ),
    "reward": lambda v: v is None or _number(v),
}


def damaged(row: Mapping[str, Any]) -> DamagedDecisionError | None:
    """What is wrong with a stored decision row, or None: the error naming the first of its columns that
    does not hold what the platform writes there. Readers over many rows skip (and count) such a row: one
    row a hand edit or an older version left must not stop a retrain, a comparison, a backtest or a
    report. Readers of that one row refuse it (:func:`intact`) or show it as stored."""
    for column, intact_value in _INTACT.items():
        if column in row and not intact_value(row[column]):
            return DamagedDecisionError(row.get("id"), column, row[column])
    return None


def counted(problem: DamagedDecisionError, reader: str) -> DamagedDecisionError:
    """``problem``, counted under ``reader`` in ``dp_damaged_rows_total`` and logged (one line, no
    traceback: a damaged row is no bug of the platform's), for the caller to raise or to show."""
    metrics.DAMAGED_ROWS.labels(reader=reader).inc()
    log.warning("%s: %s", reader, problem)
    return problem


def intact(record: DecisionRecord, reader: str, columns: Sequence[str] | None = None) -> DecisionRecord:
    """``record``, unless it is damaged in one of ``columns`` (default: any): then
    :class:`DamagedDecisionError`, :func:`counted` under ``reader``. What a reader of one stored decision
    does with a damaged one: it refuses it by name instead of failing on it with a traceback, or answering
    what the platform never decided (an action of -1 read as a block)."""
    row = record.to_row()
    problem = damaged(row if columns is None else {c: row[c] for c in ("id", *columns)})
    if problem is not None:
        raise counted(problem, reader)
    return record


def intact_rows(rows: Iterable[Mapping[str, Any]], reader: str) -> Iterator[Any]:
    """The rows that are not :func:`damaged`; the others are counted and the first one logged."""
    skipped, first = 0, None
    for row in rows:
        problem = damaged(row)
        if problem is None:
            yield row
            continue
        skipped += 1
        first = first or problem
    if skipped:
        metrics.DAMAGED_ROWS.labels(reader=reader).inc(skipped)
        log.warning("%s skipped %d damaged decision rows, e.g. %s", reader, skipped, first)


class DecisionStore(Store):
    """Reads and writes of ``tables.decisions`` (joined with their outcomes where a reader needs them)."""

    def insert_decisions(self, rows: Sequence[DecisionRow]) -> set[int]:
        """Insert a batch in one transaction; returns the ids actually inserted.

        A row whose id or event_id is already stored is skipped, which makes replays (spool, Kafka
        redelivery, HTTP retries) idempotent; the caller can then fetch the stored decision instead.
        """
        if not rows:
            return set()
        if is_postgresql(self.engine):
            return self._insert_decisions_postgresql(rows)
        statement = insert_ignoring_conflicts(self.engine, decisions).returning(decisions.c.id)
        with self.engine.begin() as connection:
            params = [{c: row.get(c) for c in _DECISION_COLUMNS} for row in rows]
            return {row.id for row in connection.execute(statement, params)}

    def _insert_decisions_postgresql(self, rows: Sequence[DecisionRow]) -> set[int]:
        # One statement whose one parameter is the batch as a JSON array (jsonb_to_recordset): 7 us of
        # client CPU a row, against 27 us for psycopg's pipelined executemany with a Jsonb adapter per
        # JSON value (1,000-row batches; wall time 2-3x less too) -- CPU the writer thread took from the
        # requests' GIL. A key a row lacks (a row spooled
        # by an older version) is SQL NULL, as a JSON null is. What PostgreSQL cannot hold (NUL in text, an
        # integer beyond 64 bits, a lone surrogate) fails the batch as a record error, as before: orjson
        # or the server refuses it, and the writer isolates the row.
        payload = json_dumps([{c: row.get(c) for c in _DECISION_COLUMNS} for row in rows]).decode()
        # One statement: in autocommit (the serving platform's batch engine) one round trip, else in a
        # transaction of its own on the main engine.
        with self.batch_engine.connect() if self.batch_engine else self.engine.begin() as connection:
            cursor = connection.connection.cursor()
            cursor.execute(_INSERT_BATCH_SQL, (payload,), prepare=False)
            return {r[0] for r in cursor.fetchall()}

    def existing_ids(self, ids: Sequence[int]) -> set[int]:
        """Which of these decision ids are stored."""
        if not ids:
            return set()
        with self.engine.connect() as connection:
            query = sa.select(decisions.c.id).where(decisions.c.id.in_(list(ids)))
            return {row[0] for row in connection.execute(query)}

    def stored_owners(self, ids: Sequence[int]) -> dict[int, tuple[str, str | None, datetime]]:
        """Whose decision each stored id is -- (entity_id, event_id, created_at) -- to tell a decision
        replayed twice from another decision under the same id (storage/writer.py)."""
        if not ids:
            return {}
        columns = (decisions.c.id, decisions.c.entity_id, decisions.c.event_id, decisions.c.created_at)
        with self.engine.connect() as connection:
            query = sa.select(*columns).where(decisions.c.id.in_(list(ids)))
            return {row[0]: (row[1], row[2], row[3]) for row in connection.execute(query)}

    def get_decision_by_event(self, event_id: str) -> DecisionRecord | None:
        if is_postgresql(self.engine):
            # The event's claim (migration 0005) names its decision: one partition is read, by id.
            claimed = sa.select(decision_events.c.decision_id).where(decision_events.c.event_id == event_id)
            return self._record(sa.select(decisions).where(decisions.c.id == claimed.scalar_subquery()))
        return self._record(sa.select(decisions).where(decisions.c.event_id == event_id))

    def get_decision(self, decision_id: int) -> DecisionRecord | None:
        return self._record(sa.select(decisions).where(decisions.c.id == decision_id))

    def _record(self, query: sa.Select[Any]) -> DecisionRecord | None:
        row = self._first(query)
        return DecisionRecord.from_row(row) if row is not None else None

    def count_decisions(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(decisions)).scalar_one())

    def recent_features(self, entity_id: str, before_id: int, limit: int = 50) -> list[dict[str, float]]:
        """Feature snapshots of the entity's decisions before ``before_id``, newest first (its own normal
        ranges, for explanations)."""
        query = (
            sa.select(decisions.c.features)
            .where(decisions.c.entity_id == entity_id, decisions.c.id < before_id)
            .order_by(decisions.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as connection:
            # A snapshot that is not a dict of numbers (a hand edit) is left out: it would fail the
            # explanation of every later decision of the entity.
            return [row[0] for row in connection.execute(query) if row[0] and _INTACT["features"](row[0])]

    # --- shadow decisions (learning/compare.py)
    def shadow_decisions(self, since: datetime | None = None, limit: int | None = None) -> list[DecisionRow]:
        """Decisions that logged a shadow policy's choice, newest first, each with its outcome's ``reward``
        and ``imputed`` flag (both None when no outcome has arrived)."""
        # SQLite stores a Python None in a JSON column as the JSON text 'null', PostgreSQL (psycopg path)
        # as SQL NULL: asking for a JSON object covers both. Text that is not JSON is no object either
        # (parsed_json: SQLite's json_type of it failed the whole comparison).
        query = (
            sa.select(
                decisions.c.id,
                decisions.c.created_at,
                *_LOGGED_STATE,
                decisions.c.decided_by,
                decisions.c.model_versions,
                decisions.c.shadow,
                outcomes.c.reward,
                outcomes.c.imputed,
            )
            .select_from(_WITH_OUTCOMES)
            .where(json_type(self.engine)(parsed_json(self.engine, decisions.c.shadow)) == "object")
            .order_by(decisions.c.id.desc())
        )
        if since is not None:
            query = query.where(*decided_between(self.engine, since))
        if limit is not None:
            query = query.limit(limit)
        return self._all(query)

    # --- logged decisions (learning/logged.py)
    def logged_decisions(self, since: datetime | None = None, until: datetime | None = None) -> list[Any]:
        """Decisions made in ``[since, until)`` (all by default) left-joined with their outcomes, oldest
        first: mappings with what the policy learns from (state, probabilities, mask, action, propensity)
        and the outcome's ``outcome``, ``reward`` and ``imputed`` (None without one).

        Reads in one pass with a server-side cursor (``yield_per``), so a long window does not need the
        whole result in the driver's memory twice.
        """
        query = (
            sa.select(
                decisions.c.id,
                decisions.c.entity_id,
                decisions.c.created_at,
                *_LOGGED_STATE,
                decisions.c.amount,
                decisions.c.fallback,
                decisions.c.shadow,
                decisions.c.model_versions,
                outcomes.c.outcome,
                outcomes.c.reward,
                outcomes.c.imputed,
            )
            .select_from(_WITH_OUTCOMES)
            .order_by(decisions.c.created_at, decisions.c.id)
        )
        query = query.where(*decided_between(self.engine, since, until))
        with self.engine.connect() as connection:
            return list(connection.execution_options(yield_per=5000).execute(query).mappings())

    # --- reports (reporting/data.py)
    def _in_range(self, since: datetime, until: datetime) -> sa.ColumnElement[bool]:
        return sa.and_(*decided_between(self.engine, since, until))

    def report_rows(self, since: datetime, until: datetime) -> Iterator[Any]:
        """The decisions of ``[since, until)`` in time order, streamed (a few columns per row: created_at,
        action, latency_ms, risk, decided_by, fallback, rules_fired; ~1M rows fit in ~50 MB)."""
        query = (
            sa.select(
                decisions.c.created_at,
                decisions.c.action,
                decisions.c.latency_ms,
                decisions.c.risk,
                decisions.c.decided_by,
                decisions.c.fallback,
                decisions.c.rules_fired,
            )
            .where(self._in_range(since, until))
            .order_by(decisions.c.created_at)
        )
        with self.engine.connect() as connection:
            yield from connection.execution_options(yield_per=10_000).execute(query)

    def outcome_totals(self, since: datetime, until: datetime) -> list[tuple[str, int, float]]:
        """(outcome, count, mean reward) of the outcomes of the decisions made in ``[since, until)``."""
        query = (
            sa.select(outcomes.c.outcome, sa.func.count(), sa.func.avg(outcomes.c.reward))
            .select_from(outcomes.join(decisions, outcomes.c.decision_id == decisions.c.id))
            .where(self._in_range(since, until))
            .group_by(outcomes.c.outcome)
        )
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query).all()]
