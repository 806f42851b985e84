"""Explanations: the LLM narrative of a decision, written once."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from decision_platform.storage.sql import Store
from decision_platform.storage.tables import explanations


class ExplanationStore(Store):
    """Reads and writes of ``tables.explanations``."""

    def get_explanation(self, decision_id: int) -> dict[str, Any] | None:
        return self._first(sa.select(explanations).where(explanations.c.decision_id == decision_id))

    def insert_explanation(self, row: dict[str, Any]) -> bool:
        """Store a narrative; False if the decision already has one (another process wrote it first)."""
        try:
            with self.engine.begin() as connection:
                connection.execute(explanations.insert().values(**row))
        except IntegrityError:
            return False
        return True
