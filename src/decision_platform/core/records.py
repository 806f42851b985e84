"""The decision record: what a decision is, typed, from the engine to the API and the database.

One record per decision; its fields are exactly the columns of the ``decisions`` table (a test keeps them
equal), so storage maps it with :meth:`DecisionRecord.to_row` / :meth:`DecisionRecord.from_row` and the
API's answer is derived from it in one place (:meth:`DecisionRecord.response`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from decision_platform.core.actions import ACTION_NAMES

#: Where a decision ended up once durable (what the writer answers for each row).
STORED = "stored"
SPOOLED = "spooled"  # in the local spool, on its way to the database
DUPLICATE = "duplicate"  # its event was decided before (stored or spooled): nothing was written
#: Not a group-commit status: the engine's answer when the decision log holds the event's id for another
#: entity's event (ids must be unique across entities). Nothing was written; the request is refused.
ID_TAKEN = "id_taken"
#: Likewise, when the log holds the id for an event of the same entity with other content (amount, type or
#: attributes): not a retry but another event under a used id. It was answered with the first event's
#: decision, and neither decided nor counted itself -- accepted and lost. Refused instead.
ID_REUSED = "id_reused"
#: Likewise, when the log holds the event's first decision stored damaged (a hand edit, an older version:
#: an action of 3 ...). That row cannot be the answer -- it is not what the platform decided -- and deciding
#: the event again would decide it twice (and count it twice in the windows). Refused, naming the damage.
FIRST_DAMAGED = "first_damaged"
#: The engine's answers that refuse the request.
REFUSED = frozenset({ID_TAKEN, ID_REUSED, FIRST_DAMAGED})


def id_taken_message(event_id: str) -> str:
    """What a refused event is told (409 detail, dead letter): the same words on every path."""
    return f"event_id {event_id!r} is already the id of another entity's event: ids must be unique"


def refusal_message(storage: str, event_id: str, damage: str = "") -> str:
    """What an event refused with ``storage`` (one of REFUSED) is told, on every path; ``damage``: what is
    wrong with its first decision (FIRST_DAMAGED)."""
    if storage == FIRST_DAMAGED:
        return f"event_id {event_id!r} was decided before, but {damage}: the event is not decided again"
    if storage == ID_REUSED:
        return (
            f"event_id {event_id!r} is already the id of another event of this entity (a retry must resend "
            "the same amount, event_type and attributes): ids must be unique"
        )
    return id_taken_message(event_id)


#: What the group commit answers for one row of a batch: one of the above, or why it is not durable.
RowStatus = str | BaseException


@dataclass(slots=True)
class DecisionRecord:
    id: int  # app-generated, time-ordered 64-bit (core/ids.py)
    entity_id: str
    event_id: str | None
    created_at: datetime
    #: The exact vector the models saw: the point-in-time training row.
    features: dict[str, float]
    amount: float | None
    anomaly: float | None  # None: the decision fell back before scoring
    risk: float | None
    probabilities: list[float] | None  # the policy's, before rules
    proposed_action: int | None
    action_mask: list[bool]  # which actions the rules allowed
    action: int
    #: Probability with which ``action`` was chosen: what off-policy evaluation needs.
    propensity: float
    decided_by: str  # policy | rule | fallback
    rules_fired: list[dict[str, Any]]
    fallback: str | None
    model_versions: dict[str, str]
    reasons: list[dict[str, Any]]
    explanation: str
    explanation_source: str
    latency_ms: float  # time to decide, before storage
    event_type: str | None
    attributes: dict[str, Any] | None
    #: A shadow policy's choice on the same state ({"version", "action", "probabilities"}); never applied.
    shadow: dict[str, Any] | None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return _FIELD_NAMES

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DecisionRecord:
        """From a stored row (database or spool); a column an older row lacks is None."""
        return cls(**{name: row.get(name) for name in _FIELD_NAMES})

    def to_row(self) -> dict[str, Any]:
        """The row to store: one key per column of ``decisions``."""
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    def response(self, latency_ms: float | None = None) -> dict[str, Any]:
        """The ``POST /decide`` answer (``latency_ms``: end to end, storage included, when known)."""
        return {
            "decision_id": self.id,
            "entity_id": self.entity_id,
            "action": self.action,
            "action_name": ACTION_NAMES[self.action],
            "risk": self.risk,
            "anomaly": self.anomaly,
            "explanation": self.explanation,
            "reasons": self.reasons,
            "rules": self.rules_fired,
            "fallback": self.fallback,
            "policy": {
                "proposed_action": self.proposed_action,
                "probabilities": self.probabilities,
                "propensity": self.propensity,
                "decided_by": self.decided_by,
            },
            "model_versions": self.model_versions,
            "latency_ms": round(self.latency_ms if latency_ms is None else latency_ms, 3),
        }


#: Computed once: ``dataclasses.fields`` on every row was 1.4% of a decision batch (cProfile).
_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(DecisionRecord))
