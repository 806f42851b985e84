"""One decision per event: makes redelivered events (Kafka, HTTP retries) idempotent.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_decisions_event_id", table_name="decisions")
    # NULLs (decisions without an event) never conflict, in PostgreSQL and SQLite alike.
    op.create_index("ux_decisions_event_id", "decisions", ["event_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_decisions_event_id", table_name="decisions")
    op.create_index("ix_decisions_event_id", "decisions", ["event_id"])
