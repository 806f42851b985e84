"""rewards.yaml: an outcome with no reward for an action cannot follow it (a blocked event is no success)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from decision_platform.config import PROJECT_ROOT
from decision_platform.core.rewards import RewardTable
from decision_platform.training.simulator import (
    EntityHistory,
    evaluate_policy,
    reward_arrays,
    simulate_outcome,
)

TABLE = RewardTable.load(PROJECT_ROOT / "config" / "rewards.yaml")
ALLOW, THROTTLE, BLOCK = 0, 1, 2


def test_a_success_cannot_follow_a_block() -> None:
    assert not TABLE.possible("success", BLOCK)
    assert TABLE.possible("success", ALLOW) and TABLE.possible("success", THROTTLE)
    assert TABLE.possible("false_positive", BLOCK) and TABLE.possible("fraud", BLOCK)
    assert not TABLE.possible("no-such-outcome", ALLOW)
    with pytest.raises(ValueError, match="'success' cannot follow 'block'"):
        TABLE.reward("success", BLOCK, 10.0)


def test_every_action_has_outcomes_and_every_outcome_an_action() -> None:
    for action in (ALLOW, THROTTLE, BLOCK):
        assert any(TABLE.possible(o, action) for o in TABLE.outcome_names)
    with pytest.raises(ValueError, match="'x' can follow no action"):
        RewardTable.model_validate({"outcomes": {**TABLE.model_dump()["outcomes"], "x": {}}})
    with pytest.raises(ValueError, match="allow"):
        RewardTable.model_validate({"outcomes": {"x": {"alow": {}}}})


def test_the_simulator_only_produces_possible_pairs() -> None:
    rng = np.random.default_rng(0)
    for label, action, _ in itertools.product((0, 1), (ALLOW, THROTTLE, BLOCK), range(50)):
        outcome, _ends = simulate_outcome(label, action, rng, TABLE.simulation)
        assert TABLE.possible(outcome, action), (label, action, outcome)


def test_vectorised_rewards_mark_impossible_pairs_and_evaluation_never_uses_them() -> None:
    names, base, _ = reward_arrays(TABLE)
    assert np.isnan(base[names.index("success"), BLOCK])
    assert np.isfinite(base[names.index("false_positive"), BLOCK])
    rng = np.random.default_rng(1)
    histories = [
        EntityHistory(
            states=rng.random((40, 2)).astype(np.float32),
            labels=(rng.random(40) < 0.3).astype(np.int8),
            amounts=rng.random(40) * 100,
        )
        for _ in range(20)
    ]
    uniform = evaluate_policy("uniform", lambda s: np.full((len(s), 3), 1 / 3), histories, TABLE, seed=0)
    assert np.isfinite(uniform.reward_per_decision) and uniform.good_blocked > 0
