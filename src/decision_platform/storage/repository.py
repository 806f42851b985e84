"""All reads and writes of decisions, outcomes, explanations and model records go through here.

``Repository`` is the one object callers hold; its methods live in one store per concern, which share
its engine:

- :class:`~decision_platform.storage.decisions.DecisionStore` (decisions.py): decisions, shadow
  decisions, the logged decisions learning reads and the ranges reports read;
- :class:`~decision_platform.storage.outcomes.OutcomeStore` (outcomes.py): reported and imputed outcomes;
- :class:`~decision_platform.storage.explanations.ExplanationStore` (explanations.py): LLM narratives;
- :class:`~decision_platform.storage.models.ModelStore` (models.py): the model registry's records;
- :class:`~decision_platform.storage.review.ReviewStore` (review.py): the analyst console's queue,
  timelines and rule-backtest rows.
"""

from __future__ import annotations

import sqlalchemy as sa

from decision_platform.storage.decisions import DecisionRow, DecisionStore
from decision_platform.storage.explanations import ExplanationStore
from decision_platform.storage.models import ModelStore
from decision_platform.storage.outcomes import OutcomeResult, OutcomeStatus, OutcomeStore
from decision_platform.storage.review import ReviewStore

__all__ = ["DecisionRow", "OutcomeResult", "OutcomeStatus", "Repository"]


class Repository(DecisionStore, OutcomeStore, ExplanationStore, ModelStore, ReviewStore):
    """Thin data access over one SQLAlchemy engine (PostgreSQL or SQLite)."""

    def ping(self) -> None:
        """One round trip: raises if the database does not answer."""
        with self.engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
