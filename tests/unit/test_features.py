"""Feature store on fakeredis (the same Lua as production) and the offline twin, against a brute force.

The brute force below restates the semantics as plainly as possible (lists, no bisection, no Lua); the
integration tests reuse it (and the event streams) against a real Redis.
"""

from __future__ import annotations

import math
import socket
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decision_platform.core.events import Event
from decision_platform.features import (
    FeatureResult,
    FeatureSpec,
    FeatureStoreError,
    OfflineWindows,
    RedisFeatureStore,
    compute_features,
    compute_features_with_flags,
    open_feature_store,
)
from decision_platform.features.spec import FEATURE_LIMIT, category_code
from decision_platform.features.store import RedisClusterFeatureStore, parse_cluster_url

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_767_571_200.0  # 2026-01-05T00:00:00Z

DEFAULT_NAMES = [
    *(f"{agg}_{w}" for w in ("1m", "5m", "1h", "24h") for agg in ("count", "sum", "mean", "max")),
    "distinct_device_id_1h",
    "distinct_device_id_24h",
    "seconds_since_last",
    "amount",
    "hour_sin",
    "hour_cos",
]

#: Short windows and a small cap, so a few dozen events exercise every rule (windows, late, cap, trim).
SMALL = FeatureSpec.model_validate(
    {
        "windows": {"10s": 10, "1m": 60, "5m": 300},
        "distinct": [{"attribute": "device_id", "windows": ["1m", "5m"]}],
        "event_fields": {"numeric_attributes": ["items"]},
        "retention": {"max_events_per_entity": 6, "ttl_seconds": 900},
        "late_tolerance_seconds": 240,
    }
)

#: Windows out of length order, a subset of aggregations (with the amount's std), no hour or amount field,
#: attribute windows listed out of order with subsets of aggregations: the layout follows config.
UNORDERED = FeatureSpec.model_validate(
    {
        "windows": {"5m": 300, "10s": 10, "1m": 60},
        "aggregations": ["max", "std", "mean", "count"],
        "attribute_windows": [
            {"attribute": "items", "aggregations": ["std", "max", "count"], "windows": ["5m", "10s"]},
            {"attribute": "score", "aggregations": ["mean", "sum"], "windows": ["1m"]},
        ],
        "distinct": [{"attribute": "device_id", "windows": ["5m", "10s"]}],
        "event_fields": {"amount": False, "hour_of_day": False},
        "retention": {"max_events_per_entity": 4},
    }
)

#: Category codes, every aggregation of an attribute and per-entity ratios (also of attribute windows) on
#: top of SMALL: all must agree online and offline as well.
DERIVED = FeatureSpec.model_validate(
    {
        **SMALL.model_dump(),
        "attribute_windows": [
            {
                "attribute": "score",
                "aggregations": ["count", "sum", "mean", "max", "std"],
                "windows": ["10s", "5m"],
            }
        ],
        "event_fields": {"numeric_attributes": ["items"], "categorical_attributes": ["device_id", "items"]},
        "ratios": [
            {"of": "amount", "to": "mean_5m"},
            {"of": "attr_items", "to": "max_1m"},
            {"of": "max_score_10s", "to": "mean_score_5m"},
        ],
    }
)


# --- the brute force: the documented semantics, restated plainly


