"""The learning loop and auditable facts: event data, shadow decisions and imputed outcomes.

- decisions.event_type / decisions.attributes: the event as received, so an explanation (and an auditor)
  can quote it later; attributes are stored as data, never interpreted.
- decisions.shadow: what a shadow policy would have done on the same state (logged, never applied).
- outcomes.imputed: the outcome did not arrive within the horizon (or the event was blocked), so its
  reward is the configured default or its label came from the risk model (learning/outcomes.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("event_type", sa.String(64), nullable=True))
        batch.add_column(sa.Column("attributes", Json, nullable=True))
        batch.add_column(sa.Column("shadow", Json, nullable=True))
    with op.batch_alter_table("outcomes") as batch:
        batch.add_column(sa.Column("imputed", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("outcomes") as batch:
        batch.drop_column("imputed")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("shadow")
        batch.drop_column("attributes")
        batch.drop_column("event_type")
