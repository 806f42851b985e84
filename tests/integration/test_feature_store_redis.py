"""The feature store on a real Redis (TEST_REDIS_URL, else 127.0.0.1:6379 db 13): the production Lua on the
production server.

Keys live under a prefix unique to this run and are deleted at the end; nothing else in the db is touched.
The brute force and event streams are the unit tests'.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings

from decision_platform.core.events import Event
from decision_platform.features import (
    FeatureSpec,
    OfflineWindows,
    RedisFeatureStore,
    compute_features,
    compute_features_with_flags,
    open_feature_store,
)
from tests.unit import test_features as helpers  # one oracle (brute force, streams) for both backends

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
RUN_PREFIX = f"dp:test:features:{uuid.uuid4().hex[:12]}:"
T0 = 1_767_571_200.0


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=2)
    try:
        conn.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_URL} is required in CI: {exc}")
        pytest.skip(f"Redis at {REDIS_URL} is unreachable: {exc}")
    yield conn
    # Only this run's keys.
    keys = list(conn.scan_iter(match=f"{RUN_PREFIX}*", count=1000))
    for start in range(0, len(keys), 500):
        conn.delete(*keys[start : start + 500])
    conn.close()


def new_store(client: redis.Redis, spec: FeatureSpec = helpers.SMALL) -> RedisFeatureStore:
    """A store with its own key space (so examples do not see each other) on the shared connection."""
    return RedisFeatureStore(client, spec, key_prefix=f"{RUN_PREFIX}{uuid.uuid4().hex[:8]}:")


def snapshot(store: RedisFeatureStore) -> dict[bytes, object]:
    state: dict[bytes, object] = {}
    for key in sorted(store.client.scan_iter(match=f"{store.key_prefix}*", count=1000)):
        if store.client.type(key) == b"zset":
            state[key] = store.client.zrange(key, 0, -1, withscores=True)
        else:
            state[key] = store.client.hgetall(key)
    return state


@pytest.mark.parametrize(
    "spec", [helpers.SMALL, helpers.UNORDERED, helpers.DERIVED], ids=["small", "unordered", "derived"]
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=helpers.event_streams())
def test_redis_matches_brute_force_and_offline(
    client: redis.Redis, spec: FeatureSpec, events: list[Event]
) -> None:
    helpers.check_against_brute_force(new_store(client, spec), events)


def test_open_feature_store_by_url_round_trips() -> None:
    prefix = f"{RUN_PREFIX}url:"
    store = open_feature_store(REDIS_URL, helpers.SMALL, timeout_s=2.0, key_prefix=prefix)
    if not store.ping():
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_URL} is required in CI")
        pytest.skip(f"Redis at {REDIS_URL} is unreachable")
    try:
        store.update([helpers.make_event(0, T0, amount=3.5)])
        assert store.read("alice", T0 + 1).as_dict()["sum_10s"] == 3.5
    finally:
        store.client.delete(*store.keys("alice"))
        store.close()


def test_an_entity_keeps_at_most_the_cap_with_ttl_and_matches_offline(client: redis.Redis) -> None:
    spec = FeatureSpec()  # the shipped defaults: 1000 events, 90000 s TTL
    store = new_store(client, spec)
    events = [
        Event(event_id=f"p{k:05d}", entity_id="heavy", timestamp=T0 + 10.0 * k, amount=float(k % 97))
        for k in range(1200)
    ]
    results = []
    for start in range(0, len(events), 1000):
        results += store.update(events[start : start + 1000])
    assert helpers.stored_ids(store, "heavy") == [e.event_id for e in events[200:]]  # the latest 1000
    for key in store.keys("heavy"):
        assert 0 < client.pttl(key) <= 90_000_000
    assert results[-1].as_dict()["count_24h"] == 1000
    np.testing.assert_allclose(
        compute_features(events, spec), np.stack([r.values for r in results]), rtol=1e-12, atol=0
    )


def test_full_entity_with_attribute_windows_and_std_matches_offline_bit_for_bit(client: redis.Redis) -> None:
    """A full entity (1000 events in the largest window) exercises Welford over long windows in Redis' Lua."""
    spec = FeatureSpec.model_validate(
        {
            "aggregations": ["count", "sum", "mean", "max", "std"],
            "attribute_windows": [
                {
                    "attribute": "balance",
                    "aggregations": ["count", "sum", "mean", "max", "std"],
                    "windows": ["1h", "24h"],
                },
                {"attribute": "C1", "aggregations": ["std"], "windows": ["5m"]},
            ],
        }
    )
    store = new_store(client, spec)
    rng = np.random.default_rng(5)
    balances = 1e6 + rng.normal(0, 50, 1200)
    events = [
        Event(
            event_id=f"w{k:05d}",
            entity_id="heavy",
            timestamp=T0 + 30.0 * k,
            amount=float(rng.gamma(2, 30)),
            attributes={"balance": float(balances[k])} | ({"C1": int(k % 11) - 5} if k % 4 else {}),
        )
        for k in range(1200)
    ]
    results = store.update(events)
    online = np.stack([r.values for r in results])
    assert np.array_equal(compute_features(events, spec), online)
    last = results[-1].as_dict()
    assert last["std_balance_24h"] == pytest.approx(float(np.std(balances[200:])), rel=1e-9)
    assert last["count_balance_24h"] == 1000


