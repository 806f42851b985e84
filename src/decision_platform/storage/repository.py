"""All reads and writes of decisions, outcomes and model records go through here."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.exc import IntegrityError

from decision_platform.storage.tables import decisions, explanations, models, outcomes

#: A decision row: the keys are the columns of ``tables.decisions``.
DecisionRow = dict[str, Any]

_DECISION_COLUMNS = [c.name for c in decisions.columns]
_JSON_COLUMNS = {c.name for c in decisions.columns if isinstance(c.type, sa.JSON)}
_INSERT_DECISION_SQL = (
    f"INSERT INTO decisions ({', '.join(_DECISION_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(_DECISION_COLUMNS))}) ON CONFLICT DO NOTHING RETURNING id"
)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class OutcomeStatus(enum.StrEnum):
    CREATED = "created"
    DUPLICATE = "duplicate"  # the same outcome again: idempotent success
    CONFLICT = "conflict"  # a different outcome was already recorded
    NOT_FOUND = "not_found"  # no such decision


@dataclass(frozen=True)
class OutcomeResult:
    status: OutcomeStatus
    outcome: str | None = None
    reward: float | None = None
    received_at: datetime | None = None


class Repository:
    """Thin data access over one SQLAlchemy engine (PostgreSQL or SQLite)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    # --- decisions
    def insert_decisions(self, rows: Sequence[DecisionRow]) -> set[int]:
        """Insert a batch in one transaction; returns the ids actually inserted.

        A row whose id or event_id is already stored is skipped, which makes replays (spool, Kafka
        redelivery, HTTP retries) idempotent; the caller can then fetch the stored decision instead.
        """
        if not rows:
            return set()
        if self.engine.dialect.name == "postgresql":
            return self._insert_decisions_postgresql(rows)
        from sqlalchemy.dialects.sqlite import insert

        statement = insert(decisions).on_conflict_do_nothing().returning(decisions.c.id)
        with self.engine.begin() as connection:
            params = [{c: row.get(c) for c in _DECISION_COLUMNS} for row in rows]
            return {row.id for row in connection.execute(statement, params)}

    def _insert_decisions_postgresql(self, rows: Sequence[DecisionRow]) -> set[int]:
        # psycopg's executemany pipelines one prepared statement: ~60 us a row here, against ~250 us for
        # SQLAlchemy's multi-VALUES statement, whose 20k placeholders psycopg must parse on every batch.
        # .get: rows spooled by an older version lack the newer (nullable) columns; None stays SQL NULL.
        params = [
            tuple(
                Jsonb(value, _dumps) if c in _JSON_COLUMNS and value is not None else value
                for c in _DECISION_COLUMNS
                for value in (row.get(c),)
            )
            for row in rows
        ]
        inserted: set[int] = set()
        with self.engine.begin() as connection:
            cursor = connection.connection.cursor()
            cursor.executemany(_INSERT_DECISION_SQL, params, returning=True)
            while True:
                inserted.update(r[0] for r in cursor.fetchall())
                if not cursor.nextset():
                    break
        return inserted

    def existing_ids(self, ids: Sequence[int]) -> set[int]:
        """Which of these decision ids are stored."""
        if not ids:
            return set()
        with self.engine.connect() as connection:
            query = sa.select(decisions.c.id).where(decisions.c.id.in_(list(ids)))
            return {row[0] for row in connection.execute(query)}

    def ping(self) -> None:
        """One round trip: raises if the database does not answer."""
        with self.engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))

    def get_decision_by_event(self, event_id: str) -> DecisionRow | None:
        with self.engine.connect() as connection:
            row = (
                connection.execute(sa.select(decisions).where(decisions.c.event_id == event_id))
                .mappings()
                .first()
            )
        return dict(row) if row else None

    def get_decision(self, decision_id: int) -> DecisionRow | None:
        with self.engine.connect() as connection:
            row = (
                connection.execute(sa.select(decisions).where(decisions.c.id == decision_id))
                .mappings()
                .first()
            )
        return dict(row) if row else None

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
            return [row[0] for row in connection.execute(query) if row[0]]

    # --- explanations (LLM narratives)
    def get_explanation(self, decision_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = (
                connection.execute(sa.select(explanations).where(explanations.c.decision_id == decision_id))
                .mappings()
                .first()
            )
        return dict(row) if row else None

    def insert_explanation(self, row: dict[str, Any]) -> bool:
        """Store a narrative; False if the decision already has one (another process wrote it first)."""
        try:
            with self.engine.begin() as connection:
                connection.execute(explanations.insert().values(**row))
        except IntegrityError:
            return False
        return True

    # --- outcomes
    def get_outcome(self, decision_id: int) -> OutcomeResult | None:
        with self.engine.connect() as connection:
            row = (
                connection.execute(sa.select(outcomes).where(outcomes.c.decision_id == decision_id))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return OutcomeResult(OutcomeStatus.DUPLICATE, row["outcome"], row["reward"], row["received_at"])

    def record_outcome(
        self, decision_id: int, outcome: str, reward: float, received_at: datetime | None = None
    ) -> OutcomeResult:
        """Store the first outcome of a decision; a repeat is idempotent, a different one a conflict.

        An imputed outcome (learning/outcomes.py) is only a placeholder: the real one replaces it.
        ``received_at``: when it was received, if earlier than now (an outcome replayed from the spool).
        """
        now = received_at or datetime.now(UTC)
        try:
            with self.engine.begin() as connection:
                exists = connection.execute(
                    sa.select(decisions.c.id).where(decisions.c.id == decision_id)
                ).first()
                if exists is None:
                    return OutcomeResult(OutcomeStatus.NOT_FOUND)
                replaced = connection.execute(
                    outcomes.update()
                    .where(outcomes.c.decision_id == decision_id, outcomes.c.imputed.is_(True))
                    .values(outcome=outcome, reward=reward, received_at=now, imputed=False)
                )
                if replaced.rowcount:
                    return OutcomeResult(OutcomeStatus.CREATED, outcome, reward, now)
                connection.execute(
                    outcomes.insert().values(
                        decision_id=decision_id, outcome=outcome, reward=reward, received_at=now
                    )
                )
            return OutcomeResult(OutcomeStatus.CREATED, outcome, reward, now)
        except IntegrityError:
            existing = self.get_outcome(decision_id)
            if existing is None:  # lost a race with a delete: should not happen, report as conflict
                return OutcomeResult(OutcomeStatus.CONFLICT)
            if existing.outcome == outcome:
                return existing
            return OutcomeResult(
                OutcomeStatus.CONFLICT, existing.outcome, existing.reward, existing.received_at
            )

    def insert_imputed_outcomes(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert imputed outcomes in one transaction; a decision that got a real one meanwhile keeps it."""
        if not rows:
            return
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        with self.engine.begin() as connection:
            connection.execute(insert(outcomes).on_conflict_do_nothing(), list(rows))

    # --- model registry
    def insert_model(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as connection:
            connection.execute(models.insert().values(**row))

    def list_models(self, kind: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(models).order_by(models.c.created_at.desc())
        if kind:
            query = query.where(models.c.kind == kind)
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query).mappings()]

    def get_model(self, version: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(models).where(models.c.version == version)).mappings().first()
        return dict(row) if row else None

    def champion(self, kind: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = (
                connection.execute(
                    sa.select(models).where(models.c.kind == kind, models.c.status == "champion")
                )
                .mappings()
                .first()
            )
        return dict(row) if row else None

    def promote(self, version: str) -> None:
        """Make ``version`` the champion of its kind; the previous champion becomes retired."""
        with self.engine.begin() as connection:
            kind = connection.execute(
                sa.select(models.c.kind).where(models.c.version == version)
            ).scalar_one()
            connection.execute(
                models.update()
                .where(models.c.kind == kind, models.c.status == "champion")
                .values(status="retired")
            )
            connection.execute(
                models.update()
                .where(models.c.version == version)
                .values(status="champion", promoted_at=datetime.now(UTC))
            )

    def serving_state(self) -> frozenset[tuple[str, str, str]]:
        """(status, kind, version) of every champion and shadow: the one small query that serving
        processes poll to notice a promotion made elsewhere (CLI, another API process, retraining)."""
        query = sa.select(models.c.status, models.c.kind, models.c.version).where(
            models.c.status.in_(("champion", "shadow"))
        )
        with self.engine.connect() as connection:
            return frozenset((r.status, r.kind, r.version) for r in connection.execute(query))

    def serving_records(self) -> list[dict[str, Any]]:
        """Every champion and shadow record, read together so that a reload sees one registry state."""
        query = sa.select(models).where(models.c.status.in_(("champion", "shadow")))
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query).mappings()]

    def shadow(self, kind: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = (
                connection.execute(
                    sa.select(models).where(models.c.kind == kind, models.c.status == "shadow")
                )
                .mappings()
                .first()
            )
        return dict(row) if row else None

    def rollback_target(self, kind: str) -> dict[str, Any] | None:
        """The retired version of ``kind`` promoted most recently (a rolled-back one has no promoted_at)."""
        query = (
            sa.select(models)
            .where(models.c.kind == kind, models.c.status == "retired", models.c.promoted_at.is_not(None))
            .order_by(models.c.promoted_at.desc())
            .limit(1)
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).mappings().first()
        return dict(row) if row else None

    def rollback(self, plan: dict[str, tuple[str | None, str]]) -> bool:
        """Apply ``{kind: (current champion or None, version to restore)}`` in one transaction.

        The rolled-back champion is retired with its promoted_at cleared: its promotion is undone, so a
        second rollback steps further back instead of returning to it. The restored version's promoted_at
        becomes now. Returns False, changing nothing, if any champion is no longer the one planned for
        (another process promoted meanwhile).
        """
        now = datetime.now(UTC)
        with self.engine.begin() as connection:
            for kind, (current, _) in plan.items():
                found = connection.execute(
                    sa.select(models.c.version).where(models.c.kind == kind, models.c.status == "champion")
                ).scalar_one_or_none()
                if found != current:
                    return False
            for current, target in plan.values():
                if current is not None:
                    connection.execute(
                        models.update()
                        .where(models.c.version == current)
                        .values(status="retired", promoted_at=None)
                    )
                connection.execute(
                    models.update()
                    .where(models.c.version == target, models.c.status == "retired")
                    .values(status="champion", promoted_at=now)
                )
        return True

    def set_shadow(self, version: str) -> tuple[bool, str | None]:
        """Make ``version`` the shadow of its kind, unless it is the champion; the previous shadow goes
        back to challenger. Returns (done, previous shadow's version)."""
        with self.engine.begin() as connection:
            kind = connection.execute(
                sa.select(models.c.kind).where(models.c.version == version)
            ).scalar_one()
            previous = connection.execute(
                sa.select(models.c.version).where(
                    models.c.kind == kind, models.c.status == "shadow", models.c.version != version
                )
            ).scalar_one_or_none()
            done = connection.execute(
                models.update()
                .where(models.c.version == version, models.c.status != "champion")
                .values(status="shadow")
            ).rowcount
            if not done:
                return False, None
            if previous is not None:
                connection.execute(
                    models.update().where(models.c.version == previous).values(status="challenger")
                )
        return True, previous

    def clear_shadow(self, kind: str) -> str | None:
        """The shadow of ``kind`` goes back to challenger; returns its version (None: there was none)."""
        with self.engine.begin() as connection:
            version = connection.execute(
                sa.select(models.c.version).where(models.c.kind == kind, models.c.status == "shadow")
            ).scalar_one_or_none()
            if version is not None:
                connection.execute(
                    models.update().where(models.c.version == version).values(status="challenger")
                )
        return version

    # --- shadow decisions (learning/compare.py)
    def shadow_decisions(self, since: datetime | None = None, limit: int | None = None) -> list[DecisionRow]:
        """Decisions that logged a shadow policy's choice, newest first, each with its outcome's ``reward``
        and ``imputed`` flag (both None when no outcome has arrived)."""
        # SQLite stores a Python None in a JSON column as the JSON text 'null', PostgreSQL (psycopg path)
        # as SQL NULL: asking for a JSON object covers both.
        json_type = sa.func.jsonb_typeof if self.engine.dialect.name == "postgresql" else sa.func.json_type
        query = (
            sa.select(
                decisions.c.id,
                decisions.c.created_at,
                decisions.c.features,
                decisions.c.anomaly,
                decisions.c.risk,
                decisions.c.probabilities,
                decisions.c.action_mask,
                decisions.c.action,
                decisions.c.propensity,
                decisions.c.decided_by,
                decisions.c.model_versions,
                decisions.c.shadow,
                outcomes.c.reward,
                outcomes.c.imputed,
            )
            .select_from(decisions.outerjoin(outcomes, outcomes.c.decision_id == decisions.c.id))
            .where(json_type(decisions.c.shadow) == "object")
            .order_by(decisions.c.id.desc())
        )
        if since is not None:
            query = query.where(decisions.c.created_at >= since)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query).mappings()]
