"""The training simulator of the policy (DESIGN.md §7), built from labelled entity histories.

An episode replays one entity's events in time order. The policy sees each event's state (features,
anomaly, risk) and acts; the true label turns the action into an outcome and rewards.yaml into a reward.
Actions have consequences beyond the step, which is what makes this long-term optimisation rather than
a threshold: a block ends the episode (fraud stopped, or a good customer lost for good), a step-up may
make a good customer leave or a fraudster give up.

The replay is open-loop: an entity's later features do not react to earlier actions. That is the
usual compromise of replay simulators and is stated in the training report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from decision_platform.core.actions import ACTION_NAMES, ALLOW, BLOCK, THROTTLE
from decision_platform.core.rewards import RewardTable, SimulationSettings


@dataclass(frozen=True)
class EntityHistory:
    states: np.ndarray  # (n, k) float32
    labels: np.ndarray  # (n,) int8, 1 = bad
    amounts: np.ndarray  # (n,) float64


def group_histories(
    entity_ids: np.ndarray,
    states: np.ndarray,
    labels: np.ndarray,
    amounts: np.ndarray,
    rows: np.ndarray | None = None,
) -> list[EntityHistory]:
    """Split time-ordered rows into one history per entity (order inside each is kept). ``rows`` (a
    mask or indices) takes a part of them. The histories are views of one entity-ordered copy: a copy
    per entity would hold every state twice more (a part's copy, then the entities' copies)."""
    entity_ids = np.asarray(entity_ids)
    taken = np.arange(len(entity_ids)) if rows is None else np.asarray(rows)
    if taken.dtype == bool:
        taken = np.flatnonzero(taken)
    if not len(taken):
        return []
    order = taken[np.argsort(entity_ids[taken], kind="stable")]
    sorted_ids = entity_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    ends = np.r_[starts[1:], len(order)]
    ordered_states = np.asarray(states[order], dtype=np.float32)
    ordered_labels = np.asarray(labels[order], dtype=np.int8)
    ordered_amounts = np.asarray(amounts[order], dtype=np.float64)
    return [
        EntityHistory(ordered_states[s:e], ordered_labels[s:e], ordered_amounts[s:e])
        for s, e in zip(starts, ends, strict=True)
    ]


def simulate_outcome(
    label: int, action: int, rng: np.random.Generator, sim: SimulationSettings
) -> tuple[str, bool]:
    """(outcome, episode ends) for one event."""
    if label == 0:
        if action == ALLOW:
            return "success", False
        if action == THROTTLE:
            if rng.random() < sim.abandon_probability_on_throttle:
                return "abandoned", True
            return "success", False
        return "false_positive", True
    if action == ALLOW:
        return "chargeback", False
    if action == THROTTLE:
        if rng.random() < sim.fraud_gives_up_probability_on_throttle:
            return "fraud", True
        return "chargeback", False
    return "fraud", True


class FraudSimulatorEnv(gym.Env):
    """Gymnasium env over entity histories; reward = rewards.yaml value x ``reward_scale``."""

    metadata = {"render_modes": []}  # noqa: RUF012

    def __init__(self, histories: list[EntityHistory], rewards: RewardTable, max_steps: int = 256) -> None:
        super().__init__()
        if not histories:
            raise ValueError("the simulator needs at least one entity history")
        self.histories = histories
        self.rewards = rewards
        self.max_steps = max_steps
        k = histories[0].states.shape[1]
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(k,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(3)
        self._history = histories[0]
        self._index = 0
        self._end = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._history = self.histories[int(self.np_random.integers(len(self.histories)))]
        n = len(self._history.labels)
        # Long histories: start at a random point so every part of them is seen.
        start = int(self.np_random.integers(n - self.max_steps + 1)) if n > self.max_steps else 0
        self._index, self._end = start, min(n, start + self.max_steps)
        return self._history.states[self._index], {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        h, i = self._history, self._index
        outcome, ends = simulate_outcome(
            int(h.labels[i]), int(action), self.np_random, self.rewards.simulation
        )
        reward = (
            self.rewards.reward(outcome, int(action), float(h.amounts[i]))
            * self.rewards.simulation.reward_scale
        )
        self._index += 1
        truncated = not ends and self._index >= self._end
        next_state = h.states[min(self._index, len(h.labels) - 1)]
        return next_state, float(reward), ends, truncated, {"outcome": outcome}


@dataclass(frozen=True)
class PolicyReport:
    """How a policy does on held-out histories, in the reward units of rewards.yaml."""

    name: str
    decisions: int
    reward_per_decision: float
    ci_low: float
    ci_high: float
    fraud_events: int
    fraud_stopped: int
    fraud_amount_lost: float
    good_events: int
    good_blocked: int
    good_throttled: int
    good_abandoned: int

    @property
    def fraud_caught_rate(self) -> float:
        return self.fraud_stopped / self.fraud_events if self.fraud_events else 0.0


def reward_arrays(rewards: RewardTable) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(outcome names, base[o, a], per_amount[o, a]) for vectorised reward lookups; NaN for a pair that
    cannot happen (so that using one by mistake shows in every sum it reaches)."""
    names = rewards.outcome_names
    cells = [[rewards.outcomes[o].get(a) for a in ACTION_NAMES] for o in names]
    base = np.array([[c.base if c is not None else np.nan for c in row] for row in cells])
    per_amount = np.array([[c.per_amount if c is not None else np.nan for c in row] for row in cells])
    return names, base, per_amount


