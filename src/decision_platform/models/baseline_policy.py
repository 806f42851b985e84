"""Baseline policies that can be served *as the policy*: fixed risk thresholds and Bayes minimum risk.

``train`` serves PPO only when it earns at least what the best baseline earns on held-out time;
otherwise it registers that baseline in the same ``policy`` artifact kind. A served baseline has the
interface of the PPO actor (``state``, ``probabilities``, ``state_names``, the same scaling), so the
engine masks it with the rules, adds the exploration floor and logs the propensity of the final action
exactly as it does for PPO, and shadowing and off-policy evaluation read it unchanged. Its probabilities
are one-hot (the baseline is deterministic); the floor alone makes the logged data explorable.

Allow-all is the threshold policy that never acts; "rules only" is allow-all served, since the rules
always apply on top of whatever policy is served.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from decision_platform.models.policy import (
    ACTOR,
    META,
    PPO_ACTOR,
    RISK_LOGIT,
    PolicyModel,
    expected_step_rewards,
    scaled_state,
    unscaled_feature,
)

THRESHOLDS = "thresholds"
BAYES = "bayes_minimum_risk"
#: A threshold above every risk: never throttle / block.
NEVER = 1.01


class Policy(Protocol):
    """What serving, shadowing, OPE and retraining need of a policy."""

    state_names: list[str]
    scaler_mean: np.ndarray
    scaler_std: np.ndarray

    def state(self, features: np.ndarray, anomaly: np.ndarray, risk: np.ndarray) -> np.ndarray: ...

    def probabilities(self, states: np.ndarray) -> np.ndarray: ...

    def save(self, directory: Path) -> None: ...


class _Scaled:
    """The state and scaling every served policy shares with the PPO actor."""

    def __init__(self, state_names: Sequence[str], scaler_mean: np.ndarray, scaler_std: np.ndarray) -> None:
        self.state_names = list(state_names)
        self.scaler_mean = np.asarray(scaler_mean, dtype=np.float64)
        self.scaler_std = np.asarray(scaler_std, dtype=np.float64)
        self.risk_index = self.state_names.index("risk")

    def state(self, features: np.ndarray, anomaly: np.ndarray, risk: np.ndarray) -> np.ndarray:
        return scaled_state(
            features, anomaly, risk, self.scaler_mean, self.scaler_std, RISK_LOGIT in self.state_names
        )

    def _save(self, directory: Path, meta: dict[str, Any]) -> None:
        directory = Path(directory)
        np.savez(directory / ACTOR, scaler_mean=self.scaler_mean, scaler_std=self.scaler_std)
        meta = {**meta, "state_names": self.state_names}
        (directory / META).write_text(json.dumps(meta, indent=2), "utf-8")


class ThresholdPolicy(_Scaled):
    """Throttle at risk >= ``throttle``, block at risk >= ``block`` (allow-all: both at :data:`NEVER`)."""

    def __init__(
        self,
        throttle: float,
        block: float,
        state_names: Sequence[str],
        scaler_mean: np.ndarray,
        scaler_std: np.ndarray,
        name: str = "",
    ) -> None:
        super().__init__(state_names, scaler_mean, scaler_std)
        self.throttle, self.block = float(throttle), float(block)
        self.name = name or f"risk thresholds {self.throttle:.3g}/{self.block:.3g}"

    def probabilities(self, states: np.ndarray) -> np.ndarray:
        risk = np.atleast_2d(states)[:, self.risk_index]
        action = np.where(risk >= self.block, 2, np.where(risk >= self.throttle, 1, 0))
        return np.eye(3)[action]

    def save(self, directory: Path) -> None:
        self._save(
            directory, {"type": THRESHOLDS, "name": self.name, "throttle": self.throttle, "block": self.block}
        )


class BayesPolicy(_Scaled):
    """Per event, the action with the highest expected reward given the calibrated risk and the amount:
    ``argmax_a (1 - risk) * good(a, amount) + risk * bad(a, amount)``, with ``good`` / ``bad`` linear in
    the amount (``RewardTable.expected_step_values``, frozen into the artifact at training time).

    This is the cost-sensitive Bayes-minimum-risk rule (Bahnsen et al.): instance-dependent thresholds,
    a large payment is stepped up at a lower risk than a small one. It is myopic: it prices each event
    alone, not what ending an episode costs later.
    """

    def __init__(
        self,
        values: Sequence[Sequence[float]],
        state_names: Sequence[str],
        scaler_mean: np.ndarray,
        scaler_std: np.ndarray,
        amount_feature: str | None = "amount",
    ) -> None:
        super().__init__(state_names, scaler_mean, scaler_std)
        self.values = np.asarray(
            values, dtype=np.float64
        )  # (4, 3): good base/per-amount, bad base/per-amount
        if self.values.shape != (4, 3):
            raise ValueError(f"Bayes policy needs (4, 3) expected step values, got {self.values.shape}")
        names = self.state_names
        self.amount_feature = amount_feature if amount_feature in names else None
        self._amount_index = names.index(amount_feature) if self.amount_feature else None
        self.name = "Bayes minimum risk"

    def amounts(self, states: np.ndarray) -> np.ndarray:
        """The event amounts behind the states (0 when the features carry no amount)."""
        states = np.atleast_2d(states)
        if self._amount_index is None:
            return np.zeros(len(states))
        return unscaled_feature(states, self._amount_index, self.scaler_mean, self.scaler_std)

    def expected_rewards(self, risk: np.ndarray, amounts: np.ndarray) -> np.ndarray:
        """(n, 3): each action's expected step reward."""
        return expected_step_rewards(self.values, risk, amounts)

    def probabilities(self, states: np.ndarray) -> np.ndarray:
        states = np.atleast_2d(states)
        value = self.expected_rewards(states[:, self.risk_index], self.amounts(states))
        return np.eye(3)[value.argmax(axis=1)]

    def save(self, directory: Path) -> None:
        self._save(
            directory,
            {"type": BAYES, "name": self.name, "values": self.values.tolist(), "amount": self.amount_feature},
        )


def load_policy(directory: Path) -> Policy:
    """Whichever policy an artifact holds: the PPO actor, or a baseline served as the policy."""
    directory = Path(directory)
    meta = json.loads((directory / META).read_text("utf-8"))
    kind = meta.get("type", PPO_ACTOR)
    if kind == PPO_ACTOR:
        return PolicyModel.load(directory)
    with np.load(directory / ACTOR, allow_pickle=False) as data:
        mean, std = data["scaler_mean"], data["scaler_std"]
    names = meta["state_names"]
    if kind == THRESHOLDS:
        return ThresholdPolicy(meta["throttle"], meta["block"], names, mean, std, meta.get("name", ""))
    if kind == BAYES:
        return BayesPolicy(meta["values"], names, mean, std, meta.get("amount"))
    raise ValueError(f"unknown policy type {kind!r} in {directory / META}")


def policy_kind(policy: object) -> str:
    """``policy.json``'s type of a loaded policy."""
    if isinstance(policy, ThresholdPolicy):
        return THRESHOLDS
    if isinstance(policy, BayesPolicy):
        return BAYES
    return PPO_ACTOR
