"""Reads of the analyst console: the review queue, an entity's timeline, and the rows a rule backtest replays.

The queue is paged on the database by **keyset** on the time-ordered decision id (``id < cursor ORDER BY id
DESC LIMIT n``), never OFFSET: page 1000 costs what page 1 costs, and a decision arriving meanwhile does
not shift the pages. Time ranges become id ranges too (core/ids.py: the id starts with its millisecond), so
every page walks the primary key.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from decision_platform.storage.sql import Store, id_at, is_postgresql, parsed_json
from decision_platform.storage.tables import decisions, outcomes

#: Columns a queue row shows (the features snapshot and the reasons stay on the decision page).
_QUEUE_COLUMNS = (
    decisions.c.id,
    decisions.c.entity_id,
    decisions.c.created_at,
    decisions.c.amount,
    decisions.c.event_type,
    decisions.c.risk,
    decisions.c.anomaly,
    decisions.c.action,
    decisions.c.decided_by,
    decisions.c.fallback,
    decisions.c.rules_fired,
)


@dataclass(frozen=True)
class QueueFilter:
    """What the review queue shows; every field optional but ``actions``. Validated by the caller."""

    actions: tuple[int, ...] = (1, 2)
    since: datetime | None = None
    until: datetime | None = None
    rule: str | None = None
    risk_min: float | None = None
    risk_max: float | None = None
    entity_id: str | None = None
    #: Only decisions with no reported outcome (an imputed placeholder counts as none).
    unlabelled: bool = False


class ReviewStore(Store):
    """The console's reads (storage/repository.py mixes it into ``Repository``)."""

    def review_queue(
        self, where: QueueFilter, before_id: int | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` decisions matching ``where``, newest first, with an id below ``before_id`` (the
        previous page's last id: the keyset cursor); each with its reported ``outcome`` (None without)."""
        labelled = sa.and_(outcomes.c.decision_id == decisions.c.id, outcomes.c.imputed.is_(False))
        query = (
            sa.select(*_QUEUE_COLUMNS, outcomes.c.outcome, outcomes.c.reward)
            .select_from(decisions.outerjoin(outcomes, labelled))
            .where(decisions.c.action.in_(list(where.actions)))
            .order_by(decisions.c.id.desc())
            .limit(limit)
        )
        if before_id is not None:
            query = query.where(decisions.c.id < before_id)
        if where.since is not None:
            query = query.where(decisions.c.id >= id_at(where.since))
        if where.until is not None:
            query = query.where(decisions.c.id < id_at(where.until))
        if where.entity_id:
            query = query.where(decisions.c.entity_id == where.entity_id)
        if where.risk_min is not None:
            query = query.where(decisions.c.risk >= where.risk_min)
        if where.risk_max is not None:
            query = query.where(decisions.c.risk <= where.risk_max)
        if where.unlabelled:
            query = query.where(outcomes.c.decision_id.is_(None))
        if where.rule:
            query = query.where(self._rule_fired(where.rule))
        return self._all(query)

    def _rule_fired(self, rule: str) -> sa.ColumnElement[bool]:
        """``rules_fired`` (a JSON list of ``{"name": ...}``) names ``rule``."""
        if is_postgresql(self.engine):
            # jsonb containment: one bound JSON value, no string building.
            return decisions.c.rules_fired.op("@>")(
                sa.func.jsonb_build_array(sa.func.jsonb_build_object("name", rule))
            )
        # Only objects have a name: json_extract of another element (a row a hand edit left, e.g. a list of
        # strings) raised "malformed JSON", which took the database for down. CASE fixes the order. Text
        # that is not JSON at all is read as no rule (parsed_json).
        rules = parsed_json(self.engine, decisions.c.rules_fired)
        fired = sa.func.json_each(rules).table_valued("value", "type").alias("fired")
        name = sa.case((fired.c.type == "object", sa.func.json_extract(fired.c.value, "$.name")))
        return sa.exists(sa.select(sa.literal(1)).select_from(fired).where(name == rule))

    def entity_timeline(self, entity_id: str, around_id: int, limit: int = 20) -> list[dict[str, Any]]:
        """The entity's ``limit`` decisions up to and including ``around_id``, newest first, plus the ones
        after it (up to 5): the decision page's timeline."""
        columns = (
            decisions.c.id,
            decisions.c.created_at,
            decisions.c.action,
            decisions.c.risk,
            decisions.c.amount,
            decisions.c.decided_by,
        )
        before = (
            sa.select(*columns)
            .where(decisions.c.entity_id == entity_id, decisions.c.id <= around_id)
            .order_by(decisions.c.id.desc())
            .limit(limit)
        )
        after = (
            sa.select(*columns)
            .where(decisions.c.entity_id == entity_id, decisions.c.id > around_id)
            .order_by(decisions.c.id.asc())
            .limit(5)
        )
        return sorted(self._all(after) + self._all(before), key=lambda r: r["id"], reverse=True)

    def backtest_rows(
        self, since: datetime, until: datetime, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Decisions of ``[since, until)``, newest first, with what a rule backtest replays (the stored
        feature snapshot, scores, event fields, the logged mask and action) and the reported outcome
        (``outcome``/``reward`` None when there is none or it was only imputed). Streamed."""
        labelled = sa.and_(outcomes.c.decision_id == decisions.c.id, outcomes.c.imputed.is_(False))
        query = (
            sa.select(
                decisions.c.id,
                decisions.c.entity_id,
                decisions.c.features,
                decisions.c.amount,
                decisions.c.anomaly,
                decisions.c.risk,
                decisions.c.probabilities,
                decisions.c.action_mask,
                decisions.c.action,
                decisions.c.decided_by,
                decisions.c.fallback,
                decisions.c.rules_fired,
                decisions.c.event_type,
                decisions.c.attributes,
                outcomes.c.outcome,
                outcomes.c.reward,
            )
            .select_from(decisions.outerjoin(outcomes, labelled))
            .where(decisions.c.id >= id_at(since), decisions.c.id < id_at(until))
            .order_by(decisions.c.id.desc())
        )
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as connection:
            for row in connection.execution_options(yield_per=5000).execute(query).mappings():
                yield dict(row)