def evaluate_policy(
    name: str,
    action_probabilities: Callable[[np.ndarray], np.ndarray],
    histories: list[EntityHistory],
    rewards: RewardTable,
    seed: int = 0,
    n_bootstrap: int = 500,
) -> PolicyReport:
    """Replay every history once, sampling actions from ``action_probabilities(states) -> (n, 3)``.

    Same dynamics as ``simulate_outcome`` / the env, vectorised over all steps of all histories (the
    replay is open-loop, so only the episode ends depend on earlier steps). The 95% confidence
    interval bootstraps over entities, the independent unit here.
    """
    rng = np.random.default_rng(seed)
    sim = rewards.simulation
    lengths = np.array([len(h.labels) for h in histories])
    group = np.repeat(np.arange(len(histories)), lengths)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    states = np.concatenate([h.states for h in histories])
    labels = np.concatenate([h.labels for h in histories]).astype(bool)
    amounts = np.concatenate([h.amounts for h in histories])

    probs = np.asarray(action_probabilities(states), dtype=np.float64)
    cumulative = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    u = rng.random(len(labels))
    actions = (u > cumulative[:, 0]).astype(np.int64) + (u > cumulative[:, 1])
    chance = rng.random(len(labels))
    names, base, per_amount = reward_arrays(rewards)
    idx = {n: i for i, n in enumerate(names)}
    throttled = actions == THROTTLE
    abandons = ~labels & throttled & (chance < sim.abandon_probability_on_throttle)
    gives_up = labels & throttled & (chance < sim.fraud_gives_up_probability_on_throttle)
    outcome = np.where(
        labels,
        np.where((actions == BLOCK) | gives_up, idx["fraud"], idx["chargeback"]),
        np.where(
            actions == BLOCK, idx["false_positive"], np.where(abandons, idx["abandoned"], idx["success"])
        ),
    )
    ends = (actions == BLOCK) | abandons | gives_up
    # A step happens only if no earlier step of its episode ended it.
    exclusive = np.cumsum(ends) - ends
    ends_before = exclusive - exclusive[starts][group]
    live = ends_before == 0
    step_reward = np.where(live, base[outcome, actions] + per_amount[outcome, actions] * amounts, 0.0)

    per_entity_reward = np.bincount(group, weights=step_reward, minlength=len(histories))
    per_entity_decisions = np.bincount(group, weights=live, minlength=len(histories))
    fraud_live, good_live = live & labels, live & ~labels
    point = per_entity_reward.sum() / max(per_entity_decisions.sum(), 1)
    boot_idx = rng.integers(0, len(histories), size=(n_bootstrap, len(histories)))
    boot = per_entity_reward[boot_idx].sum(axis=1) / np.maximum(per_entity_decisions[boot_idx].sum(axis=1), 1)
    return PolicyReport(
        name=name,
        decisions=int(live.sum()),
        reward_per_decision=float(point),
        ci_low=float(np.percentile(boot, 2.5)),
        ci_high=float(np.percentile(boot, 97.5)),
        fraud_events=int(fraud_live.sum()),
        fraud_stopped=int((fraud_live & (outcome == idx["fraud"])).sum()),
        fraud_amount_lost=float(amounts[fraud_live & (outcome == idx["chargeback"])].sum()),
        good_events=int(good_live.sum()),
        good_blocked=int((good_live & (actions == BLOCK)).sum()),
        good_throttled=int((good_live & throttled).sum()),
        good_abandoned=int((good_live & abandons).sum()),
    )
