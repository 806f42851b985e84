"""The scoring chain: features -> anomaly -> risk -> policy state -> action probabilities.

Every place that scores rows the way serving does (off-policy evaluation, retraining, the champion vs.
shadow comparison) goes through this one object, so the order of the stages and what each one sees
cannot drift apart. The serving engine runs the same stages one at a time (serving/engine.py), because
it times each stage, falls back per stage, and computes the risk together with its attributions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from decision_platform.models.anomaly import AnomalyModel
from decision_platform.models.baseline_policy import Policy
from decision_platform.models.policy import serving_distribution
from decision_platform.models.risk import RiskModel


@dataclass(frozen=True)
class ChainScores:
    anomaly: np.ndarray  # (n,)
    risk_inputs: np.ndarray  # (n, features + 1): what the risk model reads
    risk: np.ndarray  # (n,) P(bad)
    states: np.ndarray  # (n, state): what the policy reads


@dataclass(frozen=True)
class ScoringChain:
    """The three models that decide together (a champion set, or a candidate set)."""

    anomaly: AnomalyModel
    risk: RiskModel
    policy: Policy

    def score(self, features: np.ndarray) -> ChainScores:
        """Every intermediate score for rows of features."""
        anomaly = self.anomaly.score(features)
        inputs = RiskModel.inputs(features, anomaly)
        risk = self.risk.predict(inputs)
        return ChainScores(anomaly, inputs, risk, self.policy.state(features, anomaly, risk))

    def scores(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(anomaly, risk, policy state) for rows of features."""
        chain = self.score(features)
        return chain.anomaly, chain.risk, chain.states

    def serving_probabilities(
        self, features: np.ndarray, masks: np.ndarray, floor: float, explore_actions: tuple[int, ...]
    ) -> np.ndarray:
        """(n, 3): the distribution these models would sample from on each logged decision."""
        raw = self.policy.probabilities(self.score(features).states)
        return np.array(
            [serving_distribution(p, m, floor, explore_actions) for p, m in zip(raw, masks, strict=True)]
        )
