"""Recording what happened after a decision: the rules of ``POST /outcome`` (and of anything else that
labels decisions, such as a review console), in one place.

An outcome must be in the vocabulary of config/rewards.yaml and possible after the action taken (no
"success" for a blocked payment); the first outcome of a decision is final (a different one is a
conflict, the same one again is idempotent). The reward comes from rewards.yaml, given the action and
the decision's amount. Decisions still in the local spool take outcomes too (storage/writer.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from decision_platform.core.actions import ACTION_NAMES
from decision_platform.core.rewards import RewardTable
from decision_platform.observability import metrics
from decision_platform.storage.decisions import intact
from decision_platform.storage.repository import OutcomeStatus
from decision_platform.storage.writer import DecisionWriter


class OutcomeError(Exception):
    """An outcome that cannot be recorded; the message says why (shown to the caller as is)."""


class UnknownOutcomeError(OutcomeError):
    """Not in rewards.yaml's vocabulary, or impossible after the action taken (API: 422)."""


class UnknownDecisionError(OutcomeError):
    """No such decision, neither in the database nor in the spool (API: 404)."""


class OutcomeConflictError(OutcomeError):
    """The decision already has a different outcome: outcomes are final (API: 409)."""


@dataclass(frozen=True)
class RecordedOutcome:
    decision_id: int
    outcome: str
    reward: float
    received_at: datetime | None
    #: False when this exact outcome had already been recorded (an idempotent repeat).
    created: bool


def record_outcome(
    writer: DecisionWriter, rewards: RewardTable, decision_id: int, outcome: str
) -> RecordedOutcome:
    """Check, price and store one outcome; raises an :class:`OutcomeError` (or ``DatabaseUnavailable``), or
    ``DamagedDecisionError`` for a stored decision whose action or amount the platform never writes: it
    cannot be priced, and is refused (API: 409) rather than stored with a reward of inf or NaN."""
    if outcome not in rewards.outcomes:
        raise UnknownOutcomeError(f"unknown outcome {outcome!r}; expected one of {rewards.outcome_names}")
    decision = writer.find_decision(decision_id)  # the spool first, then the database
    if decision is None:
        raise UnknownDecisionError(f"no decision {decision_id}")
    action = intact(decision, "outcome", ("action", "amount")).action
    if not rewards.possible(outcome, action):
        possible = [name for name in rewards.outcomes if rewards.possible(name, action)]
        raise UnknownOutcomeError(
            f"outcome {outcome!r} cannot follow a decision to {ACTION_NAMES[action]}; "
            f"expected one of {possible}"
        )
    reward = rewards.reward(outcome, action, decision.amount)
    result = writer.record_outcome(decision_id, outcome, reward)
    if result.status is OutcomeStatus.NOT_FOUND:
        raise UnknownDecisionError(f"no decision {decision_id}")
    if result.status is OutcomeStatus.CONFLICT:
        raise OutcomeConflictError(
            f"decision {decision_id} already has outcome {result.outcome!r}; outcomes are final"
        )
    created = result.status is OutcomeStatus.CREATED
    if created:
        metrics.OUTCOMES.labels(outcome=outcome, action=metrics.action_label(action)).inc()
        metrics.observe_reward(reward)
    assert result.outcome is not None and result.reward is not None
    return RecordedOutcome(decision_id, result.outcome, result.reward, result.received_at, created)