@dataclass
class BruteForce:
    spec: FeatureSpec
    stored: dict[str, list[Event]] = field(default_factory=dict)

    def update(self, event: Event) -> tuple[dict[str, float], str]:
        events = self.stored.setdefault(event.entity_id, [])
        t, tolerance = event.timestamp, self.spec.late_tolerance
        cap = self.spec.retention.max_events_per_entity
        if any(e.event_id == event.event_id for e in events):
            return self.features(event.entity_id, t, event, skip=event.event_id), "duplicate"
        if events and t < max(e.timestamp for e in events) - tolerance:
            return self.features(event.entity_id, t, event), "late"
        candidate = [*events, event]
        if len(candidate) > cap and min(candidate, key=_order) is event:
            return self.features(event.entity_id, t, event), "late"  # oldest of a full entity
        newest = max(e.timestamp for e in candidate)
        kept = [e for e in candidate if e.timestamp >= newest - self.spec.largest_window]
        self.stored[event.entity_id] = sorted(kept, key=_order)[-cap:]
        return self.features(event.entity_id, t, event, skip=event.event_id), "stored"

    def features(self, entity_id: str, t: float, event: Event | None, skip: str = "") -> dict[str, float]:
        spec, out = self.spec, {}
        events = self.stored.get(entity_id, [])
        for name, seconds in spec.windows.items():
            inside = [e for e in events if t - seconds < e.timestamp <= t]
            amounts = [e.amount or 0.0 for e in inside]
            for agg in spec.aggregations:
                out[f"{agg}_{name}"] = _aggregate(agg, amounts)
        for item in spec.attribute_windows:
            for name in item.windows:
                inside = [e for e in events if t - spec.windows[name] < e.timestamp <= t]
                numbers = [_number(e.attributes.get(item.attribute)) for e in inside]
                present = [x for x in numbers if x is not None]
                for agg in item.aggregations:
                    out[f"{agg}_{item.attribute}_{name}"] = _aggregate(agg, present)
        for d in spec.distinct:
            for name in d.windows:
                inside = [e for e in events if t - spec.windows[name] < e.timestamp <= t]
                values = {_typed(e.attributes[d.attribute]) for e in inside if d.attribute in e.attributes}
                out[f"distinct_{d.attribute}_{name}"] = len(values)
        if spec.seconds_since_last:
            previous = [e.timestamp for e in events if e.event_id != skip and e.timestamp <= t]
            gap = t - max(previous) if previous else math.inf
            out["seconds_since_last"] = gap if gap < spec.largest_window else spec.largest_window
        if spec.event_fields.amount:
            out["amount"] = (event.amount or 0.0) if event else 0.0
        if spec.event_fields.hour_of_day:
            out["hour_sin"] = math.sin(2 * math.pi * (t % 86400) / 86400)
            out["hour_cos"] = math.cos(2 * math.pi * (t % 86400) / 86400)
        for name in spec.event_fields.numeric_attributes:
            value = event.attributes.get(name) if event else None
            out[f"attr_{name}"] = float(value) if isinstance(value, int | float) else 0.0
        for name in spec.event_fields.categorical_attributes:
            value = event.attributes.get(name) if event else None
            out[f"code_{name}"] = category_code(value)
        for ratio in spec.ratios:
            denominator = out[ratio.to]
            out[ratio.name] = out[ratio.of] / denominator if denominator else 0.0
        return {name: min(max(value, -FEATURE_LIMIT), FEATURE_LIMIT) for name, value in out.items()}


def _aggregate(agg: str, values: list[float]) -> float:
    """An aggregate over a window's values, exactly (fsum, pstdev's rational arithmetic); 0 when empty."""
    if not values:
        return 0.0
    return {
        "count": lambda: float(len(values)),
        "sum": lambda: math.fsum(values),
        "mean": lambda: math.fsum(values) / len(values),
        "max": lambda: max(values),
        "std": lambda: statistics.pstdev(values),
    }[agg]()


def _number(value: object) -> float | None:
    """What a windowed attribute contributes: numbers (true = 1) up to 1e150 in size, nothing otherwise."""
    if isinstance(value, bool | int | float) and math.isfinite(float(value)) and abs(value) <= 1e150:
        return float(value)
    return None


def _order(e: Event) -> tuple[float, str]:
    return (e.timestamp, e.event_id)


def _typed(value: object) -> tuple[str, object]:
    return (type(value).__name__, value)


def assert_close(actual: dict[str, float], expected: dict[str, float], context: object = "") -> None:
    assert list(actual) == list(expected), context
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, rel=1e-9, abs=1e-9), (name, context)


def flag_of(result: FeatureResult) -> str:
    return "duplicate" if result.duplicate else "late" if result.late else "stored"


# --- event streams: several entities, out-of-order within and beyond the tolerance, ties, duplicates


