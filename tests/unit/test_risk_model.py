"""The risk model on its own: input encoding, categorical embeddings, attributions, the baseline's metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from decision_platform.data.columns import make_event
from decision_platform.features import FeatureSpec
from decision_platform.features.spec import category_code
from decision_platform.models.risk import InputEncoder, RiskConfig, RiskModel
from decision_platform.training.baseline import classifier_metrics, recall_at_alert_rate
from decision_platform.training.train import value_inputs

SMALL = RiskConfig(hidden=(32, 16), bins=4, epochs=6, patience=2)


def test_category_codes_are_stable_by_value_and_zero_when_absent() -> None:
    assert category_code(None) == 0.0
    assert category_code(5411) == category_code(5411.0)  # one merchant code, sent either way
    assert category_code("5411") != category_code(5411)  # text is text
    assert category_code("gmail.com") == category_code("gmail.com") != category_code("Gmail.com")
    codes = [category_code(f"device-{i}") for i in range(2000)]
    assert all(0 < c < 2**31 and float(int(c)) == c for c in codes)  # exact in float64
    assert len(set(codes)) == len(codes)


def test_categorical_attributes_become_code_features() -> None:
    spec = FeatureSpec.model_validate(
        {"event_fields": {"numeric_attributes": ["items"], "categorical_attributes": ["device"]}}
    )
    assert spec.names[-2:] == ["attr_items", "code_device"] and spec.categorical_names == ["code_device"]
    events = [
        make_event("e1", "a", 1.0, "payment", 10.0, {"device": "d1"}),
        make_event("e2", "a", 2.0, "payment", 10.0, {}),
    ]
    values = spec.event_values([1.0, 2.0], events)
    assert values[0, -1] == category_code("d1") and values[1, -1] == 0.0


def test_quantile_encoding_is_monotone_and_bounded() -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.lognormal(size=5000), rng.integers(0, 3, size=5000)])  # heavy tail, ties
    encoder = InputEncoder.fit(x, bins=4)
    grid = np.column_stack([np.linspace(-1, 60, 400), np.linspace(-1, 4, 400)])
    for many in (grid, grid[:10]):  # the batch path and the few-rows path agree
        u = encoder.quantiles(many)
        assert np.all(np.diff(u, axis=0) >= -1e-12) and u.min() >= 0.0 and u.max() <= 1.0
    np.testing.assert_allclose(encoder.quantiles(grid[:10]), encoder.quantiles(grid)[:10])
    odd = np.array([[np.inf, -np.inf], [-np.inf, np.nan], [np.nan, np.inf], [1e300, -1e300]])
    few, many = encoder.quantiles(odd), encoder.quantiles(np.vstack([odd, grid]))[: len(odd)]
    assert np.array_equal(few, many)  # bit for bit, the unusual values too
    assert encoder.quantiles(np.array([[np.nan, 1.0]]))[0, 0] == 0.5  # a missing value is the median
    assert encoder.encode_numeric(grid).shape == (400, 2 * (4 + 1))  # 4 pieces and the magnitude


def test_training_expands_the_compact_encoding_into_what_serving_encodes() -> None:
    """Training keeps 2 float32 numbers per input and expands the pieces per batch in torch; the net
    must see the same numbers as the numpy encoding it is served with."""
    import torch

    rng = np.random.default_rng(1)
    x = np.column_stack([rng.lognormal(size=3000), rng.integers(0, 5, size=3000), rng.normal(size=3000)])
    encoder = InputEncoder.fit(x, bins=8)
    rows = np.vstack([x[:500], [[1e9, -3.0, np.nan]]])  # beyond training, below, missing
    quantiles, magnitudes = encoder.compact(rows, chunk=128)
    expanded = encoder.expand(torch.from_numpy(quantiles), torch.from_numpy(magnitudes)).numpy()
    np.testing.assert_allclose(expanded, encoder.encode_numeric(rows), rtol=1e-6, atol=1e-6)


def _categorical_data(n: int = 6000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fraud comes from one device among many, and from large amounts: both must be learnt."""
    rng = np.random.default_rng(seed)
    device = rng.integers(0, 40, size=n)
    amount = rng.lognormal(3, 1, size=n)
    p = 0.02 + 0.5 * (device == 7) + 0.2 * (amount > 80)
    y = (rng.random(n) < np.clip(p, 0, 1)).astype(np.int8)
    codes = np.array([category_code(f"device-{d}") for d in device])
    return np.column_stack([amount, codes, rng.random(n)]), y


def test_an_embedded_category_carries_its_risk_and_its_attribution(tmp_path: Path) -> None:
    x, y = _categorical_data()
    names = ["amount", "code_device", "anomaly"]
    model = RiskModel.fit(x, y, names, SMALL, categorical=[1], seed=0)
    risky, ordinary = x[:1].copy(), x[:1].copy()
    risky[0, 1], ordinary[0, 1] = category_code("device-7"), category_code("device-3")
    risky[0, 0] = ordinary[0, 0] = 20.0
    assert model.predict(risky)[0] > 3 * model.predict(ordinary)[0]
    unseen = ordinary.copy()
    unseen[0, 1] = category_code("never-seen")
    assert np.isfinite(model.predict(unseen)[0])  # the unseen bucket, not an error
    _, attributions = model.explain(np.vstack([risky, ordinary]))
    assert attributions[0, 1] > 0.5 and attributions[0, 1] > abs(attributions[0, 0])
    # Completeness holds exactly with an embedding among the inputs.
    change = model.logits(np.vstack([risky, ordinary])) - model.reference_logit()
    np.testing.assert_allclose(attributions.sum(axis=1), change, rtol=1e-9, atol=1e-9)
    model.save(tmp_path)
    again = RiskModel.load(tmp_path)
    np.testing.assert_allclose(again.predict(x[:50]), model.predict(x[:50]), rtol=1e-6)
    assert again.encoder.categorical == [1]


