"""The fast path decides exactly what the straightforward one does, on a few thousand recorded requests.

Fast: requests decided in micro-batches (what the API's decider and the stream worker do) with the
risk attributions vectorised in numpy, the rules over the batch's columns. Straightforward: one request
at a time, each row's rules by CEL on a dict of all its facts (``DecisionEngine.batched = False``), and
the attributions recomputed in torch the plain way (tests/model_helpers.py). Same inputs, same seed:
the same action probabilities, rules, reasons, propensities and sentences; reason weights (4 decimals)
may differ by float noise only.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from decision_platform.config import Settings
from decision_platform.core.records import STORED, DecisionRecord, RowStatus
from decision_platform.data import generate
from decision_platform.features import FeatureResult
from decision_platform.learning.replay import shift_to_now
from decision_platform.models.risk import RiskModel
from decision_platform.serving.engine import DecisionEngine, DecisionRequest
from decision_platform.serving.platform import Platform
from tests.model_helpers import deeplift_in_torch

REQUESTS = 2000
BATCH = 64


class _Recorder:
    """A sink that is durable at once: this test compares decisions, not storage."""

    def __init__(self) -> None:
        self.records: list[DecisionRecord] = []

    def submit_many(self, records: list[DecisionRecord]) -> Future[list[RowStatus]]:
        self.records.extend(records)
        future: Future[list[RowStatus]] = Future()
        future.set_result([STORED] * len(records))
        return future

    def find_decision_by_event(self, event_id: str) -> DecisionRecord | None:
        return None


@pytest.fixture(scope="module")
def recorded() -> list[Any]:
    """Synthetic traffic with bursts and fraud (rules fire on some), replayed as of now."""
    return shift_to_now(generate(n_entities=250, days=2, seed=7).events)[:REQUESTS]


def _engine(platform: Platform, sink: _Recorder) -> DecisionEngine:
    return DecisionEngine(
        platform.settings,
        platform.engine.spec,
        platform.store,
        platform.models,
        platform.rules,
        sink,
        reasons=platform.engine.reasons,
    )


def _records(sink: _Recorder) -> list[DecisionRecord]:
    return list(sink.records)


def _same_reasons(fast: list[dict[str, Any]], slow: list[dict[str, Any]]) -> None:
    assert [(r["feature"], r["direction"], r["kind"], r["text"]) for r in fast] == [
        (r["feature"], r["direction"], r["kind"], r["text"]) for r in slow
    ]
    assert np.allclose([r["weight"] for r in fast], [r["weight"] for r in slow], atol=2e-4)


def test_batched_decisions_equal_one_at_a_time(
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
    recorded: list[Any],
) -> None:
    platform = start_platform(make_settings(policy_seed=11))
    applied = platform.store.update(recorded)
    requests = [DecisionRequest(e.entity_id, e) for e in recorded]
    # Decisions without an event as well: the features at a read.
    readers = sorted({e.entity_id for e in recorded})[:250]
    reads = [platform.store.read(entity, recorded[-1].timestamp) for entity in readers]
    requests += [DecisionRequest(entity) for entity in readers]
    features: list[FeatureResult] = [*applied, *reads]

    batched, single = _Recorder(), _Recorder()
    fast, slow = _engine(platform, batched), _engine(platform, single)
    slow.batched = False  # row by row: a facts dict of every feature, each rule by CEL
    for start in range(0, len(requests), BATCH):
        fast.decide_batch(requests[start : start + BATCH], features=features[start : start + BATCH])
    for request, result in zip(requests, features, strict=True):
        slow.decide_batch([request], features=[result])

    fast_records, slow_records = _records(batched), _records(single)
    assert len(fast_records) == len(slow_records) == len(requests)
    for f, s in zip(fast_records, slow_records, strict=True):
        assert f.fallback is None and s.fallback is None
        assert f.features == s.features
        assert np.allclose(f.probabilities, s.probabilities, rtol=1e-9, atol=1e-12)
        assert (f.action, f.proposed_action, f.action_mask, f.decided_by) == (
            s.action,
            s.proposed_action,
            s.action_mask,
            s.decided_by,
        )
        assert f.propensity == pytest.approx(s.propensity, rel=1e-9)
        assert f.risk == pytest.approx(s.risk, rel=1e-9) and f.anomaly == pytest.approx(s.anomaly, rel=1e-9)
        assert f.rules_fired == s.rules_fired
        assert f.explanation == s.explanation
        _same_reasons(f.reasons, s.reasons)
    # The recording exercises what it claims to: several actions, rules firing, reasons given.
    assert len({r.action for r in fast_records}) >= 2
    assert sum(bool(r.rules_fired) for r in fast_records) >= 10
    assert sum(len(r.reasons) >= 3 for r in fast_records) >= len(fast_records) // 2


def test_batched_attributions_give_the_plain_computations_reasons(
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
    recorded: list[Any],
) -> None:
    """The risk model's vectorised DeepLIFT over the recording equals the plain torch computation
    (tests/model_helpers.py), and so do the reasons built from each."""
    platform = start_platform(make_settings())
    models, builder = platform.models, platform.engine.reasons
    assert models.risk is not None and models.anomaly is not None and builder is not None
    features = np.vstack([r.values for r in platform.store.update(recorded)])
    anomaly = models.anomaly.score(features)
    inputs = RiskModel.inputs(features, anomaly)

    risk, attributions = models.risk.explain(inputs)
    plain_risk, plain = deeplift_in_torch(models.risk, inputs)

    assert np.allclose(risk, models.risk.predict(inputs), rtol=1e-12, atol=0)
    assert np.allclose(risk, plain_risk, rtol=1e-9, atol=0)
    assert np.allclose(attributions, plain, rtol=1e-7, atol=1e-9)
    attributes = [e.attributes for e in recorded]
    fast = builder.reasons(inputs, attributions, anomaly, attributes)
    slow = builder.reasons(inputs, plain, anomaly, attributes)
    for f, s in zip(fast, slow, strict=True):
        _same_reasons(f, s)