@st.composite
def event_streams(draw: st.DrawFn, max_events: int = 40) -> list[Event]:
    n = draw(st.integers(1, max_events))
    clock, events = T0 + draw(st.floats(0, 86400)), []
    for k in range(n):
        if events and draw(st.integers(0, 6)) == 0:
            events.append(draw(st.sampled_from(events)))  # redelivery of an earlier event
            continue
        clock += draw(st.sampled_from([0.0, 0.5, 3.0, 9.0, 20.0, 61.0, 150.0, 301.0]))
        # Mostly in order; sometimes late within the tolerance (240 s) and sometimes beyond it.
        jitter = draw(st.sampled_from([0.0, 0.0, 0.0, -1.0, -9.5, -70.0, -200.0, -260.0, -400.0]))
        attributes: dict[str, bool | int | float | str] = {}
        device = draw(st.sampled_from([None, "d1", "d2", "d3", 7, "7"]))
        if device is not None:
            attributes["device_id"] = device
        if draw(st.booleans()):
            attributes["items"] = draw(st.sampled_from([1, 2.5, True, "many"]))
        # Negative values, 0, bool, text, a large int, and one beyond the limit (contributes nothing).
        score = draw(st.sampled_from([None, -3.5, -0.25, 0, 0.1, 1, 2.5, 1e4, True, "high", 2**62, 1e200]))
        if score is not None:
            attributes["score"] = score
        amount = draw(st.one_of(st.none(), st.sampled_from([0.0, 0.1, 1.0, 9.99, 250.0, 1e9])))
        events.append(
            Event(
                # Unique, but not ordered like arrival: ties in time are then ordered by id, as in Redis.
                event_id=f"{draw(st.sampled_from('xbm'))}{k:03d}",
                entity_id=draw(st.sampled_from(["alice", "bob", "carol"])),
                timestamp=clock + jitter,
                amount=amount,
                attributes=attributes,
            )
        )
    return events


def check_against_brute_force(store: RedisFeatureStore, events: Sequence[Event]) -> None:
    """Store == brute force for every event (flags and values), then offline == store bit for bit."""
    spec = store.spec
    brute = BruteForce(spec)
    results = []
    # Uneven batches: a batch is one pipeline, and results must not depend on how events are batched.
    for start in range(0, len(events), 7):
        results += store.update(events[start : start + 7])
    for k, (event, result) in enumerate(zip(events, results, strict=True)):
        expected, flag = brute.update(event)
        assert flag_of(result) == flag, (k, event)
        assert_close(result.as_dict(), expected, (k, event))
    offline, duplicate, late = compute_features_with_flags(events, spec)
    np.testing.assert_allclose(offline, np.stack([r.values for r in results]), rtol=1e-12, atol=0)
    assert duplicate.tolist() == [r.duplicate for r in results]
    assert late.tolist() == [r.late for r in results]
    # Reads at arbitrary times, after the stream: store == brute force == offline.
    windows = OfflineWindows(spec)
    for event in events:
        windows.update(event)
    for entity in ("alice", "bob", "carol", "nobody"):
        for at in (events[-1].timestamp, events[-1].timestamp - 30.5, events[0].timestamp + 1000):
            got = store.read(entity, at)
            assert not got.duplicate and not got.late
            assert_close(got.as_dict(), brute.features(entity, at, None), (entity, at))
            raw = np.asarray([windows.read(entity, at)])
            offline_row = spec.assemble(raw, spec.event_values([at], None))[0]
            np.testing.assert_allclose(got.values, offline_row, rtol=1e-12, atol=0)


def snapshot(client: fakeredis.FakeRedis, pattern: str = "*") -> dict[bytes, object]:
    """Every key's content (not TTL), to show that an operation wrote nothing."""
    state: dict[bytes, object] = {}
    for key in sorted(client.scan_iter(match=pattern)):
        if client.type(key) == b"zset":
            state[key] = client.zrange(key, 0, -1, withscores=True)
        else:
            state[key] = client.hgetall(key)
    return state


def stored_ids(store: RedisFeatureStore, entity: str) -> list[str]:
    """Event ids kept for an entity, oldest first, checking both keys agree."""
    zkey, hkey = store.keys(entity)
    ids = [member.split(b",")[0].decode() for member in store.client.zrange(zkey, 0, -1)]
    assert sorted(ids) == sorted(f.decode() for f in store.client.hkeys(hkey) if f != b"#max")
    return ids


