"""The decision log grows without bound: on PostgreSQL, ``decisions`` becomes range-partitioned by day.

Partition key: the decision **id**, which is time-ordered (its first 41 bits are its millisecond), so a
day is an id range (storage/partitions.py). A partitioned table's unique constraints must include the
partition key; with the id as key:

- the primary key ``(id)`` stays as it is, and so does the ``outcomes.decision_id`` foreign key
  (re-pointed at the partitioned table);
- "one decision per event" can no longer be a unique index on ``event_id`` (it would have to include the
  id, which makes it useless). It moves to ``decision_events(event_id PRIMARY KEY, decision_id)``, filled
  by a BEFORE INSERT trigger on ``decisions``: the trigger claims the event id and, if another decision
  already holds it, skips the row -- exactly what ``ON CONFLICT DO NOTHING`` did with the unique index,
  for INSERT and COPY alike, and still enforced by the database across concurrent writers.

Existing rows are kept: the old table becomes the partition ``decisions_legacy`` (ids up to the end of
the UTC day of its newest decision); an empty old table is simply replaced. ``decisions_default`` takes
ids no day partition covers. Day partitions are created ahead by the app (storage.database.migrate) and
by ``decision-platform db partitions``. SQLite keeps one table: nothing changes there.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from datetime import UTC, datetime, time, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

EPOCH_MS = 1_704_067_200_000  # core/ids.py (a migration is frozen: it does not import the app)
ID_SHIFT = 22

CLAIM_EVENT = """
CREATE FUNCTION decisions_claim_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.event_id IS NULL THEN
    RETURN NEW;
  END IF;
  INSERT INTO decision_events (event_id, decision_id) VALUES (NEW.event_id, NEW.id)
    ON CONFLICT (event_id) DO NOTHING;
  IF FOUND THEN
    RETURN NEW;
  END IF;
  -- The event already has a decision (this one replayed, or another one): skip the row, as the unique
  -- index on event_id did before partitioning.
  RETURN NULL;
END
$$
"""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE decisions RENAME TO decisions_legacy")
    op.execute("ALTER TABLE decisions_legacy RENAME CONSTRAINT decisions_pkey TO decisions_legacy_pkey")
    for index in ("ix_decisions_entity_id", "ix_decisions_created_at", "ux_decisions_event_id"):
        op.execute(f"ALTER INDEX {index} RENAME TO {index.replace('decisions', 'decisions_legacy')}")
    op.execute("ALTER TABLE outcomes DROP CONSTRAINT IF EXISTS outcomes_decision_id_fkey")

    op.execute("CREATE TABLE decisions (LIKE decisions_legacy INCLUDING DEFAULTS) PARTITION BY RANGE (id)")
    op.execute("ALTER TABLE decisions ADD CONSTRAINT decisions_pkey PRIMARY KEY (id)")
    op.execute("CREATE INDEX ix_decisions_entity_id ON decisions (entity_id)")
    op.execute("CREATE INDEX ix_decisions_created_at ON decisions (created_at)")
    # Not unique (see above): finds a decision by event where decision_events is not joined.
    op.execute("CREATE INDEX ix_decisions_event_id ON decisions (event_id)")

    op.execute(
        "CREATE TABLE decision_events (event_id VARCHAR(128) PRIMARY KEY, decision_id BIGINT NOT NULL)"
    )
    op.execute("CREATE INDEX ix_decision_events_decision_id ON decision_events (decision_id)")
    op.execute(
        "INSERT INTO decision_events (event_id, decision_id) "
        "SELECT event_id, id FROM decisions_legacy WHERE event_id IS NOT NULL"
    )
    op.execute(CLAIM_EVENT)
    op.execute(
        "CREATE TRIGGER decisions_claim_event BEFORE INSERT ON decisions "
        "FOR EACH ROW EXECUTE FUNCTION decisions_claim_event()"
    )

    newest = bind.execute(sa.text("SELECT max(id) FROM decisions_legacy")).scalar()
    if newest is None:
        op.execute("DROP TABLE decisions_legacy")
    else:
        made = datetime.fromtimestamp(((newest >> ID_SHIFT) + EPOCH_MS) / 1000, UTC)
        end = datetime.combine(made.date() + timedelta(days=1), time(), tzinfo=UTC)
        high = (int(end.timestamp() * 1000) - EPOCH_MS) << ID_SHIFT
        # The trigger applies to rows inserted from now on; the claims of the past rows were copied above.
        op.execute(
            f"ALTER TABLE decisions ATTACH PARTITION decisions_legacy FOR VALUES FROM (MINVALUE) TO ({high})"
        )
    op.execute("CREATE TABLE decisions_default PARTITION OF decisions DEFAULT")
    op.execute(
        "ALTER TABLE outcomes ADD CONSTRAINT outcomes_decision_id_fkey "
        "FOREIGN KEY (decision_id) REFERENCES decisions (id)"
    )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE outcomes DROP CONSTRAINT IF EXISTS outcomes_decision_id_fkey")
    op.execute("CREATE TABLE decisions_flat (LIKE decisions INCLUDING DEFAULTS)")
    op.execute("INSERT INTO decisions_flat SELECT * FROM decisions")
    op.execute("DROP TABLE decisions CASCADE")
    op.execute("DROP TABLE decision_events")
    op.execute("DROP FUNCTION decisions_claim_event()")
    op.execute("ALTER TABLE decisions_flat RENAME TO decisions")
    op.execute("ALTER TABLE decisions ADD CONSTRAINT decisions_pkey PRIMARY KEY (id)")
    op.execute("CREATE INDEX ix_decisions_entity_id ON decisions (entity_id)")
    op.execute("CREATE INDEX ix_decisions_created_at ON decisions (created_at)")
    op.execute("CREATE UNIQUE INDEX ux_decisions_event_id ON decisions (event_id)")
    op.execute(
        "ALTER TABLE outcomes ADD CONSTRAINT outcomes_decision_id_fkey "
        "FOREIGN KEY (decision_id) REFERENCES decisions (id)"
    )