def test_replay_changes_nothing_and_reports_duplicates(client: redis.Redis) -> None:
    store = new_store(client)
    events = [
        helpers.make_event(k, T0 + 5.0 * k, entity=("alice", "bob")[k % 2], device_id=f"d{k % 3}")
        for k in range(12)
    ]
    first = store.update(events)
    before = snapshot(store)
    again = store.update(events)
    assert all(r.duplicate and not r.late for r in again)
    assert snapshot(store) == before
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.values, b.values)


def test_concurrent_redelivery_counts_each_event_once(client: redis.Redis) -> None:
    """Two workers given the same events at once (at-least-once delivery): every event stored once."""
    spec = FeatureSpec()
    prefix = f"{RUN_PREFIX}{uuid.uuid4().hex[:8]}:"
    events = [
        Event(event_id=f"c{k:04d}", entity_id=f"u{k % 3}", timestamp=T0 + float(k), amount=1.0)
        for k in range(600)
    ]
    outcomes: list[list[bool]] = [[], []]

    def worker(slot: int) -> None:
        conn = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        store = RedisFeatureStore(conn, spec, key_prefix=prefix)
        for start in range(0, len(events), 50):
            outcomes[slot] += [not r.duplicate for r in store.update(events[start : start + 50])]
        conn.close()

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored_by = np.array(outcomes[0], dtype=int) + np.array(outcomes[1], dtype=int)
    assert stored_by.tolist() == [1] * len(events)
    check = RedisFeatureStore(client, spec, key_prefix=prefix)
    for entity in ("u0", "u1", "u2"):
        assert check.read(entity, T0 + 600).as_dict()["count_1h"] == 200


def test_read_matches_offline_and_writes_nothing(client: redis.Redis) -> None:
    spec = FeatureSpec()
    store = new_store(client, spec)
    rng = np.random.default_rng(11)
    times = np.sort(rng.uniform(0, 86400, 200))
    amounts = rng.gamma(2, 30, len(times))
    events = [
        helpers.make_event(k, T0 + float(t), entity=f"u{k % 4}", amount=float(amounts[k]), device_id=k % 5)
        for k, t in enumerate(times)
    ]
    store.update(events)
    before = snapshot(store)
    windows = OfflineWindows(spec)
    for event in events:
        windows.update(event)
    for entity in ("u0", "u3", "unknown"):
        for at in (T0 + 3600.0, T0 + 86400.0, T0 + 2 * 86400.0):
            got = store.read(entity, at).values
            want = spec.assemble(np.asarray([windows.read(entity, at)]), spec.event_values([at], None))[0]
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert snapshot(store) == before
    _, duplicate, late = compute_features_with_flags(events, spec)
    assert not duplicate.any() and not late.any()


def test_a_withdrawn_event_leaves_the_windows_as_if_it_never_came(client: redis.Redis) -> None:
    """An event refused after its windows took it (its id is another entity's event's) is withdrawn: the
    entity's state is the one the other events alone give, the late horizon included (it was the newest)."""
    store, alone = new_store(client), new_store(client)
    events = [helpers.make_event(k, T0 + 5.0 * k, entity="carol", device_id=f"d{k}") for k in range(4)]
    bogus = helpers.make_event(9, T0 + 290.0, entity="carol", device_id="d9")  # newest; trims nothing
    store.update([*events, bogus])
    assert store.withdraw(bogus) and not store.withdraw(bogus)
    alone.update(events)
    late = helpers.make_event(5, T0 + 40.0, entity="carol")  # too late behind the bogus time, not now
    got, want = store.update([late])[0], alone.update([late])[0]
    assert not got.late
    np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(store.read("carol", T0 + 50).values, alone.read("carol", T0 + 50).values)
