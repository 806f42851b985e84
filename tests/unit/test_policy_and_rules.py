"""Rules tiers always win; the serving distribution keeps the exploration floor and the rules' mask."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.models.policy import serving_distribution, serving_distributions
from decision_platform.rules.ruleset import RuleSet, RulesFile, Tier, mask_for
from decision_platform.serving.engine import DecisionRequest
from decision_platform.serving.platform import Platform

tiers = st.sets(st.sampled_from(list(Tier)))
probabilities = st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda p: sum(p) > 1e-6)


@given(tiers)
def test_tiers_filter_the_action_set(fired: set[Tier]) -> None:
    mask = mask_for(fired)
    if Tier.BLOCK in fired:
        assert mask == (False, False, True)  # non-overridable, even by an allow-list cap
    else:
        assert mask[1]  # throttle is always possible
        assert mask[0] == (Tier.FLOOR not in fired)
        assert mask[2] == (Tier.CAP not in fired)


@settings(max_examples=300)
@given(probabilities, tiers, st.floats(0.0, 0.3))
def test_final_action_is_always_one_the_rules_allow(p: list[float], fired: set[Tier], floor: float) -> None:
    mask = mask_for(fired)
    dist = serving_distribution(np.array(p), mask, floor, explore_actions=(0, 1))
    assert dist.sum() == pytest.approx(1.0)
    assert np.all(dist >= -1e-12)
    assert all(dist[a] == 0 for a in range(3) if not mask[a])
    allowed = [a for a in range(3) if mask[a]]
    if len(allowed) > 1:
        for a in allowed:
            if a in (0, 1):
                assert dist[a] >= floor - 1e-9  # every explorable allowed action keeps its floor
        # Exploration never raises block above what the policy itself gave it.
        restricted = np.where(mask, p, 0.0)
        if restricted.sum() > 1e-12:
            assert dist[2] <= restricted[2] / restricted.sum() + 1e-9


@pytest.mark.parametrize("explore_actions", [(0, 1), (0, 1, 2), (1,), ()])
@pytest.mark.parametrize("floor", [0.0, 0.01, 0.05, 0.3])
def test_the_batch_distribution_is_the_per_row_one_bit_for_bit(
    floor: float, explore_actions: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(int(floor * 100) + len(explore_actions))
    n = 3000
    p = rng.dirichlet([0.3, 0.3, 0.3], size=n)
    # Edges: mass only where the rules forbid, exact zeros, ties, values at the floor, tiny totals.
    p[:100] = [0.0, 0.0, 1.0]
    p[100:200] = [floor, 1.0 - 2 * floor, floor]
    p[200:300] = [1e-13, 1e-14, 1.0 - 1e-13]
    p[300:400] = [1 / 3, 1 / 3, 1 / 3]
    p[400:500] = [0.5, 0.5, 0.0]
    fired = [(), (Tier.FLOOR,), (Tier.CAP,), (Tier.BLOCK,), (Tier.FLOOR, Tier.CAP)]
    masks = np.array([mask_for(fired[k]) for k in rng.integers(0, len(fired), n)])
    got = serving_distributions(p, masks, floor, explore_actions)
    expected = np.array(
        [serving_distribution(row, mask, floor, explore_actions) for row, mask in zip(p, masks, strict=True)]
    )
    assert np.array_equal(got, expected)


def test_a_capped_block_becomes_a_throttle_not_a_coin_toss() -> None:
    dist = serving_distribution(np.array([0.0, 0.0, 1.0]), mask_for({Tier.CAP}), 0.01, explore_actions=(0, 1))
    assert dist[1] == pytest.approx(0.99) and dist[0] == pytest.approx(0.01) and dist[2] == 0


def test_rules_are_compiled_and_checked_at_load() -> None:
    with pytest.raises(ValueError, match="unknown names"):
        RuleSet(
            RulesFile.model_validate({"rules": [{"name": "r", "tier": "block", "when": "cnt > 3"}]}),
            ["count"],
        )
    with pytest.raises(ValueError, match="cannot compile"):
        RuleSet(
            RulesFile.model_validate({"rules": [{"name": "r", "tier": "block", "when": "count >"}]}),
            ["count"],
        )


def test_a_rule_that_cannot_be_evaluated_does_not_fire() -> None:
    rules = RuleSet(
        RulesFile.model_validate(
            {
                "rules": [
                    {"name": "vip", "tier": "cap", "when": "attributes.tier == 'vip'"},
                    {"name": "big", "tier": "floor", "when": "amount > 100.0"},
                ]
            }
        ),
        [],
    )
    verdict = rules.evaluate({"attributes": {}, "amount": 500.0})
    assert [r.name for r in verdict.fired] == ["big"]
    assert verdict.mask == (False, True, True)


def test_a_decision_drawn_at_random_says_so_in_its_sentence(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> None:
    """Exploration draws an action the policy did not favour: the sentence said "Throttled (step-up
    required): risk 0.01; main factors: ..." as if the risk had called for it. It says the draw, and only
    for the rows whose action is not the favoured one of the distribution they were drawn from."""
    platform = start_platform(make_settings(exploration_floor=0.3, explore_actions=(0, 1, 2)))
    requests = [
        DecisionRequest(entity_id=f"x{i}", event=Event(event_id=f"x{i}", entity_id=f"x{i}", amount=20.0 + i))
        for i in range(60)
    ]
    decisions = platform.engine.decide_batch(requests)
    drawn = 0
    for decision in decisions:
        record = decision.record
        assert record.probabilities is not None and record.fallback is None
        favoured = int(
            np.argmax(
                serving_distribution(np.asarray(record.probabilities), record.action_mask, 0.3, (0, 1, 2))
            )
        )
        said = "at random (exploration; the learned policy proposed " in record.explanation
        assert said == (record.action != favoured), record.explanation
        drawn += said
    assert 0 < drawn < len(decisions)  # a floor of 0.3 on each action draws often, not always
