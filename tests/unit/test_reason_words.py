"""The words of a value are written once per distinct value (``Wording``'s cache): a cached reason is the
reason written afresh, for every kind of input, the zeros of both signs, and values given their words."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from decision_platform.explain import reasons as reasons_module
from decision_platform.explain.attributions import ReasonBuilder
from decision_platform.explain.reasons import Wording, format_value, template_sentence

NAMES = [
    "count_1m",
    "distinct_device_1h",
    "seconds_since_last",
    "amount",
    "sum_1h",
    "mean_24h",
    "anomaly",
    "risk",
    "attr_balance",
    "code_country",
    "hour_sin",
]
TYPICAL = [None, {"low": 0.0, "high": 2.0}, {"low": 1.5, "high": 1234.567}, {"low": -3.0, "high": 0.25}]


def test_cached_words_are_the_words_written_afresh(monkeypatch) -> None:
    monkeypatch.setattr(reasons_module, "WORDS_CACHE", 50)  # and starting over keeps them right
    rng = random.Random(3)
    wordings = {(n, k): Wording(n, t) for n in NAMES for k, t in enumerate(TYPICAL)}
    values = [0.0, -0.0, 1.0, 2.0, 2.0000001, 1e-5, -1e-5, 0.004, 0.1, 1234.567, 1234.5671, 5000.0, -2.5]
    for _ in range(6000):
        (name, k), wording = rng.choice(list(wordings.items()))
        value = rng.choice(
            [*values, round(rng.uniform(-10, 3000), rng.randrange(5)), float(rng.randrange(30))]
        )
        weight = rng.choice([-0.3, 0.0, 0.05, 1.23456789])
        kind = rng.choice(["risk", "anomaly"])
        display = rng.choice([None, None, None, "", "03:15 UTC", "'FR'"])
        fresh = Wording(name, TYPICAL[k]).reason(kind, value, weight, display)
        assert wording.reason(kind, value, weight, display) == fresh
        assert str(wording.reason(kind, value, weight, display)["value"]) == str(fresh["value"])  # -0.0


def test_a_count_of_one_is_singular() -> None:
    """``1 event``, never ``1 events``; every other count plural -- in the sentence and the reason alike."""
    typical = {"low": 2.0, "high": 6.0}
    assert Wording("count_1m", typical).reason("risk", 1.0, 0.4)["text"] == (
        "1 event in the last minute (below the typical 2 to 6)"
    )
    assert Wording("count_1m", None).reason("risk", 3.0, 0.4)["text"] == "3 events in the last minute"
    assert Wording("count_1m", None).reason("risk", 0.0, 0.4)["text"] == "0 events in the last minute"
    assert Wording("distinct_device_1h", None).reason("risk", 1.0, 0.4)["text"] == (
        "1 distinct device in the last hour"
    )
    assert reasons_module.reason_text({"feature": "count_1h", "value": 1.0}) == "1 event in the last hour"


@settings(max_examples=500, deadline=None)
@given(st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True))
def test_a_score_is_never_written_as_0_or_1_that_it_is_not(value: float) -> None:
    """A risk of 0.0004 written "0.000" beside a block reads as no risk at all, 0.9996 as "1.00" certainty."""
    for name in ("risk", "anomaly"):
        assert 0.0 < float(format_value(name, value)) < 1.0, (name, value, format_value(name, value))


def test_the_response_sentence_writes_the_risk_as_every_narrative_does() -> None:
    """The /decide sentence said "risk 0.00" for a risk of 0.004 (its own two-decimal format)."""
    assert template_sentence(2, 0.004, [], [], None) == "Blocked: risk 0.004."
    assert template_sentence(0, 0.9996, [], [], None) == "Allowed: risk 0.9996."


def test_a_tiny_score_is_written_short_and_still_not_zero() -> None:
    """A risk of 2e-87 (a confident model) was written with 87 decimals in the /decide sentence."""
    assert format_value("risk", 2e-87) == "2.0e-87"
    assert format_value("anomaly", 3.4e-5) == "3.4e-05"
    assert format_value("risk", 0.00012) == "0.0001"
    for value in (1e-300, 5e-7, 9.99e-5, 1e-4, 0.5, 1 - 1e-12):
        shown = format_value("risk", value)
        assert len(shown) <= 16 and 0.0 < float(shown) < 1.0, (value, shown)


def test_a_zero_is_never_written_with_a_sign() -> None:
    for name in NAMES:
        for value in (-0.0, -0.001, -0.004, -1e-12):
            shown = format_value(name, value)
            assert float(shown.replace(",", "")) != 0 or not shown.startswith("-"), (name, value, shown)
    assert Wording("amount", {"low": -0.004, "high": 2.0}).reason("risk", -0.0, 0.3)["text"] == (
        "amount 0.00 (within the typical 0.00 to 2.00)"
    )


def test_a_missing_numeric_attribute_is_said_absent_not_zero() -> None:
    """A CSV's missing cell is a 0 to the models, and its reason read "attr addr1 0": a value the event
    never had. Absent it is said so; a 0 sent is still a 0."""
    builder = ReasonBuilder(SimpleNamespace(input_names=["amount", "attr_addr1", "anomaly"]), None, None)
    rows = np.array([[10.0, 0.0, 0.5]] * 4)
    attributions = np.array([[0.1, 1.5, 0.0]] * 4)
    given: list[dict[str, object] | None] = [None, {}, {"addr1": 0}, {"addr1": "n/a"}]
    texts = [reasons[0]["text"] for reasons in builder.reasons(rows, attributions, None, given)]
    assert texts == ["attr addr1 absent", "attr addr1 absent", "attr addr1 0", "attr addr1 not a number"]
