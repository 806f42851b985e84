"""The rules-only baseline of the training report: the rules' action when the policy proposes allow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from decision_platform.config import PROJECT_ROOT
from decision_platform.core.rewards import RewardTable
from decision_platform.data import LabelledEvents, generate
from decision_platform.data.columns import make_event
from decision_platform.features import FeatureSpec, compute_features
from decision_platform.models.policy import serving_distribution
from decision_platform.models.registry import ModelRegistry
from decision_platform.models.risk import RiskConfig
from decision_platform.rules.ruleset import RuleSet, RulesFile
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.training.simulator import evaluate_policy, group_histories
from decision_platform.training.train import (
    BAYES,
    RULES_ONLY,
    TrainConfig,
    TrainReport,
    rules_only_actions,
    train_all,
)

CONFIG_DIR = PROJECT_ROOT / "config"
TESTERS = ("tester-0", "tester-1", "tester-2")
BURST = 30  # events per tester, 1.5 s apart: count_1m reaches 20 at the 20th


def _with_card_testing(data: LabelledEvents) -> LabelledEvents:
    """The tiny synthetic set plus three card-testing bursts late in (held-out) time."""
    timestamps = [e.timestamp for e in data.events]
    start = min(timestamps) + 0.9 * (max(timestamps) - min(timestamps))
    extra = [
        make_event(
            f"{entity}-{k}",
            entity,
            start + 3600.0 * t + 1.5 * k,
            "payment",
            1.0,
            {"device_id": f"dev-{entity}", "country": "FR", "merchant_category": "gift_cards"},
        )
        for t, entity in enumerate(TESTERS)
        for k in range(BURST)
    ]
    return LabelledEvents.from_unsorted(
        [*data.events, *extra],
        np.r_[data.labels, np.ones(len(extra), dtype=np.int8)],
        np.r_[data.scenarios, np.full(len(extra), "card_testing")],
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> TrainReport:
    root = tmp_path_factory.mktemp("rules-only")
    engine = make_engine(f"sqlite:///{root / 'registry.db'}")
    migrate(engine)
    try:
        return train_all(
            _with_card_testing(generate(n_entities=400, days=4, seed=1)),
            CONFIG_DIR / "features.yaml",
            RewardTable.load(CONFIG_DIR / "rewards.yaml"),
            ModelRegistry(Repository(engine), root / "models"),
            TrainConfig(anomaly_trees=50, risk=RiskConfig(epochs=4), ppo_timesteps=2048, seed=1),
            rules=CONFIG_DIR / "rules.yaml",
        )
    finally:
        engine.dispose()


def test_the_report_has_a_rules_only_row_that_differs_from_allow_all(report: TrainReport) -> None:
    names = [p.name for p in report.policies]
    assert names[0] == "allow-all" and names[1].startswith("risk thresholds")
    assert names[2:] == [BAYES, RULES_ONLY, "PPO policy"]
    # Every policy is judged under the rules, as served: allow-all under the rules is rules only.
    assert report.policies[0].per_entity == report.policies[3].per_entity
    # Without the rules (each policy's own probabilities) the two differ.
    assert report.without_rules is not None
    allow_all, rules_only = (report.without_rules.comparisons[n] for n in ("allow-all", RULES_ONLY))
    assert report.rules["hits"]["card_testing_burst"] >= len(TESTERS) * (BURST - 19)
    assert allow_all.fraud_stopped == 0
    # Expected counts: every tester's episode ends in a stopped fraud (a give-up or the block).
    assert rules_only.fraud_stopped >= len(TESTERS) - 1e-9
    assert rules_only.decisions < allow_all.decisions
    assert rules_only.per_decision.value != allow_all.per_decision.value
    assert report.rules["model_based"] == {"extreme_anomaly": ["anomaly"]}


def test_the_block_rule_stops_the_burst(report: TrainReport) -> None:
    held = report.heldout
    assert held is not None
    actions = held.probabilities[RULES_ONLY].argmax(axis=1)
    for entity in TESTERS:
        rows = np.flatnonzero(held.entity_ids == entity)
        assert len(rows) == BURST
        # count_1m >= 20 from the 20th event on: card_testing_burst (tier block) fires.
        assert (actions[rows[19:]] == 2).all()
        assert (actions[rows[:19]] != 2).all()
    # Replayed alone, every tester's episode ends in a stopped fraud, by the 20th event at the latest.
    rows = np.isin(held.entity_ids, TESTERS)
    histories = group_histories(
        held.entity_ids[rows], actions[rows, None].astype(np.float32), held.labels[rows], held.amounts[rows]
    )
    replay = evaluate_policy(
        "rules",
        lambda s: np.eye(3)[s[:, 0].astype(np.int64)],
        histories,
        RewardTable.load(CONFIG_DIR / "rewards.yaml"),
        n_bootstrap=1,
    )
    assert replay.fraud_stopped == len(TESTERS)
    assert replay.decisions <= len(TESTERS) * 20


def _facts(features: dict[str, float], event: object, anomaly: float, risk: float) -> dict:
    """The facts DecisionEngine._decide_row gives the rules."""
    return {
        **features,
        "amount": float(event.amount or 0.0),  # type: ignore[attr-defined]
        "entity_id": event.entity_id,  # type: ignore[attr-defined]
        "event_type": event.event_type,  # type: ignore[attr-defined]
        "attributes": dict(event.attributes),  # type: ignore[attr-defined]
        "anomaly": anomaly,
        "risk": risk,
    }


def test_offline_evaluation_agrees_with_the_serving_rule_set(tmp_path: Path) -> None:
    data = generate(n_entities=60, days=2, seed=3)
    events = data.events[:1500]
    spec = FeatureSpec.load(CONFIG_DIR / "features.yaml")
    x = compute_features(events, spec)
    rng = np.random.default_rng(0)
    anomaly, risk = rng.random(len(events)), rng.random(len(events))
    device = events[5].attributes["device_id"]
    vip = sorted({e.entity_id for e in events})[:5]
    rules = RuleSet(
        RulesFile.model_validate(
            {
                "lists": {"bad_devices": [device], "vip": vip},
                "rules": [
                    {
                        "name": "bad_device",
                        "tier": "block",
                        "when": "has(attributes.device_id) && attributes.device_id in bad_devices",
                    },
                    {"name": "burst", "tier": "block", "when": "count_5m >= 4"},
                    {"name": "risky", "tier": "floor", "when": "risk >= 0.8"},
                    {"name": "big", "tier": "floor", "when": "amount >= 150.0"},
                    {"name": "odd", "tier": "floor", "when": "event_type == 'payment' && anomaly > 0.95"},
                    {"name": "vip", "tier": "cap", "when": "entity_id in vip"},
                    {"name": "broken", "tier": "block", "when": "attributes.no_such_key == 'x'"},
                ],
            }
        ),
        spec.names,
    )
    result = rules_only_actions(rules, events, x, spec.names, anomaly, risk)

    expected = np.empty(len(events), dtype=np.int8)
    hits = dict.fromkeys((r.name for r in rules.rules), 0)
    for i, event in enumerate(events):
        verdict = rules.evaluate(
            _facts(dict(zip(spec.names, x[i].tolist(), strict=True)), event, anomaly[i], risk[i])
        )
        assert result.masks is not None and tuple(result.masks[i].tolist()) == verdict.mask
        for fired in verdict.fired:
            hits[fired.name] += 1
        # What serving samples when the policy proposes allow with certainty and no exploration.
        expected[i] = serving_distribution(np.array([1.0, 0.0, 0.0]), verdict.mask, 0.0, (0, 1)).argmax()
    np.testing.assert_array_equal(result.actions, expected)
    assert result.hits == hits
    assert set(np.unique(expected)) == {0, 1, 2}  # every outcome is exercised
    assert min(hits[n] for n in ("bad_device", "burst", "risky", "big", "odd", "vip")) > 0
    assert result.errors["broken"] == len(events) and hits["broken"] == 0
    assert result.model_based == {"risky": ["risk"], "odd": ["anomaly"]}
