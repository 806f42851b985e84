"""Shadow policy on PostgreSQL: its choices stored as JSONB beside the decisions, compared with outcomes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.learning.compare import compare_logged
from decision_platform.serving.engine import DecisionRequest
from decision_platform.serving.platform import Platform
from tests.conftest import PG_URL
from tests.integration.conftest import query
from tests.model_helpers import register_policy

pytestmark = pytest.mark.integration

BLOCK = 2


def test_shadow_choices_are_stored_and_compared_on_postgresql(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform], pg_schema: str
) -> None:
    settings = make_settings(database_url=PG_URL, database_schema=pg_schema, model_refresh_s=0)
    platform = start_platform(settings)
    platform.engine.decide("pg-none")  # before the shadow: stored as SQL NULL
    shadow = register_policy(platform.registry, BLOCK)
    platform.registry.shadow(shadow)
    assert platform.reload_models().shadow == {"policy": shadow}

    requests = [
        DecisionRequest(
            f"pg-{i % 5}",
            Event(event_id=f"pg-sh-{i}", entity_id=f"pg-{i % 5}", amount=10.0 + 50 * i, event_type="payment"),
        )
        for i in range(40)
    ]
    decisions = platform.engine.decide_batch(requests)
    for i, decision in enumerate(decisions[:30]):
        outcome = "fraud" if i % 6 == 0 else "success"
        if not platform.rewards.possible(outcome, decision.record.action):
            outcome = "false_positive"  # a good customer blocked
        reward = platform.rewards.reward(outcome, decision.record.action, decision.record.amount)
        platform.repository.record_outcome(decision.record.id, outcome, reward)

    rows = query(pg_schema, "SELECT jsonb_typeof(shadow), count(*) FROM decisions GROUP BY 1 ORDER BY 1")
    assert rows == [("object", 40), (None, 1)]
    stored = query(pg_schema, f"SELECT shadow FROM decisions WHERE id = {decisions[0].record.id}")[0][0]
    assert stored == decisions[0].record.shadow and stored["version"] == shadow

    result = compare_logged(platform.repository, settings.exploration_floor, settings.explore_actions)
    assert result.shadow_version == shadow and result.decisions == 40
    assert result.with_outcome == 30 and result.imputed == 0
    assert sum(map(sum, result.confusion)) == 40
    assert result.agreement == pytest.approx(result.confusion[BLOCK][BLOCK] / 40)
    assert result.champion_versions == {platform.models.versions["policy"]: 40}
    rewards = [d.record for d in decisions[:30]]
    assert result.champion_value is not None and result.difference is not None
    mean = sum(
        platform.repository.get_outcome(r.id).reward
        for r in rewards  # type: ignore[union-attr]
    ) / len(rewards)
    assert result.champion_value.value == pytest.approx(mean)
    assert set(result.shadow_values) == {"IPS", "SNIPS", "DR"}
    assert result.effective_sample_size is not None and 0 < result.effective_sample_size <= 30
    newest = compare_logged(
        platform.repository, settings.exploration_floor, settings.explore_actions, limit=10
    )
    assert newest.decisions == 10 and newest.with_outcome == 0  # the 10 newest have no outcome
