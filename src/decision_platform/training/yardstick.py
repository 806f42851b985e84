"""The yardstick policies are judged by: expected total reward per entity over held-out time.

Why total reward per entity: the policy's job is the long term (DESIGN.md §7), a sum of rewards over an
entity's history. Reward per decision has a blind spot: a policy that ends episodes (blocks, or step-ups
that make customers leave) takes fewer decisions and is not charged for the good events it never sees.
It stays as a secondary column.

Why exact expectations instead of one sampled replay: the replay is open-loop (later features do not
react to actions), so the only chance in an episode is whether each step is reached -- the product of
the earlier steps' chances not to end it (block ends; a step-up makes a good customer leave or a
fraudster give up with the rewards.yaml probabilities). E[total] = sum over steps of P(reached) x
E[step reward]: no simulator draw noise, and the same numbers for every run.

Why paired bootstrap CIs over entities: entities are the independent unit, and every policy is judged on
the same resamples, so the CI of a *difference* is not the overlap of two wide intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from decision_platform.core.rewards import RewardTable

#: Bootstrap resamples of entities for the CIs.
BOOTSTRAP = 1000
_CHUNK = 50  # resamples at a time (memory: chunk x entities)


@dataclass(frozen=True, eq=False)
class Replay:
    """Rows (in time order) regrouped into entity episodes: by entity, time order kept inside each."""

    order: np.ndarray  # replay position -> row
    group: np.ndarray  # replay position -> entity index
    starts: np.ndarray  # replay position of each entity's first row
    labels: np.ndarray  # bool, replay order
    amounts: np.ndarray  # replay order

    @property
    def entities(self) -> int:
        return len(self.starts)

    @classmethod
    def of(cls, entity_ids: np.ndarray, labels: np.ndarray, amounts: np.ndarray) -> Replay:
        order = np.argsort(np.asarray(entity_ids), kind="stable")
        ids = np.asarray(entity_ids)[order]
        new = np.r_[True, ids[1:] != ids[:-1]] if len(ids) else np.zeros(0, dtype=bool)
        return cls(
            order,
            np.cumsum(new) - 1,
            np.flatnonzero(new),
            np.asarray(labels)[order].astype(bool),
            np.asarray(amounts, dtype=np.float64)[order],
        )


def step_values(labels: np.ndarray, amounts: np.ndarray, rewards: RewardTable) -> np.ndarray:
    """(n, 3): each action's expected reward on a row whose true label is known, this step only."""
    g0, g1, b0, b1 = (np.asarray(v)[None, :] for v in rewards.expected_step_values())
    amounts = np.asarray(amounts, dtype=np.float64)[:, None]
    return np.where(np.asarray(labels).astype(bool)[:, None], b0 + b1 * amounts, g0 + g1 * amounts)


@dataclass(frozen=True, eq=False)
class Expectation:
    """A policy's exact expected outcomes in the simulator, in replay order, and summed per entity."""

    reached: np.ndarray  # (n,) P(the step happens)
    step_reward: np.ndarray  # (n,) E[reward of the step | reached]
    per_entity: dict[str, np.ndarray]


def _reached(step_survive: np.ndarray, replay: Replay) -> np.ndarray:
    """P(step reached) = product of the earlier steps' survival within the episode (vectorised)."""
    dead = step_survive <= 0.0
    logs = np.log(np.where(dead, 1.0, step_survive))
    before = np.cumsum(logs) - logs
    dead_before = np.cumsum(dead) - dead
    first = replay.starts[replay.group]
    alive = (dead_before - dead_before[first]) == 0
    return np.exp(before - before[first]) * alive


def expectation(probabilities: np.ndarray, replay: Replay, rewards: RewardTable) -> Expectation:
    """The exact expectation of a policy given by its (n, 3) action probabilities on the rows (row order)."""
    sim = rewards.simulation
    p = np.asarray(probabilities, dtype=np.float64)[replay.order]
    p = p / p.sum(axis=1, keepdims=True)
    bad, amounts = replay.labels, replay.amounts
    give_up, abandon = sim.fraud_gives_up_probability_on_throttle, sim.abandon_probability_on_throttle
    survive = np.where(bad[:, None], [1.0, 1.0 - give_up, 0.0], [1.0, 1.0 - abandon, 0.0])
    step_reward = (p * step_values(bad, amounts, rewards)).sum(axis=1)
    reached = _reached((p * survive).sum(axis=1), replay)
    good = ~bad
    weights = {
        "reward": reached * step_reward,
        "decisions": reached,
        "fraud_reached": reached * bad,
        "fraud_stopped": reached * bad * (p[:, 2] + p[:, 1] * give_up),
        "fraud_amount_lost": reached * bad * (p[:, 0] + p[:, 1] * (1 - give_up)) * amounts,
        "good_throttled": reached * good * p[:, 1],
        "good_blocked": reached * good * p[:, 2],
        "good_abandoned": reached * good * p[:, 1] * abandon,
    }
    n = replay.entities
    return Expectation(
        reached,
        step_reward,
        {k: np.bincount(replay.group, weights=w, minlength=n) for k, w in weights.items()},
    )


