"""The event claim trigger claims an event only for a decision whose id is free.

Migration 0005's trigger claimed the event (``decision_events``) before the row met the primary key. When
the id was already another decision's -- two processes that made the same id: a node id shared across
hosts, or a restart with the clock gone back (core/ids.py) -- ``ON CONFLICT DO NOTHING`` skipped the row
but the claim stayed, naming the *other* decision: the event's retry was then skipped as a duplicate and
answered with another entity's decision. Now a row whose id already holds an event's claim is skipped
before its own event is claimed: one index probe of ``decision_events(decision_id)`` a row. (The same probe
of ``decisions`` itself, the partitioned table, made a 500-row batch insert ~1.8x slower; the claims table
knows every stored decision with an event, and every decision the platform makes has one.)

Left by design: an id taken by a decision without an event (none since events carry ids), or two processes
inserting the same id at the same instant, neither committed, can still leave the loser's claim; the latter
needs the same millisecond, node number and sequence.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: The trigger function, with or without the id check (0005's function is the one without).
CLAIM_EVENT = """
CREATE OR REPLACE FUNCTION decisions_claim_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.event_id IS NULL THEN
    RETURN NEW;
  END IF;{id_check}
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
ID_CHECK = """
  -- The id is stored: this decision replayed, or another one made under the same id. Skip the row (the
  -- primary key would) without claiming its event for the decision that holds the id.
  PERFORM 1 FROM decision_events WHERE decision_id = NEW.id;
  IF FOUND THEN
    RETURN NULL;
  END IF;"""
CLAIM_FREE_IDS = CLAIM_EVENT.format(id_check=ID_CHECK)
CLAIM_ANY_ID = CLAIM_EVENT.format(id_check="")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CLAIM_FREE_IDS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CLAIM_ANY_ID)
