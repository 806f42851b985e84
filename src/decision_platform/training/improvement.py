"""Policy improvement on top of the myopic baselines: fitted policy iteration with continuation values.

The Bayes-minimum-risk policy maximises one step's expected reward. The simulator is not one-step: a
block ends the entity's episode, a step-up makes a good customer leave (p = 0.1) or a fraudster give up
(p = 0.7). What ending an episode is worth -- a good customer's later revenue lost, a fraudster's later
fraud stopped -- is the **continuation value**, and it can be predicted from the state: the entity's
window features say how active it is, the risk and the velocity features whether a fraud is a burst.

One step of policy improvement (an RL method: fitted policy iteration):

1. Under a start policy pi (the Bayes policy), the exact expected return-to-go of every training row's
   entity after the row, ``G_{t+1}`` (open-loop replay, exact expectations as the yardstick computes them:
   ``G_t = E_pi[r_t] + E_pi[cont_t] * G_{t+1}``).
2. The continuation value given the state and the label, ``V_y(s) = E[G_{t+1} | s, y]``, fitted by
   gradient boosting separately on the good and the bad training rows.
3. ``Q(s, a) = (1 - p) [r(a, good) + cont(a, good) V_0(s)] + p [r(a, bad) + cont(a, bad) V_1(s)]`` with p
   the calibrated risk: the Bayes policy's step values plus what each action keeps of the future. The
   improved policy is ``argmax_a Q``; repeating from it is policy iteration.

The episodes of the training part are cut like the held-out one: windows of the held-out part's length
ending at the training part's end, an episode being one entity in one window (the yardstick's episode is
one entity over the held-out window, so a value fitted over whole training histories would price a
longer future than the one judged).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor

from decision_platform.core.rewards import RewardTable
from decision_platform.models.baseline_policy import BayesPolicy
from decision_platform.training.yardstick import Replay, step_values

IMPROVED = "fitted-Q improved policy"


def continuation(rewards: RewardTable) -> tuple[np.ndarray, np.ndarray]:
    """Per action (allow, throttle, block), the chance the episode goes on after a good and a bad event."""
    sim = rewards.simulation
    good = np.array([1.0, 1.0 - sim.abandon_probability_on_throttle, 0.0])
    bad = np.array([1.0, 1.0 - sim.fraud_gives_up_probability_on_throttle, 0.0])
    return good, bad


def episode_keys(entity_keys: np.ndarray, timestamps: np.ndarray, end: float, length: float) -> np.ndarray:
    """(n,) int64 episode keys: one entity in one window of ``length`` seconds, the windows ending at
    ``end`` (0 is the last window before ``end``). Keys sort by entity, then window."""
    window = np.floor((end - np.asarray(timestamps, dtype=np.float64)) / max(length, 1e-9)).astype(np.int64)
    window = np.maximum(window, 0)
    return np.asarray(entity_keys, dtype=np.int64) * (int(window.max(initial=0)) + 1) + window


def return_to_go(
    probabilities: np.ndarray, replay: Replay, rewards: RewardTable, discount: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(G_t, G_{t+1})`` per row (row order): the exact expected total reward of the row's episode from the
    row on, and from the next row on, under a policy given by its (n, 3) action probabilities (open-loop:
    ``G_t = E[r_t] + discount * P(the episode goes on after t) * G_{t+1}``, 0 after the last row)."""
    p = np.asarray(probabilities, dtype=np.float64)[replay.order]
    p = p / p.sum(axis=1, keepdims=True)
    bad = replay.labels
    good_go_on, bad_go_on = continuation(rewards)
    reward = (p * step_values(bad, replay.amounts, rewards)).sum(axis=1)
    go_on = discount * (p * np.where(bad[:, None], bad_go_on, good_go_on)).sum(axis=1)
    n = len(reward)
    last = np.zeros(n, dtype=bool)
    last[np.r_[replay.starts[1:] - 1, n - 1] if n else []] = True
    here, after = np.zeros(n), np.zeros(n)
    g = 0.0
    for i in range(n - 1, -1, -1):  # a float loop: ~0.2 s a million rows, no temporaries
        if last[i]:
            g = 0.0
        after[i] = g
        g = reward[i] + go_on[i] * g
        here[i] = g
    rows_here, rows_after = np.empty(n), np.empty(n)
    rows_here[replay.order], rows_after[replay.order] = here, after
    return rows_here, rows_after