def test_a_teacher_pulls_the_targets_towards_its_probabilities() -> None:
    x, y = _categorical_data(seed=1)
    names = ["amount", "code_device", "anomaly"]
    confident = RiskModel.fit(x, y, names, SMALL, categorical=[1], teacher=np.full(len(y), 0.5), seed=0)
    plain = RiskModel.fit(x, y, names, SMALL, categorical=[1], seed=0)
    # A teacher that knows nothing (0.5 everywhere) drags the raw logits towards 0 before calibration.
    assert np.std(confident.logits(x) * confident.temperature) < np.std(plain.logits(x) * plain.temperature)


def test_recall_at_an_alert_rate_counts_the_bad_events_in_the_top_scores() -> None:
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0] * 10)
    scores = np.linspace(1, 0, 100)  # the first rows score highest
    assert recall_at_alert_rate(labels, scores, 0.01) == pytest.approx(1 / 20)
    assert recall_at_alert_rate(labels, scores, 0.05) == pytest.approx(2 / 20)
    metrics = classifier_metrics(labels, scores)
    assert set(metrics) == {"roc_auc", "pr_auc", "brier", "recall_at_1%", "recall_at_5%"}
    assert np.isnan(recall_at_alert_rate(np.zeros(10), np.ones(10), 0.05))


def test_integer_attributes_are_embedded_by_value_as_well_as_by_magnitude(tmp_path: Path) -> None:
    """A code sent as a number (a card range): risk lives in one value, not in a range of them."""
    rng = np.random.default_rng(2)
    n = 6000
    card = rng.choice([101, 102, 103, 104, 105, 106], size=n).astype(float)
    y = (rng.random(n) < np.where(card == 104, 0.5, 0.02)).astype(np.int8)  # 104: between harmless ones
    x = np.column_stack([card, rng.lognormal(size=n), rng.random(n), rng.random(n)])
    names = ["attr_card", "amount", "seconds", "anomaly"]
    assert value_inputs(x, names[:-1]) == [0]  # amount is not an integer, seconds not an attribute
    model = RiskModel.fit(x, y, names, SMALL, values=[0], seed=0)
    assert model.encoder.value_inputs == [0] and model.encoder.code_inputs == []
    rows = np.column_stack([[103.0, 104.0, 105.0], np.ones(3), np.full(3, 0.5), np.full(3, 0.5)])
    risk = model.predict(rows)
    assert risk[1] > 3 * max(risk[0], risk[2])
    _, attributions = model.explain(rows)
    assert attributions[1, 0] > 0.5  # the value's embedding and its magnitude: one attribution
    model.save(tmp_path)
    assert RiskModel.load(tmp_path).encoder.value_inputs == [0]


def test_codes_trained_in_float32_are_found_when_served_in_float64() -> None:
    """Training keeps features in float32; serving reads float64. A 31-bit category code (not exact in
    float32) seen in training must map to its own vocabulary entry at serving, not to 'unseen'."""
    codes = np.array([category_code(f"device-{i}") for i in range(5)])
    assert np.any(codes.astype(np.float32).astype(np.float64) != codes)  # float32 does round them
    served = np.repeat(codes, 30)[:, None]
    encoder = InputEncoder.fit(served.astype(np.float32), bins=4, categorical=[0])
    indices = encoder.categories(served)[:, 0]
    assert set(indices.tolist()) == {2, 3, 4, 5, 6}  # each code its own known entry
    assert encoder.categories(np.array([[category_code("never seen")]]))[0, 0] == 1
    saved = InputEncoder.from_arrays(encoder.arrays())
    np.testing.assert_array_equal(saved.categories(served), encoder.categories(served))


@pytest.mark.parametrize("device", ["missing", "unique"])
def test_a_category_never_seen_often_enough_is_rare_not_a_crash(tmp_path: Path, device: str) -> None:
    """A categorical attribute empty in a data set, or with every value rarer than MIN_CATEGORY_COUNT (a
    device id on a small set): its vocabulary is empty; training failed with an IndexError on it."""
    x, y = _categorical_data()
    x[:, 1] = 0.0 if device == "missing" else [category_code(f"d-{i}") for i in range(len(x))]
    model = RiskModel.fit(x, y, ["amount", "code_device", "anomaly"], SMALL, categorical=[1], seed=0)
    assert len(model.encoder.vocabularies[0]) == 0
    rows = x[:2].copy()
    rows[:, 1] = [0.0, category_code("d-1")]
    assert model.encoder.categories(rows)[:, 0].tolist() == [0, 1]  # missing, rare
    assert np.isfinite(model.predict(rows)).all() and np.isfinite(model.explain(rows)[1]).all()
    model.save(tmp_path)
    np.testing.assert_allclose(RiskModel.load(tmp_path).predict(rows), model.predict(rows), rtol=1e-6)