def fake_store(spec: FeatureSpec = SMALL) -> RedisFeatureStore:
    return RedisFeatureStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()), spec)


def make_event(k: int, ts: float, entity: str = "alice", amount: float | None = 10.0, **attrs: Any) -> Event:
    return Event(event_id=f"e{k}", entity_id=entity, timestamp=ts, amount=amount, attributes=attrs)


# --- the spec


def test_shipped_config_defines_the_documented_default_features() -> None:
    spec = FeatureSpec.load(ROOT / "config" / "features.yaml")
    assert spec.names == DEFAULT_NAMES
    assert spec.dim == 22
    assert spec.window_seconds == [60, 300, 3600, 86400]
    assert (spec.late_tolerance, spec.ttl_seconds) == (86400, 90000)
    assert spec.retention.max_events_per_entity == 1000
    default = FeatureSpec()
    assert (default.names, default.late_tolerance, default.ttl_seconds) == (spec.names, 86400, 90000)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"distinct": [{"attribute": "device_id", "windows": ["2h"]}]}, "unknown windows"),
        ({"late_tolerance_seconds": 90000}, "late_tolerance_seconds"),
        ({"windows": {"1m": -5}}, "positive"),
        ({"retention": {"ttl_seconds": 60}}, "ttl_seconds"),
        ({"aggregations": ["count", "median"]}, "aggregations"),
        ({"windows": {"1m": 60}, "surprise": 1}, "surprise"),
        (
            {"attribute_windows": [{"attribute": "C1", "aggregations": ["sum"], "windows": ["2h"]}]},
            "unknown windows",
        ),
        (
            {"attribute_windows": [{"attribute": "C1", "aggregations": ["median"], "windows": ["1m"]}]},
            "median",
        ),
        (
            {"attribute_windows": [{"attribute": "C1", "aggregations": ["sum", "sum"], "windows": ["1m"]}]},
            "repeat",
        ),
        (
            {"attribute_windows": [{"attribute": "C1", "aggregations": ["sum"], "windows": ["1m", "1m"]}]},
            "repeat",
        ),
        ({"attribute_windows": [{"attribute": "C1", "aggregations": [], "windows": ["1m"]}]}, "at least 1"),
        (
            {
                "attribute_windows": [
                    {"attribute": "C1", "aggregations": ["sum"], "windows": ["1m"]},
                    {"attribute": "C1", "aggregations": ["max"], "windows": ["1h"]},
                ]
            },
            "listed twice",
        ),
        (
            {
                "attribute_windows": [{"attribute": "card", "aggregations": ["sum"], "windows": ["1m"]}],
                "event_fields": {"categorical_attributes": ["card"]},
            },
            "categorical",
        ),
        ({"ratios": [{"of": "amount", "to": "mean_C1_1h"}]}, "unknown features"),
    ],
)
def test_invalid_spec_is_rejected_with_a_message(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureSpec.model_validate(change)


def test_numeric_attributes_become_features() -> None:
    assert SMALL.names[-4:] == ["amount", "hour_sin", "hour_cos", "attr_items"]


def test_attribute_windows_are_named_by_aggregation_attribute_and_window_after_the_amount_windows() -> None:
    names = UNORDERED.names
    amount = [f"{agg}_{w}" for w in ("5m", "10s", "1m") for agg in ("max", "std", "mean", "count")]
    attributes = ["std_items_5m", "max_items_5m", "count_items_5m", "std_items_10s", "max_items_10s"]
    attributes += ["count_items_10s", "mean_score_1m", "sum_score_1m"]
    assert names == [
        *amount,
        *attributes,
        "distinct_device_id_5m",
        "distinct_device_id_10s",
        "seconds_since_last",
    ]
    # Without attribute windows or std, the layout is the one trained artifacts carry.
    assert SMALL.raw_width == 1 + 3 * 3 + 3


# --- the store against the brute force, and offline == store


@pytest.mark.parametrize("spec", [SMALL, UNORDERED, DERIVED], ids=["small", "unordered", "derived"])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=event_streams())
def test_store_and_offline_match_brute_force(spec: FeatureSpec, events: list[Event]) -> None:
    check_against_brute_force(fake_store(spec), events)


