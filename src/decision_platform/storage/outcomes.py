"""Outcomes: the first one reported for a decision, idempotent repeats, and imputed placeholders."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from decision_platform.storage.sql import Store, decided_between, insert_ignoring_conflicts
from decision_platform.storage.tables import decisions, outcomes


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
    #: A placeholder of the learning loop (learning/outcomes.py), not a reported outcome: one replaces it.
    imputed: bool = False


class OutcomeStore(Store):
    """Reads and writes of ``tables.outcomes``."""

    def get_outcome(self, decision_id: int) -> OutcomeResult | None:
        row = self._first(sa.select(outcomes).where(outcomes.c.decision_id == decision_id))
        if row is None:
            return None
        return OutcomeResult(
            OutcomeStatus.DUPLICATE, row["outcome"], row["reward"], row["received_at"], bool(row["imputed"])
        )

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

    def decisions_without_outcome(
        self, before: datetime
    ) -> list[tuple[int, int, float | None, float | None]]:
        """(id, action, risk, amount) of every decision made before ``before`` that has no outcome yet
        (learning/outcomes.py imputes one)."""
        query = (
            sa.select(decisions.c.id, decisions.c.action, decisions.c.risk, decisions.c.amount)
            .select_from(decisions.outerjoin(outcomes, outcomes.c.decision_id == decisions.c.id))
            .where(outcomes.c.decision_id.is_(None), *decided_between(self.engine, until=before))
        )
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]

    def insert_imputed_outcomes(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert imputed outcomes in one transaction; a decision that got a real one meanwhile keeps it."""
        if not rows:
            return
        with self.engine.begin() as connection:
            connection.execute(insert_ignoring_conflicts(self.engine, outcomes), list(rows))