def q_targets(
    labels: np.ndarray, amounts: np.ndarray, next_value: np.ndarray, rewards: RewardTable
) -> np.ndarray:
    """(n, 3): each action's expected return on a row whose label is known:
    ``r(a, y) + cont(a, y) G_{t+1}``."""
    good_go_on, bad_go_on = continuation(rewards)
    bad = np.asarray(labels).astype(bool)
    go_on = np.where(bad[:, None], bad_go_on, good_go_on)
    return step_values(bad, amounts, rewards) + go_on * np.asarray(next_value, dtype=np.float64)[:, None]


@dataclass(frozen=True, eq=False)
class ImprovedPolicy:
    """``argmax_a Q(s, a)``: the Bayes step values plus the fitted continuation values (not servable
    itself: it is the teacher the PPO actor is cloned from, and a diagnostic row of the comparison)."""

    bayes: BayesPolicy
    good: HistGradientBoostingRegressor | None  # E[G_{t+1} | s, good]; None: 0 (the Bayes policy)
    bad: HistGradientBoostingRegressor | None
    rewards: RewardTable
    name: str = IMPROVED

    def q_values(self, states: np.ndarray) -> np.ndarray:
        states = np.atleast_2d(states)
        risk = states[:, self.bayes.risk_index].astype(np.float64)
        q = self.bayes.expected_rewards(risk, self.bayes.amounts(states))
        if self.good is None or self.bad is None:
            return q
        good_go_on, bad_go_on = continuation(self.rewards)
        v_good, v_bad = self.good.predict(states), self.bad.predict(states)
        return (
            q
            + (1 - risk)[:, None] * good_go_on * v_good[:, None]
            + risk[:, None] * bad_go_on * v_bad[:, None]
        )

    def probabilities(self, states: np.ndarray) -> np.ndarray:
        return np.eye(3)[self.q_values(states).argmax(axis=1)]


def _regressor(seed: int) -> HistGradientBoostingRegressor:
    return HistGradientBoostingRegressor(
        max_iter=200, learning_rate=0.05, min_samples_leaf=50, random_state=seed
    )


def improve(
    start: np.ndarray,
    states: np.ndarray,
    labels: np.ndarray,
    amounts: np.ndarray,
    episodes: np.ndarray,
    bayes: BayesPolicy,
    rewards: RewardTable,
    seed: int = 0,
) -> ImprovedPolicy:
    """One step of policy improvement from the policy whose (n, 3) probabilities on these rows are
    ``start``: fit the continuation values of its return-to-go on the rows (by label), return argmax Q."""
    labels = np.asarray(labels).astype(bool)
    replay = Replay.of(episodes, labels, amounts)
    _, after = return_to_go(start, replay, rewards)
    if min((~labels).sum(), labels.sum()) < 2:  # a label (nearly) absent: no values to fit, Bayes stays
        return ImprovedPolicy(bayes, None, None, rewards)
    good, bad = (_regressor(seed).fit(states[rows], after[rows]) for rows in (~labels, labels))
    return ImprovedPolicy(bayes, good, bad, rewards)


def policy_iteration(
    states: np.ndarray,
    labels: np.ndarray,
    amounts: np.ndarray,
    episodes: np.ndarray,
    bayes: BayesPolicy,
    rewards: RewardTable,
    iterations: int = 1,
    seed: int = 0,
) -> ImprovedPolicy:
    """``iterations`` steps of fitted policy iteration from the Bayes policy (0: the Bayes policy)."""
    policy = ImprovedPolicy(bayes, None, None, rewards)
    for _ in range(iterations):
        policy = improve(
            policy.probabilities(states), states, labels, amounts, episodes, bayes, rewards, seed
        )
    return policy
