"""Logged decisions joined with their outcomes: the data the policy learns from and is judged on.

Every decision row carries the state the models saw (its point-in-time feature vector, anomaly, risk),
the champion's action probabilities, the rules' action mask, the action taken and the propensity with
which it was taken. Joined with outcomes (``POST /outcome``, or imputed: learning/outcomes.py) that is
exactly the off-policy data set of a contextual bandit: (state, action, propensity, reward).

Labels come from outcomes: ``fraud`` / ``chargeback`` are bad (1), ``success`` / ``abandoned`` /
``false_positive`` are good (0); a decision without a (known) outcome has no label (-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import numpy as np

from decision_platform.storage.decisions import intact_rows
from decision_platform.storage.repository import Repository

BAD_OUTCOMES = frozenset({"fraud", "chargeback"})
GOOD_OUTCOMES = frozenset({"success", "abandoned", "false_positive"})


def label_of(outcome: str | None) -> int:
    """1 bad, 0 good, -1 unknown (no outcome, or an outcome that says nothing about the label)."""
    if outcome in BAD_OUTCOMES:
        return 1
    if outcome in GOOD_OUTCOMES:
        return 0
    return -1


@dataclass(frozen=True)
class LoggedDecisions:
    """Column arrays of logged decisions in time order; row i of every array is the same decision."""

    feature_names: list[str]
    ids: np.ndarray  # int64
    entity_ids: np.ndarray  # object (str)
    created_at: np.ndarray  # float64, epoch seconds
    features: np.ndarray  # (n, k) float64, in feature_names order; NaN where a feature was not logged
    anomaly: np.ndarray  # float64, NaN when the decision fell back
    risk: np.ndarray  # float64, NaN when the decision fell back
    probabilities: np.ndarray  # (n, 3) the logging champion's raw probabilities, NaN when it fell back
    masks: np.ndarray  # (n, 3) bool: the actions the rules allowed
    actions: np.ndarray  # int64
    propensities: np.ndarray  # float64
    amounts: np.ndarray  # float64 (0 for decisions without an event)
    fell_back: np.ndarray  # bool
    outcomes: np.ndarray  # object: outcome name or None
    rewards: np.ndarray  # float64, NaN without an outcome
    imputed: np.ndarray  # bool: the outcome row was imputed, not reported
    labels: np.ndarray  # int8: 1 bad, 0 good, -1 unknown
    shadow: np.ndarray  # object: the shadow policy's logged choice (dict) or None
    policy_versions: np.ndarray  # object: the policy version that decided (None on fallback)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: np.ndarray) -> LoggedDecisions:
        """The rows selected by a boolean mask or an index array."""
        values: dict[str, Any] = {"feature_names": self.feature_names}
        for f in fields(self):
            if f.name != "feature_names":
                values[f.name] = getattr(self, f.name)[rows]
        return LoggedDecisions(**values)

    @property
    def has_reward(self) -> np.ndarray:
        return ~np.isnan(self.rewards)

    def summary(self) -> dict[str, int]:
        return {
            "decisions": len(self),
            "with_outcome": int(self.has_reward.sum()),
            "imputed": int(self.imputed.sum()),
            "imputed_labels": int((self.imputed & (self.labels >= 0)).sum()),
            "labelled": int((self.labels >= 0).sum()),
            "bad": int((self.labels == 1).sum()),
            "fell_back": int(self.fell_back.sum()),
        }


def load_logged(
    repository: Repository,
    feature_names: Sequence[str],
    since: datetime | None = None,
    until: datetime | None = None,
) -> LoggedDecisions:
    """Decisions made in ``[since, until)`` (all by default) left-joined with their outcomes, oldest first
    (read in one streaming pass: :meth:`Repository.logged_decisions`)."""
    rows = repository.logged_decisions(since, until)
    return from_rows(rows, feature_names)


def from_rows(rows: Sequence[Any], feature_names: Sequence[str]) -> LoggedDecisions:
    """Column arrays of joined rows (mappings with the columns of :meth:`Repository.logged_decisions`);
    a damaged row (storage.decisions.damaged) is skipped and counted."""
    rows = list(intact_rows(rows, "logged decisions"))
    names = list(feature_names)
    n = len(rows)
    nan3 = [np.nan] * 3

    def floats(key: str) -> np.ndarray:
        return np.array([np.nan if r[key] is None else float(r[key]) for r in rows], dtype=np.float64)

    features = np.array(
        [[float(r["features"].get(name, np.nan)) for name in names] for r in rows], dtype=np.float64
    ).reshape(n, len(names))
    outcome_names = np.array([r["outcome"] for r in rows], dtype=object)
    return LoggedDecisions(
        feature_names=names,
        ids=np.array([r["id"] for r in rows], dtype=np.int64),
        entity_ids=np.array([r["entity_id"] for r in rows], dtype=object),
        created_at=np.array([r["created_at"].timestamp() for r in rows], dtype=np.float64),
        features=features,
        anomaly=floats("anomaly"),
        risk=floats("risk"),
        probabilities=np.array([r["probabilities"] or nan3 for r in rows], dtype=np.float64).reshape(n, 3),
        masks=np.array([r["action_mask"] for r in rows], dtype=bool).reshape(n, 3),
        actions=np.array([r["action"] for r in rows], dtype=np.int64),
        propensities=np.array([r["propensity"] for r in rows], dtype=np.float64),
        amounts=np.nan_to_num(floats("amount")),
        fell_back=np.array([r["fallback"] is not None for r in rows], dtype=bool),
        outcomes=outcome_names,
        rewards=floats("reward"),
        imputed=np.array([bool(r["imputed"]) for r in rows], dtype=bool),
        labels=np.array([label_of(o) for o in outcome_names], dtype=np.int8),
        shadow=np.array([r["shadow"] for r in rows], dtype=object),
        policy_versions=np.array([(r["model_versions"] or {}).get("policy") for r in rows], dtype=object),
    )