def test_default_spec_on_a_day_of_traffic_matches_offline() -> None:
    rng = np.random.default_rng(3)
    events = [
        make_event(
            k,
            T0 + float(t),
            entity=f"u{rng.integers(5)}",
            amount=float(rng.lognormal(3, 1)),
            device_id=f"d{rng.integers(3)}",
        )
        for k, t in enumerate(np.sort(rng.uniform(0, 2 * 86400, 300)) - rng.choice([0, 0, 100, 5000], 300))
    ]
    store = fake_store(FeatureSpec())
    online = np.stack([r.values for r in store.update(events)])
    # Equal bit for bit on Python 3.11 (same addition order); 3.12's compensated sum() may move an ulp.
    np.testing.assert_allclose(compute_features(events, FeatureSpec()), online, rtol=1e-12, atol=0)


# --- behaviours a user relies on


def test_replaying_a_batch_is_a_no_op_reported_as_duplicates() -> None:
    store = fake_store()
    events = [make_event(k, T0 + 7.0 * k, device_id=f"d{k % 2}") for k in range(5)]
    events += [make_event(9, T0 + 20.0, entity="bob", amount=None)]
    first = store.update(events)
    before = snapshot(store.client)
    again = store.update(events)
    assert [r.duplicate for r in again] == [True] * len(events)
    assert not any(r.late for r in again)
    assert snapshot(store.client) == before
    # In-order events: the replay reports exactly the features of the first delivery.
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.values, b.values)


def test_memory_per_entity_is_capped_keeping_the_latest_events_and_keys_expire() -> None:
    store = fake_store()  # cap 6
    events = [make_event(k, T0 + k, amount=float(k)) for k in range(10)]
    results = store.update(events)
    assert stored_ids(store, "alice") == [f"e{k}" for k in range(4, 10)]
    assert results[-1].as_dict()["count_1m"] == 6  # counts saturate at the cap
    assert results[-1].as_dict()["sum_1m"] == sum(range(4, 10))
    for key in store.keys("alice"):
        assert 0 < store.client.pttl(key) <= 900_000
    # An event older than everything a full entity keeps is not stored (a replay of e0 stays evicted).
    replay = store.update([events[0]])[0]
    assert replay.late and not replay.duplicate
    assert stored_ids(store, "alice") == [f"e{k}" for k in range(4, 10)]


def test_equal_times_at_the_cap_are_evicted_by_event_id_online_and_offline() -> None:
    full = [Event(event_id=f"m{k}", entity_id="alice", timestamp=T0, amount=1.0) for k in range(6)]
    arrivals = [
        Event(event_id="a0", entity_id="alice", timestamp=T0, amount=50.0),  # smallest id: evicted at once
        Event(event_id="z0", entity_id="alice", timestamp=T0, amount=70.0),  # evicts m0
    ]
    store = fake_store()
    results = store.update(full + arrivals)
    assert [r.late for r in results[-2:]] == [True, False]
    assert stored_ids(store, "alice") == ["m1", "m2", "m3", "m4", "m5", "z0"]
    assert results[-1].as_dict()["sum_10s"] == 75.0
    offline, _, late = compute_features_with_flags(full + arrivals, SMALL)
    assert late[-2:].tolist() == [True, False]
    np.testing.assert_allclose(offline, np.stack([r.values for r in results]), rtol=1e-12, atol=0)


def test_events_older_than_the_largest_window_are_trimmed() -> None:
    store = fake_store()
    store.update([make_event(0, T0), make_event(1, T0 + 250), make_event(2, T0 + 500)])
    assert stored_ids(store, "alice") == ["e1", "e2"]  # e0 is older than 500 - 300


