"""Off-policy evaluation: how would a candidate policy have done on decisions logged by another one?

Logged decisions are off-policy data: each row has the state the policy saw, the action actually taken,
the propensity with which it was taken (the serving distribution's probability, stored per decision),
and the reward its outcome earned. A candidate gives its own action probabilities on the same states.

- IPS (inverse propensity scoring): unbiased when propensities are right and the candidate's actions
  have support in the logs; high variance when weights are large.
- SNIPS (self-normalised IPS): divides by the sum of weights; slightly biased, much steadier.
- DR (doubly robust): a reward model's prediction for the candidate's actions, corrected by IPS on its
  residual; unbiased if either the propensities or the reward model are right.

Every estimate comes with a percentile bootstrap confidence interval; the effective sample size
(sum w)^2 / sum w^2 says how many logged decisions the estimate is really worth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    name: str
    value: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class OPEReport:
    estimates: dict[str, Estimate]
    n: int
    effective_sample_size: float
    max_weight: float


def _ips(w: np.ndarray, r: np.ndarray, _dm: np.ndarray, _q_taken: np.ndarray) -> float:
    return float(np.mean(w * r))


def _snips(w: np.ndarray, r: np.ndarray, _dm: np.ndarray, _q_taken: np.ndarray) -> float:
    total = w.sum()
    return float((w * r).sum() / total) if total > 0 else 0.0


def _dr(w: np.ndarray, r: np.ndarray, dm: np.ndarray, q_taken: np.ndarray) -> float:
    return float(np.mean(dm + w * (r - q_taken)))


ESTIMATORS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], float]] = {
    "IPS": _ips,
    "SNIPS": _snips,
    "DR": _dr,
}


def fit_reward_model(
    states: np.ndarray, actions: np.ndarray, rewards: np.ndarray, l2: float = 1.0
) -> np.ndarray:
    """q(x, a) for every logged state and action: one ridge regression per action (a deliberately simple
    direct-method model; DR stays unbiased when it is wrong, as long as propensities are right)."""
    x = np.column_stack([np.ones(len(states)), np.asarray(states, dtype=np.float64)])
    q = np.zeros((len(states), 3))
    global_mean = float(np.mean(rewards)) if len(rewards) else 0.0
    for action in range(3):
        rows = actions == action
        if rows.sum() < 5:  # too little data: predict the overall mean
            q[:, action] = global_mean
            continue
        xa, ra = x[rows], rewards[rows]
        coef = np.linalg.solve(xa.T @ xa + l2 * np.eye(x.shape[1]), xa.T @ ra)
        q[:, action] = x @ coef
    return q


@dataclass(frozen=True)
class _Logged:
    """Logged arrays as the estimators need them, checked once."""

    actions: np.ndarray
    propensities: np.ndarray
    rewards: np.ndarray
    q: np.ndarray

    @classmethod
    def of(
        cls, actions: np.ndarray, propensities: np.ndarray, rewards: np.ndarray, q_hat: np.ndarray | None
    ) -> _Logged:
        a = np.asarray(actions, dtype=np.int64)
        p = np.asarray(propensities, dtype=np.float64)
        if len(a) == 0:
            raise ValueError("no logged decisions to evaluate on")
        if np.any(p <= 0):
            raise ValueError("propensities must be > 0 (a logged action had no chance of being taken)")
        q = np.zeros((len(a), 3)) if q_hat is None else np.asarray(q_hat, dtype=np.float64)
        return cls(a, p, np.asarray(rewards, dtype=np.float64), q)

    @property
    def q_taken(self) -> np.ndarray:
        return self.q[np.arange(len(self.actions)), self.actions]

    def terms(self, target_probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(importance weights, direct-method values) of a target policy."""
        pi = np.asarray(target_probabilities, dtype=np.float64)
        return pi[np.arange(len(self.actions)), self.actions] / self.propensities, (pi * self.q).sum(axis=1)

    def samples(self, n_bootstrap: int, seed: int) -> np.ndarray:
        n = len(self.actions)
        return np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))


def _interval(name: str, value: float, boot: np.ndarray, confidence: float) -> Estimate:
    tail = (1.0 - confidence) / 2.0 * 100.0
    return Estimate(name, value, float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail)))


def evaluate(
    target_probabilities: np.ndarray,
    actions: np.ndarray,
    propensities: np.ndarray,
    rewards: np.ndarray,
    q_hat: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> OPEReport:
    """Estimate the value (mean reward per decision) of a target policy on logged decisions.

    ``target_probabilities``: (n, 3) the candidate's action probabilities on the logged states;
    ``actions``, ``propensities``, ``rewards``: (n,) what was logged; ``q_hat``: (n, 3) reward model
    predictions (DR uses zeros, i.e. becomes IPS, without one).
    """
    logged = _Logged.of(actions, propensities, rewards, q_hat)
    w, dm = logged.terms(target_probabilities)
    r, q_taken = logged.rewards, logged.q_taken
    samples = logged.samples(n_bootstrap, seed)
    estimates = {}
    for name, estimator in ESTIMATORS.items():
        boot = np.array([estimator(w[s], r[s], dm[s], q_taken[s]) for s in samples])
        estimates[name] = _interval(name, estimator(w, r, dm, q_taken), boot, confidence)
    ess = float(w.sum() ** 2 / np.square(w).sum()) if np.square(w).sum() > 0 else 0.0
    return OPEReport(estimates, len(r), ess, float(w.max()))


def evaluate_difference(
    candidate_probabilities: np.ndarray,
    baseline_probabilities: np.ndarray,
    actions: np.ndarray,
    propensities: np.ndarray,
    rewards: np.ndarray,
    q_hat: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Estimate]:
    """value(candidate) - value(baseline) per estimator, with a *paired* bootstrap CI.

    Both policies are judged on the same logged decisions, so most of the noise (which frauds happened
    to be in the sample, how large they were) is shared: resampling the decisions once for both makes
    the interval of the difference far narrower than comparing two separate intervals.
    """
    logged = _Logged.of(actions, propensities, rewards, q_hat)
    (wc, dmc), (wb, dmb) = logged.terms(candidate_probabilities), logged.terms(baseline_probabilities)
    r, q_taken = logged.rewards, logged.q_taken
    out = {}
    for name, estimator in ESTIMATORS.items():

        def diff(s: np.ndarray | slice, est: Callable = estimator) -> float:
            return est(wc[s], r[s], dmc[s], q_taken[s]) - est(wb[s], r[s], dmb[s], q_taken[s])

        boot = np.array([diff(s) for s in logged.samples(n_bootstrap, seed)])
        out[name] = _interval(name, diff(slice(None)), boot, confidence)
    return out
