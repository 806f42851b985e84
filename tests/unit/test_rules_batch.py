"""Rules over a batch's columns decide exactly what CEL decides row by row.

``RuleSet.evaluate_batch`` computes the common rule shapes with numpy (and falls back to CEL, per row,
for any rule or row it does not understand); ``RuleSet.evaluate`` is CEL on one row's facts dict. Random
rules of every shape the vectoriser knows (and some it does not), on random rows with ties at the
thresholds, missing scores, absent attributes and attributes of every type: the same fired rules, the
same masks, and the same counts of fired and failed evaluations.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from decision_platform.rules.ruleset import BatchFacts, RuleSet, RulesFile, RuleTally

NUMERIC = ["count_1m", "count_5m", "sum_1h", "amount", "anomaly", "risk"]
FEATURES = ["count_1m", "count_5m", "sum_1h"]
THRESHOLDS = [0, 1, 2, 8, 20, 0.5, 0.8, 5000.0, -1, 2.5e3, 1e-3]
LISTS = {
    "allow": ["internal-monitoring", "e1", 3],
    "deny": ["dev-1", "dev-2"],
    "numbers": [1, 2.5, 20],
}
STRINGS = ['"e1"', "'payment'", '"dev-1"']
OPS = ["<", "<=", ">", ">=", "==", "!="]


def _literal(rng: random.Random) -> str:
    value = rng.choice(THRESHOLDS)
    return repr(value) if isinstance(value, float) else str(value)


def _atom(rng: random.Random) -> str:
    shape = rng.randrange(11)
    if shape <= 3:
        return f"{rng.choice(NUMERIC)} {rng.choice(OPS)} {_literal(rng)}"
    if shape == 4:  # the constant on the left
        return f"{_literal(rng)} {rng.choice(OPS)} {rng.choice(NUMERIC)}"
    if shape == 5:
        return f"has(attributes.{rng.choice(['device_id', 'country', 'score'])})"
    if shape == 6:
        key = rng.choice(["device_id", "country", "score", "flag"])
        return f"attributes.{key} in {rng.choice(list(LISTS))}"
    if shape == 7:
        name, op = rng.choice(["entity_id", "event_type"]), rng.choice(["==", "!="])
        return f"{name} {op} {rng.choice(STRINGS)}"
    if shape == 8:
        return f"{rng.choice(['entity_id', 'event_type'])} in {rng.choice(list(LISTS))}"
    if shape == 9:
        key = rng.choice(["device_id", "score", "flag"])
        return f"attributes.{key} {rng.choice(OPS)} {rng.choice([_literal(rng), *STRINGS])}"
    # Shapes the vectoriser leaves to CEL: arithmetic, two facts, functions, booleans.
    return rng.choice(
        [
            "count_1m + count_5m > 10",
            "count_1m > count_5m",
            "size(entity_id) > 2",
            "amount * 2.0 >= 100.0",
            "true",
            "risk > 0.5 == true",
            "entity_id.startsWith('e')",
        ]
    )


def _expression(rng: random.Random, depth: int = 0) -> str:
    if depth >= 2 or rng.random() < 0.4:
        atom = _atom(rng)
        return f"!({atom})" if rng.random() < 0.15 else atom
    left, right = _expression(rng, depth + 1), _expression(rng, depth + 1)
    joined = f"{left} {rng.choice(['&&', '||'])} {right}"
    return f"({joined})" if rng.random() < 0.5 else joined


def _rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        facts: dict[str, Any] = {
            name: float(rng.choice([*THRESHOLDS, rng.uniform(-5, 6000), rng.randrange(30)]))
            for name in NUMERIC
        }
        for score in ("anomaly", "risk"):
            if rng.random() < 0.2:  # a decision that fell back has no scores
                del facts[score]
        facts["entity_id"] = rng.choice(["e1", "e2", "internal-monitoring", ""])
        facts["event_type"] = rng.choice(["payment", "login", ""])
        attributes: dict[str, Any] = {}
        for key in ("device_id", "country", "score", "flag"):
            if rng.random() < 0.6:
                attributes[key] = rng.choice(["dev-1", "dev-3", "FR", "", 3, 20, 2.5, -1.0, True, False])
        facts["attributes"] = attributes
        rows.append(facts)
    return rows


def _columns(rows: list[dict[str, Any]]) -> BatchFacts:
    n = len(rows)
    numbers = {name: np.array([r.get(name, 0.0) for r in rows]) for name in NUMERIC}
    present = {name: np.array([name in r for r in rows]) for name in ("anomaly", "risk")}
    strings = {name: [r[name] for r in rows] for name in ("entity_id", "event_type")}
    return BatchFacts(n, numbers, present, strings, [r["attributes"] for r in rows])


def _rules(expressions: list[str]) -> RuleSet:
    tiers = ["block", "floor", "cap"]
    config = RulesFile.model_validate(
        {
            "lists": LISTS,
            "rules": [
                {"name": f"r{k}", "tier": tiers[k % 3], "when": when} for k, when in enumerate(expressions)
            ],
        }
    )
    return RuleSet(config, FEATURES)


@pytest.mark.parametrize("seed", range(12))
def test_batch_verdicts_equal_cel_row_by_row(seed: int) -> None:
    rng = random.Random(seed)
    rules = _rules([_expression(rng) for _ in range(25)])
    rows = _rows(rng, 300)
    per_row, batch = RuleTally(r.name for r in rules.rules), RuleTally(r.name for r in rules.rules)
    expected = [rules.evaluate(facts, per_row) for facts in rows]
    got = rules.evaluate_batch(_columns(rows), batch)
    assert got == expected
    assert (batch.hits, batch.errors) == (per_row.hits, per_row.errors)
    # The random rules exercise what they claim to: rules fire, fail, and most are vectorised.
    assert sum(per_row.hits.values()) > 0 and sum(per_row.errors.values()) > 0
    assert len(rules.vectorised) >= 15


def test_the_shipped_rules_are_all_vectorised_and_agree_at_their_thresholds() -> None:
    from decision_platform.config import PROJECT_ROOT

    rules = RuleSet.load(PROJECT_ROOT / "config" / "rules.yaml", ["count_1m", "count_5m", "sum_1h"])
    assert rules.vectorised == [r.name for r in rules.rules]
    rng = random.Random(1)
    rows = _rows(rng, 200)
    for i, facts in enumerate(rows):  # ties at every shipped threshold, and the listed values
        facts["count_1m"] = [19.0, 20.0, 20.0000001, 19.999999][i % 4]
        facts["count_5m"] = [8.0, 7.999999, 8.5][i % 3]
        facts["amount"] = [5000.0, 4999.99, 5000.01][i % 3]
        if "anomaly" in facts:
            facts["anomaly"] = [0.8, 0.7999999, 0.8000001][i % 3]
        if i % 5 == 0:
            facts["attributes"]["device_id"] = "dev-known-stolen-0001"
        if i % 7 == 0:
            facts["entity_id"] = "qa-synthetic-buyer"
    per_row, batch = RuleTally(r.name for r in rules.rules), RuleTally(r.name for r in rules.rules)
    expected = [rules.evaluate(facts, per_row) for facts in rows]
    assert rules.evaluate_batch(_columns(rows), batch) == expected
    assert (batch.hits, batch.errors) == (per_row.hits, per_row.errors)
    assert all(per_row.hits[name] > 0 for name in per_row.hits)


def test_a_rule_the_vectoriser_does_not_know_is_evaluated_by_cel() -> None:
    rules = _rules(["count_1m + count_5m > 10", "count_1m > 3 && size(entity_id) > 1", "count_1m > 3"])
    assert rules.vectorised == ["r2"]
    rows = [
        {"count_1m": 4.0, "count_5m": 7.0, "sum_1h": 0.0, "amount": 0.0, "entity_id": "ab"},
        {"count_1m": 1.0, "count_5m": 7.0, "sum_1h": 0.0, "amount": 0.0, "entity_id": "a"},
    ]
    for row in rows:
        row.update(event_type="", attributes={}, anomaly=0.1, risk=0.1)
    verdicts = rules.evaluate_batch(_columns(rows))
    assert [[r.name for r in v.fired] for v in verdicts] == [["r0", "r1", "r2"], []]