def test_too_late_event_gets_features_but_is_not_stored() -> None:
    store = fake_store()
    store.update([make_event(0, T0 + 1000, amount=5.0), make_event(1, T0 + 1001, amount=7.0)])
    before = snapshot(store.client)
    late = store.update([make_event(2, T0 + 1000 - 241 - 1, amount=100.0)])[0]  # tolerance 240 s
    assert late.late and not late.duplicate
    assert snapshot(store.client) == before
    values = late.as_dict()
    assert values["count_5m"] == 0  # what is stored at its time, without itself
    assert values["amount"] == 100.0
    within = store.update([make_event(3, T0 + 1000 - 200, amount=1.0)])[0]
    assert not within.late and within.as_dict()["count_5m"] == 1


def test_read_without_update_matches_and_writes_nothing() -> None:
    store = fake_store()
    events = [make_event(k, T0 + 15.0 * k, amount=float(k), device_id=f"d{k % 3}") for k in range(6)]
    store.update(events)
    before = snapshot(store.client)
    brute = BruteForce(SMALL)
    for event in events:
        brute.update(event)
    for at in (T0 + 75.0, T0 + 80.0, T0 + 5000.0):
        assert_close(store.read("alice", at).as_dict(), brute.features("alice", at, None), at)
    assert snapshot(store.client) == before
    empty = store.read("nobody", T0 + 6 * 3600).as_dict()
    assert empty["count_5m"] == 0 and empty["mean_5m"] == 0 and empty["seconds_since_last"] == 300
    assert empty["hour_sin"] == pytest.approx(1.0) and empty["hour_cos"] == pytest.approx(0.0, abs=1e-12)


def test_missing_amount_counts_the_event_as_zero_and_values_compare_by_type() -> None:
    store = fake_store()
    results = store.update(
        [
            make_event(0, T0, amount=None, device_id="7"),
            make_event(1, T0 + 1, amount=4.0, device_id=7),
            make_event(2, T0 + 2, amount=None),
        ]
    )
    values = results[-1].as_dict()
    assert (values["count_10s"], values["sum_10s"], values["mean_10s"], values["max_10s"]) == (3, 4, 4 / 3, 4)
    assert values["distinct_device_id_1m"] == 2  # "7" and 7; the event without a device adds none
    assert values["amount"] == 0 and values["seconds_since_last"] == 1


def test_attribute_windows_leave_out_missing_text_and_oversized_values_and_keep_negative_maxima() -> None:
    store = fake_store(DERIVED)
    scores: list[object] = [-3.5, "high", None, 1e200, True, -0.25]
    events = [
        make_event(k, T0 + k, **({} if score is None else {"score": score})) for k, score in enumerate(scores)
    ]
    values = store.update(events)[-1].as_dict()
    present = [-3.5, 1.0, -0.25]
    assert values["count_score_10s"] == 3 and values["count_10s"] == 6
    assert values["sum_score_10s"] == pytest.approx(-2.75)
    assert values["mean_score_10s"] == pytest.approx(-2.75 / 3)
    assert values["max_score_10s"] == 1.0
    assert values["std_score_10s"] == pytest.approx(statistics.pstdev(present), rel=1e-12)
    later = [make_event(9, T0 + 100, score=-7.5), make_event(10, T0 + 101, score=-2)]
    only_negative = store.update(later)[-1]
    assert only_negative.as_dict()["max_score_10s"] == -2.0  # not 0: a max over the values present
    assert only_negative.as_dict()["std_score_10s"] == pytest.approx(2.75)
    empty = store.read("alice", T0 + 200).as_dict()
    assert [empty[f"{agg}_score_10s"] for agg in ("count", "sum", "mean", "max", "std")] == [0, 0, 0, 0, 0]
    np.testing.assert_array_equal(compute_features([*events, *later], DERIVED)[-1], only_negative.values)


def test_features_saturate_at_the_float32_limit_online_and_offline() -> None:
    """An attribute of 1e300 (an event field) or sums of attributes of 1e100 (a window) would be infinite
    in the models' float32, and training failed on them ("Input contains NaN"): features stop at the
    float32 limit."""
    events = [make_event(k, T0 + k, items=1e300, score=-1e100) for k in range(3)]
    online = fake_store(DERIVED).update(events)[-1].as_dict()
    assert online["attr_items"] == FEATURE_LIMIT and online["sum_score_10s"] == -FEATURE_LIMIT
    offline = compute_features(events, DERIVED, np.float32)
    assert np.isfinite(offline).all()
    np.testing.assert_array_equal(offline[-1], np.float32(list(online.values())))


