"""Fitted policy iteration: return-to-go, Q targets, and one improvement step over the Bayes policy."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from decision_platform.config import PROJECT_ROOT
from decision_platform.core.rewards import RewardTable
from decision_platform.models.baseline_policy import BayesPolicy
from decision_platform.training.improvement import (
    episode_keys,
    improve,
    policy_iteration,
    q_targets,
    return_to_go,
)
from decision_platform.training.train import teacher_or_bayes
from decision_platform.training.yardstick import Replay, total_reward

REWARDS = RewardTable.load(PROJECT_ROOT / "config" / "rewards.yaml")


def test_return_to_go_and_q_targets_on_a_hand_computed_entity() -> None:
    # Entity "a": a good payment of 50 (allowed), a fraud of 100 (stepped up), a fraud of 200 (blocked);
    # entity "b": one good payment of 10 (allowed). Rows interleaved in time.
    entities = np.array(["a", "b", "a", "a"])
    labels = np.array([0, 0, 1, 1])
    amounts = np.array([50.0, 10.0, 100.0, 200.0])
    actions = np.array([0, 0, 1, 2])
    replay = Replay.of(entities, labels, amounts)
    here, after = return_to_go(np.eye(3)[actions], replay, REWARDS)
    # a3 blocked fraud: 1, nothing after. a2 fraud stepped up: 0.7 x 1 + 0.3 x (-15 - 100) = -33.8,
    # and the fraudster goes on with p 0.3: -33.8 + 0.3 x 1 = -33.5. a1 good allowed: 1 + 0.02 x 50 = 2,
    # always goes on: 2 - 33.5 = -31.5. b: 1.2, alone.
    assert here == pytest.approx([-31.5, 1.2, -33.5, 1.0])
    assert after == pytest.approx([-33.5, 0.0, 1.0, 0.0])
    q = q_targets(labels, amounts, after, REWARDS)
    # a1 (good, 50, G_next -33.5): allow 2 - 33.5; throttle 0.1 x -20 + 0.9 x 1.5 + 0.9 x -33.5; block -20
    # (the episode ends: the fraud to come is stopped). Myopically allow is best; with what follows, block.
    assert q[0] == pytest.approx([-31.5, -0.65 - 30.15, -20.0])
    assert q[0].argmax() == 2
    # a2 (fraud, 100, G_next 1): allow -115 + 1; throttle -33.8 + 0.3 x 1; block 1.
    assert q[2] == pytest.approx([-114.0, -33.5, 1.0])
    # The discount weighs the future: with 0.5, a1's return is 2 + 0.5 x (-33.8 + 0.5 x 0.3 x 1).
    here, _ = return_to_go(np.eye(3)[actions], replay, REWARDS, discount=0.5)
    assert here[0] == pytest.approx(2 + 0.5 * (-33.8 + 0.5 * 0.3))


def test_episode_keys_cut_time_into_windows_ending_at_the_end() -> None:
    keys = episode_keys(np.array([0, 0, 0, 1]), np.array([1.0, 5.0, 9.5, 9.9]), end=10.0, length=4.0)
    # Windows (6, 10], (2, 6], (-2, 2]: entity 0 has one row in each, entity 1 one in the last.
    assert len(set(keys[:3].tolist())) == 3 and keys[2] != keys[3]
    assert keys[3] // 3 == 1 and keys[2] % 3 == 0 and keys[0] % 3 == 2


def _suspicious_openings() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, BayesPolicy]:
    """120 entities of 21 payments. The first is suspicious (risk 0.5, amount 10); then 20 payments of 100
    at risk 0.001. Half the entities are customers (all good), half fraud bursts (all fraud the risk
    model misses after the first). The Bayes policy prices one step: on the opening, throttle
    (.5 x -1.37 + .5 x -6.8 = -4.09) beats block (-9.5); then it allows. But a throttled burst goes on
    with p 0.3 to lose 20 x 115, while a blocked customer loses only 20 x 3 (plus the -20)."""
    states, labels, entities = [], [], []
    for e in range(120):
        burst = e % 2 == 1
        for i in range(21):
            states.append([np.log1p(10.0 if i == 0 else 100.0), 0.0, 0.5 if i == 0 else 0.001])
            labels.append(int(burst))
            entities.append(e)
    names = ["amount", "anomaly", "risk"]
    bayes = BayesPolicy(REWARDS.expected_step_values(), names, np.zeros(1), np.ones(1))
    rows = np.array(states, dtype=np.float32)
    amounts = np.where(rows[:, 2] == 0.5, 10.0, 100.0)
    return rows, np.array(labels), amounts, np.array(entities), bayes


def test_one_improvement_step_is_never_worse_and_prices_what_follows() -> None:
    states, labels, amounts, entities, bayes = _suspicious_openings()
    replay = Replay.of(entities, labels, amounts)
    start = bayes.probabilities(states)
    opening = states[:, 2] == 0.5
    assert (start[opening].argmax(axis=1) == 1).all() and (start[~opening].argmax(axis=1) == 0).all()
    improved = improve(start, states, labels, amounts, entities, bayes, REWARDS)
    after = improved.probabilities(states)
    before_value, after_value = total_reward(start, replay, REWARDS), total_reward(after, replay, REWARDS)
    # The continuation values: a customer's 20 payments of 3 after the opening, a burst's 20 frauds.
    v_good, v_bad = improved.good.predict(states[:1]), improved.bad.predict(states[:1])  # type: ignore[union-attr]
    assert v_good == pytest.approx(60.0, rel=0.05) and v_bad == pytest.approx(-2300.0, rel=0.05)
    assert (after[opening].argmax(axis=1) == 2).all()  # block the opening: the burst's future decides
    assert (after[~opening].argmax(axis=1) == 0).all()
    # Exactly: 60 customers blocked (-20 each) instead of throttled, 60 bursts stopped (+1 each).
    assert after_value > before_value
    # Iterating from there does not undo it.
    again = policy_iteration(states, labels, amounts, entities, bayes, REWARDS, iterations=2)
    assert total_reward(again.probabilities(states), replay, REWARDS) >= after_value - 1e-9
    # Zero iterations is the Bayes policy itself.
    same = policy_iteration(states, labels, amounts, entities, bayes, REWARDS, iterations=0)
    assert np.array_equal(same.probabilities(states), start)


def test_the_teacher_is_cloned_only_if_it_beats_bayes_on_the_validation_episodes() -> None:
    states, labels, amounts, entities, bayes = _suspicious_openings()
    teacher = improve(bayes.probabilities(states), states, labels, amounts, entities, bayes, REWARDS)

    def judged_on(validation_labels: np.ndarray, validation: np.ndarray) -> tuple[object, dict]:
        split = SimpleNamespace(labels=validation_labels, amounts=amounts)
        view = SimpleNamespace(states=states, episodes=entities, validation=validation)
        return teacher_or_bayes(teacher, bayes, split, view, REWARDS)  # type: ignore[arg-type]

    everyone = np.ones(len(labels), dtype=bool)
    # Validation like training (half the openings are bursts): blocking the opening pays, the teacher.
    chosen, info = judged_on(labels, everyone)
    assert chosen is teacher and info["warm_start_used"] == "teacher"
    assert info["warm_start_validation"]["teacher"] > info["warm_start_validation"]["bayes"]
    # A later period where no opening is a burst: the teacher blocks every customer for nothing, a loss
    # on every episode (the CI is below zero): Bayes.
    chosen, info = judged_on(np.zeros_like(labels), everyone)
    assert chosen is bayes and info["warm_start_used"] == "bayes"
    assert info["warm_start_diff"][2] < 0
    # Five bursts in 60 episodes: the teacher is still worse on average (it blocks 55 customers to stop
    # five bursts) but by less than the bootstrap spread (how many bursts a resample holds): a loss that
    # is not clear keeps the teacher.
    five_bursts = np.where(entities < 10, labels, 0)
    chosen, info = judged_on(five_bursts, entities < 60)
    assert info["warm_start_diff"][0] < 0 < info["warm_start_diff"][2]
    assert chosen is teacher
    # Without validation episodes there is nothing to judge on: the teacher, no record.
    chosen, info = judged_on(labels, np.zeros(len(labels), dtype=bool))
    assert chosen is teacher and info == {}
