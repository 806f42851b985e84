"""Validation judges every candidate (clone sharpening, PPO rounds, teacher or Bayes) under the rules'
masks of the validation rows, as serving applies them and as held-out time judges them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from decision_platform.config import PROJECT_ROOT
from decision_platform.core.rewards import RewardTable
from decision_platform.training.train import teacher_or_bayes, validation_value

REWARDS = RewardTable.load(PROJECT_ROOT / "config" / "rewards.yaml")
FLOOR = np.array([False, True, True])  # a floor rule fired: allow removed
OPEN = np.array([True, True, True])


def _episodes(good: int, fraud: int) -> tuple[SimpleNamespace, SimpleNamespace, np.ndarray, np.ndarray]:
    """Entities of two payments, all good or all fraud: an opening of 10 a floor rule flags, then 100.

    Per row, for the opening (amount 10): good allow 1.2, throttle -1.37, block -20; fraud allow -25,
    throttle -6.8, block 1. The second payment: good allow 3, fraud allow -115.
    A sharp actor allows the opening; a soft one keeps 10% on block there (both allow the second).
    Without masks, the soft one's 10% block stops 10% of the frauds' -115 (fraud +14.1 each, good -2.42):
    with 5 customers a fraud it wins. Under the floor rule, serving takes the sharp actor's allow to
    throttle (the allowed action nearest to it) and the soft one's renormalised mass to a certain
    block: good -1.37 + 0.9 x 3 against -20, fraud -6.8 - 0.3 x 115 against +1 -- the sharp one wins."""
    entities = np.repeat(np.arange(good + fraud), 2)
    labels = (entities >= good).astype(int)
    opening = np.tile([True, False], good + fraud)
    amounts = np.where(opening, 10.0, 100.0)
    states = opening[:, None].astype(np.float32)

    def actor(block: float) -> SimpleNamespace:
        def probabilities(x: np.ndarray) -> np.ndarray:
            first = x[:, 0] > 0.5
            return np.where(first[:, None], [1.0 - block, 0.0, block], [1.0, 0.0, 0.0])

        return SimpleNamespace(probabilities=probabilities)

    split = SimpleNamespace(labels=labels, amounts=amounts)
    view = SimpleNamespace(states=states, episodes=entities, validation=np.ones(len(labels), dtype=bool))
    masks = np.where(opening[:, None], FLOOR, OPEN)
    return split, view, masks, np.array([actor(0.0), actor(0.1)], dtype=object)


def test_a_soft_actor_that_wins_without_the_masks_loses_under_them() -> None:
    split, view, masks, (sharp, soft) = _episodes(good=100, fraud=20)

    def value(actor: SimpleNamespace, masks: np.ndarray | None) -> float:
        return validation_value(actor, split, view, REWARDS, masks)  # type: ignore[arg-type]

    # Without the masks (what validation judged before): the soft actor, by (20 x 14.1 - 100 x 2.42) / 120.
    assert value(soft, None) - value(sharp, None) > 0.3
    # As served: the sharp one, by (100 x 21.33 - 20 x 42.3) / 120.
    assert value(sharp, masks) - value(soft, masks) > 10.0
    # Exactly the held-out yardstick's numbers: sharp = (100 x (-1.37 + 2.7) + 20 x (-6.8 - 34.5)) / 120.
    assert abs(value(sharp, masks) - (100 * 1.33 + 20 * -41.3) / 120) < 1e-5


def test_the_warm_start_choice_is_judged_under_the_masks() -> None:
    split, view, masks, (sharp, soft) = _episodes(good=100, fraud=20)

    def choice(masks: np.ndarray | None) -> tuple[object, dict]:
        return teacher_or_bayes(soft, sharp, split, view, REWARDS, 0, masks)  # type: ignore[arg-type]

    chosen, info = choice(None)
    assert chosen is soft and info["warm_start_used"] == "teacher"
    chosen, info = choice(masks)
    assert chosen is sharp and info["warm_start_used"] == "bayes"
    assert info["warm_start_diff"][2] < 0