def test_std_has_no_cancellation_when_values_share_a_large_offset() -> None:
    """sumsq/n - mean^2 would lose every digit here (squares near 1e18, ulp ~128); Welford keeps them."""
    spec = FeatureSpec.model_validate(
        {
            "windows": {"1m": 60},
            "aggregations": ["std"],
            "distinct": [],
            "attribute_windows": [{"attribute": "balance", "aggregations": ["std"], "windows": ["1m"]}],
        }
    )
    offsets = [0.1, 0.2, 0.3, 0.4, 0.35]
    events = [make_event(k, T0 + k, amount=1e9 + x, balance=-1e9 - x) for k, x in enumerate(offsets)]
    last = fake_store(spec).update(events)[-1].as_dict()
    exact = statistics.pstdev([1e9 + x for x in offsets])
    assert last["std_1m"] == pytest.approx(exact, rel=1e-6)
    assert last["std_balance_1m"] == pytest.approx(exact, rel=1e-6)
    same = fake_store(spec).update([make_event(k, T0 + k, amount=250.0, balance=0.1) for k in range(4)])
    assert (same[-1].as_dict()["std_1m"], same[-1].as_dict()["std_balance_1m"]) == (0.0, 0.0)  # exactly


def test_events_stored_before_attribute_windows_were_configured_contribute_no_values() -> None:
    """After adding attribute windows to a live spec, the entity's older members have no value fields: the
    script must not fail (every decision would fall back until the keys expire); they count as missing."""
    server = fakeredis.FakeServer()
    before = FeatureSpec.model_validate({"distinct": []})
    after = FeatureSpec.model_validate(
        {
            "distinct": [],
            "attribute_windows": [{"attribute": "x", "aggregations": ["count", "sum"], "windows": ["1h"]}],
        }
    )
    RedisFeatureStore(fakeredis.FakeRedis(server=server), before).update([make_event(0, T0, x=5)])
    result = RedisFeatureStore(fakeredis.FakeRedis(server=server), after).update([make_event(1, T0 + 1, x=7)])
    values = result[0].as_dict()
    assert (values["count_1h"], values["count_x_1h"], values["sum_x_1h"]) == (2, 1, 7)


def test_seconds_since_last_ignores_the_event_itself_even_when_redelivered() -> None:
    store = fake_store()
    first = store.update([make_event(0, T0)])[0]
    assert first.as_dict()["seconds_since_last"] == 300  # none: the largest window
    store.update([make_event(1, T0 + 42.5)])
    again = store.update([make_event(1, T0 + 42.5)])[0]
    assert again.duplicate and again.as_dict()["seconds_since_last"] == 42.5
    assert again.as_dict()["count_1m"] == 2


def test_feature_values_survive_float_round_trips_exactly() -> None:
    store = fake_store()
    amounts = [0.1, 0.2, 1e-7, 123456789.123456789]
    events = [make_event(k, T0 + 0.1 * k, amount=a) for k, a in enumerate(amounts)]
    last = store.update(events)[-1].as_dict()
    assert last["sum_10s"] == ((((0.0 + amounts[3]) + amounts[2]) + amounts[1]) + amounts[0])
    assert last["max_10s"] == amounts[3]
    assert last["seconds_since_last"] == events[3].timestamp - events[2].timestamp


def test_lost_script_cache_is_reloaded_transparently() -> None:
    store = fake_store()
    store.update([make_event(0, T0)])
    store.client.script_flush()  # as after a Redis restart or failover
    assert store.update([make_event(1, T0 + 1)])[0].as_dict()["count_10s"] == 2  # a single call
    store.client.script_flush()
    batch = store.update([make_event(2, T0 + 2), make_event(3, T0 + 3)])  # a pipeline
    assert [r.as_dict()["count_10s"] for r in batch] == [3, 4]


