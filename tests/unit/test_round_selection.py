"""Which PPO round is kept: a round replaces the clone only with evidence on the validation episodes."""

from __future__ import annotations

import numpy as np

from decision_platform.training.train import keep_round
from decision_platform.training.yardstick import Expectation

KEYS = (
    "decisions",
    "fraud_reached",
    "fraud_stopped",
    "fraud_amount_lost",
    "good_throttled",
    "good_blocked",
    "good_abandoned",
)


def judged(rewards: np.ndarray) -> Expectation:
    """An actor's expectation on the validation episodes: its expected total reward per episode."""
    n = len(rewards)
    per_entity = {"reward": np.asarray(rewards, dtype=np.float64)} | {k: np.ones(n) for k in KEYS}
    return Expectation(np.ones(n), np.zeros(n), per_entity)


# 400 validation episodes, the clone earning ~10 each.
CLONE = 10.0 + np.random.default_rng(0).normal(0.0, 3.0, 400)
# A round that earns 0.2 more on every episode: a small gain, but no resample undoes it.
STEADY = CLONE + 0.2
# A round that earns more on average (+0.5) by a few episodes: 10 of 400 gain 100, 10 lose 80, the rest
# earn what the clone does.
LUCKY = CLONE + np.select([np.arange(400) < 10, np.arange(400) < 20], [100.0, -80.0], 0.0)
# A round that loses a little everywhere.
WORSE = CLONE - 0.1


def test_a_round_moves_away_from_the_clone_only_with_a_ci_above_zero() -> None:
    values = [judged(r) for r in (CLONE, LUCKY, WORSE)]
    # The lucky round earns the most on validation: the point estimate keeps it.
    assert keep_round(values, evidence=False)[0] == 1
    # Its gain is a handful of episodes, which resampling undoes: the CI spans zero, the clone stays.
    kept, info = keep_round(values)
    assert kept == 0
    low, high = info["round_diffs"][0][1:]
    assert low <= 0 < high
    assert info["round_diffs"][0][0] > 0.4
    # The worse round is below the clone on every resample.
    assert info["round_diffs"][1][2] < 0


def test_of_the_rounds_with_evidence_the_one_earning_most_is_kept() -> None:
    values = [judged(r) for r in (CLONE, LUCKY, STEADY, CLONE + 0.3, WORSE)]
    kept, info = keep_round(values)
    # STEADY (+0.2) and +0.3 both clear the clone; +0.3 earns more. LUCKY (+0.5) has no evidence.
    assert kept == 3
    assert [d[1] > 0 for d in info["round_diffs"]] == [False, True, True, False]
    # Without evidence the point estimate decides: the lucky round.
    assert keep_round(values, evidence=False)[0] == 1


def test_only_the_clone_or_only_ties_keep_the_clone() -> None:
    assert keep_round([judged(CLONE)]) == (0, {})
    kept, info = keep_round([judged(CLONE), judged(CLONE.copy())])
    assert kept == 0 and info["round_diffs"] == [[0.0, 0.0, 0.0]]
    # The first of two equal rounds with evidence.
    assert keep_round([judged(CLONE), judged(STEADY), judged(STEADY.copy())])[0] == 1