def total_reward(probabilities: np.ndarray, replay: Replay, rewards: RewardTable) -> float:
    """Expected total reward over all entities (what searches maximise)."""
    return float(expectation(probabilities, replay, rewards).per_entity["reward"].sum())


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class PolicyComparison:
    """One policy on held-out time: per entity and per decision, each with its CI and its paired
    difference to the reference policy (the best baseline); expected counts over all entities."""

    name: str
    per_entity: Interval
    per_entity_diff: Interval
    per_decision: Interval
    per_decision_diff: Interval
    entities: int
    decisions: float
    fraud_reached: float
    fraud_stopped: float
    fraud_amount_lost: float
    good_throttled: float
    good_blocked: float
    good_abandoned: float

    @property
    def fraud_caught_rate(self) -> float:
        return self.fraud_stopped / self.fraud_reached if self.fraud_reached else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    expectations: dict[str, Expectation], reference: str, seed: int = 0, n_bootstrap: int = BOOTSTRAP
) -> dict[str, PolicyComparison]:
    """Every policy against ``reference`` on the same bootstrap resamples of entities (95% CIs)."""
    names = list(expectations)
    reward = np.stack([expectations[k].per_entity["reward"] for k in names])  # (P, n)
    decisions = np.stack([expectations[k].per_entity["decisions"] for k in names])
    n = reward.shape[1]
    rng = np.random.default_rng(seed)
    boot_reward, boot_decisions = [], []
    for start in range(0, n_bootstrap, _CHUNK):
        k = min(_CHUNK, n_bootstrap - start)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(k)]).astype(float)
        boot_reward.append(counts @ reward.T)  # (k, P)
        boot_decisions.append(counts @ decisions.T)
    total, count = np.vstack(boot_reward), np.vstack(boot_decisions)
    per_entity, per_decision = total / n, total / np.maximum(count, 1e-12)
    point_entity = reward.sum(axis=1) / n
    point_decision = reward.sum(axis=1) / np.maximum(decisions.sum(axis=1), 1e-12)
    ref = names.index(reference)

    def interval(point: float, boot: np.ndarray) -> Interval:
        return Interval(float(point), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))

    out = {}
    for i, name in enumerate(names):
        sums = {k: float(v.sum()) for k, v in expectations[name].per_entity.items()}
        out[name] = PolicyComparison(
            name=name,
            per_entity=interval(point_entity[i], per_entity[:, i]),
            per_entity_diff=interval(
                point_entity[i] - point_entity[ref], per_entity[:, i] - per_entity[:, ref]
            ),
            per_decision=interval(point_decision[i], per_decision[:, i]),
            per_decision_diff=interval(
                point_decision[i] - point_decision[ref], per_decision[:, i] - per_decision[:, ref]
            ),
            entities=n,
            decisions=sums["decisions"],
            fraud_reached=sums["fraud_reached"],
            fraud_stopped=sums["fraud_stopped"],
            fraud_amount_lost=sums["fraud_amount_lost"],
            good_throttled=sums["good_throttled"],
            good_blocked=sums["good_blocked"],
            good_abandoned=sums["good_abandoned"],
        )
    return out


def threshold_grid(risk: np.ndarray) -> list[float]:
    """Throttle / block thresholds to search: fixed probabilities and the upper quantiles of the risk
    itself (a model that ranks well but is calibrated on another base rate may put every fraud below
    the first fixed step), and "never" (1.01)."""
    quantiles = np.quantile(risk, [0.8, 0.9, 0.95, 0.98, 0.99, 0.995]) if len(risk) else []
    fixed = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    return [*sorted({float(v) for v in [*fixed, *quantiles]}), 1.01]


def best_thresholds(
    risk: np.ndarray,
    replay: Replay,
    rewards: RewardTable,
    grid: Sequence[float] | None = None,
    served: np.ndarray | None = None,
) -> tuple[float, float]:
    """The (throttle, block) pair with the most expected total reward on the rows of ``replay``
    (``risk`` in row order): the best fixed-thresholds baseline, searched on the training part.

    ``served``: (n, 3) the action serving takes on each row when the policy chooses allow / throttle /
    block (the rules' masks applied: :func:`decision_platform.training.train.served_choices`); the
    thresholds are then searched for what they earn under the rules, as they are judged."""
    risk = np.asarray(risk, dtype=np.float64)
    grid = threshold_grid(risk) if grid is None else list(grid)
    rows = np.arange(len(risk))
    best, best_value = (1.01, 1.01), -np.inf
    for t_throttle in grid:
        for t_block in grid:
            if t_block < t_throttle:
                continue
            action = np.where(risk >= t_block, 2, np.where(risk >= t_throttle, 1, 0))
            if served is not None:
                action = served[rows, action]
            value = total_reward(np.eye(3)[action], replay, rewards)
            if value > best_value:
                best, best_value = (t_throttle, t_block), value
    return best