def test_memory_url_shares_one_store_per_process() -> None:
    a = open_feature_store("memory://shared-test", SMALL, 0.05, key_prefix="t:")
    b = open_feature_store("memory://shared-test", SMALL, 0.05, key_prefix="t:")
    a.update([make_event(0, T0)])
    assert b.read("alice", T0).as_dict()["count_10s"] == 1
    assert a.ping()
    isolated = open_feature_store("memory://other-test", SMALL, 0.05, key_prefix="t:")
    assert isolated.read("alice", T0).as_dict()["count_10s"] == 0


def test_unknown_url_is_rejected_without_leaking_the_password() -> None:
    with pytest.raises(ValueError, match="memory://") as info:
        open_feature_store("mongodb://user:secret@host/db", SMALL, 0.05)
    assert "secret" not in str(info.value)


def test_cluster_url_names_its_startup_nodes_and_credentials() -> None:
    address = parse_cluster_url("redis+cluster://ops:s3cret@10.0.0.1:7000,10.0.0.2:7001")
    assert [(n.host, n.port) for n in address.nodes] == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert (address.username, address.password) == ("ops", "s3cret")
    assert parse_cluster_url("redis+cluster://:pw@h:1").password == "pw"
    store = open_feature_store("redis+cluster://h:1", SMALL, 0.05)  # connects on first use only
    assert isinstance(store, RedisClusterFeatureStore)


@pytest.mark.parametrize(
    "url", ["redis+cluster://", "redis+cluster://host", "redis+cluster://h:1/3", "redis+cluster://:pw@h:x"]
)
def test_bad_cluster_urls_are_rejected_without_leaking_the_password(url: str) -> None:
    with pytest.raises(ValueError, match=r"redis\+cluster|host:port|database 0") as info:
        open_feature_store(url, SMALL, 0.05)
    assert "pw" not in str(info.value)


def test_a_key_prefix_with_braces_is_refused() -> None:
    """The first {...} of a key is its cluster slot tag: a prefix holding one would put every entity of
    a cluster in one slot (or split an entity's keys across slots)."""
    with pytest.raises(ValueError, match="braces"):
        RedisFeatureStore(fakeredis.FakeRedis(), SMALL, key_prefix="dp:{f}:")


def test_unreachable_cluster_fails_fast_with_a_clear_error() -> None:
    store = open_feature_store("redis+cluster://:hunter2@127.0.0.1:1,127.0.0.1:2", SMALL, timeout_s=0.2)
    start = time.monotonic()
    with pytest.raises(FeatureStoreError, match=r"127\.0\.0\.1:1") as info:
        store.update([make_event(0, T0)])
    assert "hunter2" not in str(info.value)
    with pytest.raises(FeatureStoreError):
        store.read("alice", T0)
    assert time.monotonic() - start < 2.0
    assert store.ping() is False
    store.close()


# --- failures: clear, fast, catchable


def test_unreachable_redis_fails_fast_with_a_clear_error() -> None:
    store = open_feature_store("redis://127.0.0.1:1/0", SMALL, timeout_s=0.2)
    start = time.monotonic()
    with pytest.raises(FeatureStoreError, match=r"127\.0\.0\.1:1"):
        store.update([make_event(0, T0)])
    with pytest.raises(FeatureStoreError):
        store.read("alice", T0)
    assert time.monotonic() - start < 1.0
    assert store.ping() is False


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers: a hung Redis."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def test_hung_redis_times_out_within_the_configured_timeout(silent_server: int) -> None:
    store = open_feature_store(f"redis://127.0.0.1:{silent_server}/0", SMALL, timeout_s=0.2)
    start = time.monotonic()
    with pytest.raises(FeatureStoreError, match="failed"):
        store.read("alice", T0)
    assert 0.15 < time.monotonic() - start < 0.6
    store.close()


def test_password_is_not_in_the_error_message() -> None:
    store = open_feature_store("redis://:hunter2@127.0.0.1:1/0", SMALL, timeout_s=0.2)
    with pytest.raises(FeatureStoreError) as info:
        store.read("alice", T0)
    assert "hunter2" not in str(info.value)
