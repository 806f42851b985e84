"""Outcomes that never arrive: imputed after a horizon, and marked so.

A decision whose outcome is still missing ``horizon_hours`` after it was made gets one:

- blocked events (nothing happened, so nobody reports anything): the label is imputed by the risk model
  the decision logged (bad if ``risk >= blocked_label_threshold``) and the reward is that of ``fraud`` or
  ``false_positive`` for a block;
- everything else: outcome ``no_outcome`` with the configured ``default_reward`` (Decision-Service style:
  "no news" is worth a known, configured amount). It gives the risk model no label.

Imputed rows are marked (``outcomes.imputed``); a real outcome that arrives later replaces its imputed one
(storage/outcomes.py), and the retraining report says how many of each it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from decision_platform.core.actions import BLOCK
from decision_platform.core.rewards import RewardTable
from decision_platform.learning.config import OutcomeSettings
from decision_platform.storage.repository import Repository

NO_OUTCOME = "no_outcome"


@dataclass(frozen=True)
class ImputationSummary:
    blocked_bad: int = 0  # blocked, risk model says bad: imputed "fraud"
    blocked_good: int = 0  # blocked, risk model says good: imputed "false_positive"
    default_reward: int = 0  # everything else: "no_outcome" with the default reward

    @property
    def total(self) -> int:
        return self.blocked_bad + self.blocked_good + self.default_reward


def impute_missing_outcomes(
    repository: Repository,
    rewards: RewardTable,
    settings: OutcomeSettings,
    now: datetime | None = None,
) -> ImputationSummary:
    """Give every decision older than the horizon that has no outcome an imputed one; returns the counts."""
    cutoff = (now or datetime.now(UTC)) - timedelta(hours=settings.horizon_hours)
    received_at = now or datetime.now(UTC)
    rows, counts = [], {"blocked_bad": 0, "blocked_good": 0, "default_reward": 0}
    for decision_id, action, risk, amount in repository.decisions_without_outcome(cutoff):
        if action == BLOCK and risk is not None:
            bad = risk >= settings.blocked_label_threshold
            outcome = "fraud" if bad else "false_positive"
            reward = rewards.reward(outcome, BLOCK, amount)
            counts["blocked_bad" if bad else "blocked_good"] += 1
        else:
            outcome, reward = NO_OUTCOME, settings.default_reward
            counts["default_reward"] += 1
        rows.append(
            {
                "decision_id": decision_id,
                "outcome": outcome,
                "reward": reward,
                "received_at": received_at,
                "imputed": True,
            }
        )
    repository.insert_imputed_outcomes(rows)
    return ImputationSummary(**counts)
