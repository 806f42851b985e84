"""Table definitions (SQLAlchemy Core). Alembic migrations create them; see storage/migrations.

On PostgreSQL ``decisions`` is range-partitioned on its id by day (migration 0005, storage/partitions.py)
and "one decision per event" lives in ``decision_events``; SQLite keeps the one table described here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

#: JSONB on PostgreSQL (indexable, compact), JSON text elsewhere.
Json = sa.JSON().with_variant(JSONB(), "postgresql")


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A time stored in UTC and read back with its zone on every backend.

    SQLite keeps no zone: a time read back there was naive, and the API answered it without an offset
    (``GET /decisions/{id}`` created_at, a repeated ``POST /outcome``'s received_at) -- which clients read
    as their own local time. Aware times are stored as UTC; naive ones read back as UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def __init__(self, unreadable_as_none: bool = False) -> None:
        """``unreadable_as_none``: a stored text no time reads from (SQLite: a hand edit's 'yesterday') is
        None instead of the driver's ValueError -- for the registry, whose every read that raised stopped
        the server's start."""
        super().__init__()
        self.unreadable_as_none = unreadable_as_none

    def result_processor(self, dialect: sa.Dialect, coltype: object) -> Any:
        process = super().result_processor(dialect, coltype)
        if process is None or not self.unreadable_as_none:
            return process

        def lenient(value: Any) -> Any:
            try:
                return process(value)
            except ValueError:
                return None

        return lenient

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if isinstance(value, datetime) and value.tzinfo is not None and dialect.name == "sqlite":
            return value.astimezone(UTC)  # SQLite would store the local clock reading, dropping the zone
        return value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("entity_id", sa.String(128), nullable=False, index=True),
    # One decision per event, so redelivered events are idempotent: a unique index on SQLite (migration
    # 0002), the decision_events claim on partitioned PostgreSQL (migration 0005).
    sa.Column("event_id", sa.String(128), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False, index=True),
    # The exact vector the models saw: the point-in-time training row.
    sa.Column("features", Json, nullable=False),
    sa.Column("amount", sa.Float, nullable=True),
    sa.Column("anomaly", sa.Float, nullable=True),
    sa.Column("risk", sa.Float, nullable=True),
    sa.Column("probabilities", Json, nullable=True),
    sa.Column("proposed_action", sa.SmallInteger, nullable=True),
    sa.Column("action_mask", Json, nullable=False),
    sa.Column("action", sa.SmallInteger, nullable=False),
    # Probability with which the final action was chosen: what off-policy evaluation needs.
    sa.Column("propensity", sa.Float, nullable=False),
    sa.Column("decided_by", sa.String(16), nullable=False),
    sa.Column("rules_fired", Json, nullable=False),
    sa.Column("fallback", sa.String(64), nullable=True),
    sa.Column("model_versions", Json, nullable=False),
    sa.Column("reasons", Json, nullable=False),
    sa.Column("explanation", sa.Text, nullable=False),
    sa.Column("explanation_source", sa.String(16), nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    # The event as received (migration 0004): quoted by explanations as data, never interpreted.
    sa.Column("event_type", sa.String(64), nullable=True),
    sa.Column("attributes", Json, nullable=True),
    # A shadow policy's choice on the same state: {"version", "action", "probabilities"}; never applied.
    sa.Column("shadow", Json, nullable=True),
)

outcomes = sa.Table(
    "outcomes",
    metadata,
    sa.Column("decision_id", sa.BigInteger, sa.ForeignKey("decisions.id"), primary_key=True),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("reward", sa.Float, nullable=False),
    sa.Column("received_at", UtcDateTime(), nullable=False),
    # True: no outcome arrived within the horizon; the reward (or label) was imputed (learning/outcomes.py).
    sa.Column("imputed", sa.Boolean, nullable=False, server_default=sa.false()),
)

sa.Index("ux_decisions_event_id", decisions.c.event_id, unique=True)

#: PostgreSQL only (migration 0005): which decision holds each event id. A BEFORE INSERT trigger on
#: ``decisions`` claims the event id and skips a row whose event another decision already holds, because a
#: partitioned table cannot have a unique index without its partition key (the id).
decision_events = sa.Table(
    "decision_events",
    metadata,
    sa.Column("event_id", sa.String(128), primary_key=True),
    sa.Column("decision_id", sa.BigInteger, nullable=False, index=True),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False, index=True),
    sa.Column("artifact_path", sa.Text, nullable=False),
    sa.Column("artifact_sha256", sa.String(64), nullable=False),
    sa.Column("data_window", Json, nullable=False),
    sa.Column("metrics", Json, nullable=False),
    # champion | challenger | shadow | retired
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime(unreadable_as_none=True), nullable=False),
    sa.Column("promoted_at", UtcDateTime(unreadable_as_none=True), nullable=True),
)

#: LLM narratives (explain/narrator.py), written once per decision off the hot path (migration 0003).
#: No foreign key on purpose: a decision may still sit in the local spool when its narrative is written.
explanations = sa.Table(
    "explanations",
    metadata,
    sa.Column("decision_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("narrative", sa.Text, nullable=False),
    # llm | template (the LLM's narratives failed the grounding check twice)
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("model", sa.String(200), nullable=True),
    sa.Column("prompt_version", sa.String(32), nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    # {"passed": bool, "attempts": n, "problems": [...], "rejected": [narratives refused]}
    sa.Column("grounding", Json, nullable=False),
    # The exact facts the narrative was written from: what an auditor checks it against.
    sa.Column("facts", Json, nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
)
