"""Judging a policy on logged decisions before it acts: off-policy estimates, safety figures, the gate.

A policy is judged as it would serve: its action probabilities restricted to what the rules allowed on
that decision, with the same exploration floor (``serving_distribution``). Its value is estimated with
IPS, SNIPS and DR on the logged decisions that have a reward; its safety figures are read from the
labelled ones: how often it would block a good user's event, and let a fraud event through.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from decision_platform.core.actions import ALLOW, BLOCK
from decision_platform.learning.config import GateSettings
from decision_platform.learning.logged import LoggedDecisions
from decision_platform.learning.ope import Estimate, evaluate


@dataclass(frozen=True)
class PolicyEstimate:
    """A policy's estimated value per decision and safety figures on held-out logged decisions."""

    name: str
    version: str
    estimates: dict[str, Estimate]
    effective_sample_size: float
    max_weight: float
    decisions: int
    good_block_rate: float  # expected share of good users' events it blocks
    fraud_allow_rate: float  # expected share of fraud events it lets through
    fraud_amount_allowed: float  # expected fraud amount let through
    #: Labelled decisions each rate is read from: with none, the rate measures nothing (the gate fails it).
    good_events: int
    fraud_events: int

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["estimates"] = {k: asdict(v) for k, v in self.estimates.items()}
        return out


def safety_figures(target: np.ndarray, labels: np.ndarray, amounts: np.ndarray) -> tuple[float, float, float]:
    """(good block rate, fraud allow rate, fraud amount allowed), in expectation over the target's own
    randomness, on the labelled rows (a label does not depend on the action, so no weighting is needed)."""
    good, bad = labels == 0, labels == 1
    good_block = float(target[good, BLOCK].mean()) if good.any() else 0.0
    fraud_allow = float(target[bad, ALLOW].mean()) if bad.any() else 0.0
    return good_block, fraud_allow, float((target[bad, ALLOW] * amounts[bad]).sum())


def estimate_policy(
    name: str,
    version: str,
    target: np.ndarray,
    logged: LoggedDecisions,
    q_hat: np.ndarray,
    gate: GateSettings,
    seed: int = 0,
) -> PolicyEstimate:
    """OPE of ``target`` ((n, 3) probabilities on ``logged``'s rows, all of which have a reward)."""
    report = evaluate(
        target,
        logged.actions,
        logged.propensities,
        logged.rewards,
        q_hat,
        n_bootstrap=gate.bootstrap,
        confidence=gate.confidence,
        seed=seed,
    )
    good_block, fraud_allow, fraud_amount = safety_figures(target, logged.labels, logged.amounts)
    return PolicyEstimate(
        name,
        version,
        report.estimates,
        report.effective_sample_size,
        report.max_weight,
        report.n,
        good_block,
        fraud_allow,
        fraud_amount,
        int((logged.labels == 0).sum()),
        int((logged.labels == 1).sum()),
    )


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    detail: str


@dataclass
class GateResult:
    checks: list[GateCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}


_UNMEASURED = (
    "no held-out decision has {what} outcome: the rate cannot be measured (wait for outcomes, or widen "
    "--since/--until)"
)


def check_gate(
    champion: PolicyEstimate,
    candidate: PolicyEstimate,
    gate: GateSettings,
    difference: dict[str, Estimate],
) -> GateResult:
    """Promote only if the candidate is better with confidence, on enough data, and safe.

    "Better with confidence" reads the paired difference (candidate - champion on the same decisions):
    its lower confidence bound must exceed ``min_improvement``.

    A safety rate with no labelled decision behind it fails: fraud is rare, a held-out window without a
    fraud outcome is common, and its "0% of fraud allowed" passed an allow-all candidate.
    """
    est = gate.estimator
    delta, cand, champ = difference[est], candidate.estimates[est], champion.estimates[est]
    checks = [
        GateCheck(
            "enough decisions",
            candidate.decisions >= gate.min_decisions,
            f"{candidate.decisions} held-out decisions with a reward (need >= {gate.min_decisions})",
        ),
        GateCheck(
            "effective sample size",
            candidate.effective_sample_size >= gate.min_effective_sample_size,
            f"{candidate.effective_sample_size:.0f} (need >= {gate.min_effective_sample_size:g}); low means "
            "the candidate acts where the logs have little data",
        ),
        GateCheck(
            f"better with confidence ({est})",
            delta.ci_low > gate.min_improvement,
            f"candidate {cand.value:.3f} vs champion {champ.value:.3f}: difference {delta.value:+.3f}, "
            f"{gate.confidence:.0%} CI [{delta.ci_low:+.3f}, {delta.ci_high:+.3f}]; its lower bound must "
            f"exceed {gate.min_improvement:g}",
        ),
        GateCheck(
            "good users blocked",
            candidate.good_events > 0 and candidate.good_block_rate <= gate.max_good_block_rate,
            f"{candidate.good_block_rate:.2%} of good users' events (limit {gate.max_good_block_rate:.2%})"
            if candidate.good_events
            else _UNMEASURED.format(what="a good user's (success, abandoned, false_positive)"),
        ),
        GateCheck(
            "fraud let through",
            candidate.fraud_events > 0 and candidate.fraud_allow_rate <= gate.max_fraud_allow_rate,
            f"{candidate.fraud_allow_rate:.1%} of fraud events allowed "
            f"(limit {gate.max_fraud_allow_rate:.1%})"
            if candidate.fraud_events
            else _UNMEASURED.format(what="a fraud (fraud, chargeback)"),
        ),
    ]
    return GateResult(checks)
