"""Off-policy estimators on a case where the true value is known."""

from __future__ import annotations

import numpy as np
import pytest

from decision_platform.learning.config import GateSettings
from decision_platform.learning.evaluation import check_gate, estimate_policy
from decision_platform.learning.ope import Estimate, evaluate, evaluate_difference, fit_reward_model
from tests.unit.test_policy_baselines import _logged


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def bandit(
    n: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """States, the logging policy's probabilities, its sampled actions, rewards, and E[r | x, a]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    mean_reward = np.column_stack([1.0 + x[:, 0], 0.5 + 0.5 * x[:, 1], -1.0 + 2.0 * x[:, 0]])
    logging = softmax(np.column_stack([0.2 * x[:, 0], np.zeros(n), -0.3 * x[:, 1]]))  # stochastic, known
    actions = (rng.random(n)[:, None] > np.cumsum(logging, axis=1)).sum(axis=1)
    rewards = mean_reward[np.arange(n), actions] + rng.normal(scale=0.5, size=n)
    return x, logging, actions, rewards, mean_reward


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_estimates_cover_the_true_value_of_a_different_policy(seed: int) -> None:
    x, logging, actions, rewards, mean_reward = bandit(4000, seed)
    target = softmax(np.column_stack([2.0 * x[:, 0], np.zeros(len(x)), x[:, 0]]))  # prefers what pays
    truth = float((target * mean_reward).sum(axis=1).mean())
    propensities = logging[np.arange(len(actions)), actions]
    report = evaluate(
        target, actions, propensities, rewards, fit_reward_model(x, actions, rewards), n_bootstrap=400
    )
    for name in ("IPS", "SNIPS", "DR"):
        estimate = report.estimates[name]
        assert estimate.ci_low <= truth <= estimate.ci_high, (name, estimate, truth)
    # DR with a decent reward model is the tightest.
    width = {k: e.ci_high - e.ci_low for k, e in report.estimates.items()}
    assert width["DR"] < width["IPS"]
    assert 0 < report.effective_sample_size <= report.n


def test_evaluating_the_logging_policy_itself_gives_its_average_reward() -> None:
    _x, logging, actions, rewards, _ = bandit(2000, 7)
    propensities = logging[np.arange(len(actions)), actions]
    report = evaluate(logging, actions, propensities, rewards, n_bootstrap=200)
    assert report.estimates["SNIPS"].value == pytest.approx(rewards.mean())
    assert report.effective_sample_size == pytest.approx(report.n)


def test_a_worse_policy_is_estimated_worse() -> None:
    x, logging, actions, rewards, _ = bandit(4000, 11)
    propensities = logging[np.arange(len(actions)), actions]
    good = softmax(np.column_stack([3.0 * x[:, 0], np.zeros(len(x)), np.zeros(len(x))]))
    always_block = np.tile([0.0, 0.0, 1.0], (len(x), 1))
    q = fit_reward_model(x, actions, rewards)
    good_value = evaluate(good, actions, propensities, rewards, q, n_bootstrap=300).estimates["DR"]
    bad_value = evaluate(always_block, actions, propensities, rewards, q, n_bootstrap=300).estimates["DR"]
    assert bad_value.ci_high < good_value.ci_low


def test_zero_propensity_is_refused() -> None:
    with pytest.raises(ValueError, match="propensities"):
        evaluate(np.ones((1, 3)) / 3, np.array([0]), np.array([0.0]), np.array([1.0]))


@pytest.mark.parametrize("seed", [4, 5])
def test_the_paired_difference_covers_the_true_gain_and_is_tighter_than_two_intervals(seed: int) -> None:
    x, logging, actions, rewards, mean_reward = bandit(3000, seed)
    propensities = logging[np.arange(len(actions)), actions]
    q = fit_reward_model(x, actions, rewards)
    better = softmax(np.column_stack([2.0 * x[:, 0], np.zeros(len(x)), x[:, 0]]))
    true_gain = float(((better - logging) * mean_reward).sum(axis=1).mean())
    difference = evaluate_difference(better, logging, actions, propensities, rewards, q, n_bootstrap=400)
    separate = [evaluate(p, actions, propensities, rewards, q, n_bootstrap=400) for p in (better, logging)]
    for name in ("IPS", "DR"):
        d = difference[name]
        assert d.ci_low <= true_gain <= d.ci_high, (name, d, true_gain)
        assert d.value == pytest.approx(separate[0].estimates[name].value - separate[1].estimates[name].value)
        widths = [r.estimates[name].ci_high - r.estimates[name].ci_low for r in separate]
        assert d.ci_high - d.ci_low < sum(widths) / 2  # what pairing buys


def test_the_gate_refuses_a_candidate_whose_safety_no_label_can_show() -> None:
    """Fraud is rare: a held-out window can hold no fraud-labelled decision at all. The fraud check then
    has nothing to measure, and an allow-all candidate passed it as "0.0% of fraud allowed" (with the DR
    check, which such a window favours, nothing stopped its promotion)."""
    logged = _logged(np.zeros(400))  # good users only: no fraud outcome came back
    allow_all = np.tile([1.0, 0.0, 0.0], (len(logged), 1))
    q_hat = np.zeros((len(logged), 3))
    gate = GateSettings(bootstrap=100)
    candidate = estimate_policy("candidate", "c", allow_all, logged, q_hat, gate)
    champion = estimate_policy("champion", "p", allow_all, logged, q_hat, gate)
    better = {"DR": Estimate("DR", 1.0, 0.5, 1.5)}
    result = check_gate(champion, candidate, gate, better)
    failed = {c.name: c.detail for c in result.checks if not c.passed}
    assert not result.passed
    assert "fraud let through" in failed and "no held-out decision" in failed["fraud let through"]
    assert "good users blocked" not in failed  # 400 good users' outcomes: that check measures something
