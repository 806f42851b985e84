"""Decisions, outcomes and the model registry.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "decisions",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("entity_id", sa.String(128), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("features", Json, nullable=False),
        sa.Column("amount", sa.Float, nullable=True),
        sa.Column("anomaly", sa.Float, nullable=True),
        sa.Column("risk", sa.Float, nullable=True),
        sa.Column("probabilities", Json, nullable=True),
        sa.Column("proposed_action", sa.SmallInteger, nullable=True),
        sa.Column("action_mask", Json, nullable=False),
        sa.Column("action", sa.SmallInteger, nullable=False),
        sa.Column("propensity", sa.Float, nullable=False),
        sa.Column("decided_by", sa.String(16), nullable=False),
        sa.Column("rules_fired", Json, nullable=False),
        sa.Column("fallback", sa.String(64), nullable=True),
        sa.Column("model_versions", Json, nullable=False),
        sa.Column("reasons", Json, nullable=False),
        sa.Column("explanation", sa.Text, nullable=False),
        sa.Column("explanation_source", sa.String(16), nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
    )
    op.create_index("ix_decisions_entity_id", "decisions", ["entity_id"])
    op.create_index("ix_decisions_event_id", "decisions", ["event_id"])
    op.create_index("ix_decisions_created_at", "decisions", ["created_at"])
    op.create_table(
        "outcomes",
        sa.Column("decision_id", sa.BigInteger, sa.ForeignKey("decisions.id"), primary_key=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("reward", sa.Float, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "models",
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("artifact_path", sa.Text, nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("data_window", Json, nullable=False),
        sa.Column("metrics", Json, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_models_kind", "models", ["kind"])


def downgrade() -> None:
    op.drop_table("models")
    op.drop_table("outcomes")
    op.drop_table("decisions")
