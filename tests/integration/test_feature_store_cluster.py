"""The feature store on a real 3-master Redis Cluster (``redis+cluster://``): the production Lua, routed per
slot by redis-py's cluster client.

A Redis Cluster refuses a script that touches a key of another slot, and answers MOVED for a key another
node owns, so every passing update here is also a check that an entity's keys share one slot. The oracle
(brute force, offline windows, event streams) is the one the single-Redis and unit tests use.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from decision_platform.api.app import create_app
from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.devtools.redis_cluster import LocalRedisCluster, start_cluster
from decision_platform.features import (
    FeatureSpec,
    FeatureStoreError,
    RedisClusterFeatureStore,
    open_feature_store,
)
from decision_platform.serving.platform import Platform
from tests.unit import test_features as helpers

pytestmark = pytest.mark.integration

RUN_PREFIX = f"dp:test:cluster:{uuid.uuid4().hex[:12]}:"
T0 = 1_767_571_200.0
#: The entities of helpers.event_streams and the reads of check_against_brute_force.
STREAM_ENTITIES = ("alice", "bob", "carol", "nobody")


def new_store(cluster: LocalRedisCluster, spec: FeatureSpec = helpers.SMALL) -> RedisClusterFeatureStore:
    prefix = f"{RUN_PREFIX}{uuid.uuid4().hex[:8]}:"
    store = open_feature_store(cluster.url, spec, timeout_s=5.0, key_prefix=prefix)
    assert isinstance(store, RedisClusterFeatureStore)
    return store


@pytest.fixture(scope="module")
def store(redis_cluster: LocalRedisCluster) -> Iterator[RedisClusterFeatureStore]:
    """One cluster client for the module; each test takes its own key prefix through ``scoped``."""
    shared = new_store(redis_cluster)
    yield shared
    for key in list(shared.client.scan_iter(match=f"{RUN_PREFIX}*", count=1000)):
        shared.client.delete(key)  # one key a call: keys of different slots cannot go in one DEL
    shared.close()


def scoped(store: RedisClusterFeatureStore, spec: FeatureSpec) -> RedisClusterFeatureStore:
    """A store on the shared cluster client with a key space of its own (examples must not see each other)."""
    other = RedisClusterFeatureStore(
        store.address, spec, 5.0, key_prefix=f"{RUN_PREFIX}{uuid.uuid4().hex[:8]}:"
    )
    other._client = store.client
    return other


def owner(store: RedisClusterFeatureStore, entity: str) -> tuple[str, int]:
    node = store.client.get_node_from_key(store.keys(entity)[0])
    return node.host, node.port


def fallbacks(client: TestClient) -> float:
    """dp_fallbacks_total for the feature store (process-wide: compare before and after)."""
    prefix = 'dp_fallbacks_total{reason="feature_store_unavailable"}'
    lines = client.get("/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))


def test_an_entitys_keys_share_one_slot_and_the_test_entities_span_the_nodes(
    store: RedisClusterFeatureStore,
) -> None:
    # Entity ids hold no braces (core.events.Identifier), so the tag is always the whole id.
    for entity in (*STREAM_ENTITIES, "u1", "card:4242", "a.b@c-d_e"):
        slots = {store.client.keyslot(key) for key in store.keys(entity)}
        assert len(slots) == 1, entity
    # Otherwise the property test below would run on one node, and prove nothing about the cluster.
    assert len({owner(store, e) for e in STREAM_ENTITIES}) >= 2


@pytest.mark.parametrize("spec", [helpers.SMALL, helpers.DERIVED], ids=["small", "derived"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=helpers.event_streams())
def test_cluster_matches_brute_force_and_offline(
    store: RedisClusterFeatureStore, spec: FeatureSpec, events: list[Event]
) -> None:
    """The single-Redis property, on the cluster: a batch pipeline is split per node, results in order."""
    helpers.check_against_brute_force(scoped(store, spec), events)


def test_concurrent_redelivery_across_clients_counts_each_event_once(
    redis_cluster: LocalRedisCluster,
) -> None:
    """Two workers, each with its own cluster client, given the same events at once."""
    spec = FeatureSpec()
    prefix = f"{RUN_PREFIX}{uuid.uuid4().hex[:8]}:"
    events = [
        Event(event_id=f"c{k:04d}", entity_id=f"u{k % 5}", timestamp=T0 + float(k), amount=1.0)
        for k in range(500)
    ]
    stored: list[list[bool]] = [[], []]

    def worker(slot: int) -> None:
        own = open_feature_store(redis_cluster.url, spec, 5.0, key_prefix=prefix)
        for start in range(0, len(events), 50):
            stored[slot] += [not r.duplicate for r in own.update(events[start : start + 50])]
        own.close()

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert (np.array(stored[0], dtype=int) + np.array(stored[1], dtype=int)).tolist() == [1] * len(events)
    check = open_feature_store(redis_cluster.url, spec, 5.0, key_prefix=prefix)
    try:
        assert len({check.client.get_node_from_key(check.keys(f"u{k}")[0]).port for k in range(5)}) >= 2
        for k in range(5):
            assert check.read(f"u{k}", T0 + 500).as_dict()["count_1h"] == 100
    finally:
        for k in range(5):
            for key in check.keys(f"u{k}"):
                check.client.delete(key)
        check.close()


def test_a_lost_master_fails_fast_and_decisions_fall_back(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> None:
    """A master of a cluster of its own goes away: its entities' calls raise FeatureStoreError (no hang),
    and /decide answers from rules + the safe action, counted like a single Redis outage."""
    cluster = start_cluster(masters=3, timeout_s=30)
    try:
        settings = make_settings(feature_store_url=cluster.url, feature_store_timeout_s=0.2)
        spec = FeatureSpec.load(settings.features_path)
        probe = open_feature_store(cluster.url, spec, 0.2)
        assert isinstance(probe, RedisClusterFeatureStore)
        victim = cluster.ports.index(owner(probe, "victim")[1])
        with TestClient(create_app(settings, start_platform(settings))) as client:
            first = client.post("/decide", json={"entity_id": "victim", "event": {"event_id": "v1"}})
            assert first.json()["fallback"] is None
            before = fallbacks(client)
            cluster.stop_node(victim)
            started = time.monotonic()
            with pytest.raises(FeatureStoreError):
                probe.read("victim", T0)
            assert time.monotonic() - started < 5  # bounded: socket timeouts, one retry, no backoff
            body = client.post(
                "/decide", json={"entity_id": "victim", "event": {"event_id": "v2", "amount": 5}}
            ).json()
            assert body["fallback"] == "feature_store_unavailable"
            assert body["action"] == settings.safe_action
            assert client.get("/ready").json()["checks"]["feature_store"] == "unreachable"
            assert fallbacks(client) == before + 1
        probe.close()
    finally:
        cluster.stop()


def test_a_withdrawn_event_leaves_its_entitys_windows_on_whichever_node_holds_them(
    store: RedisClusterFeatureStore,
) -> None:
    withdrawing, alone = scoped(store, helpers.SMALL), scoped(store, helpers.SMALL)
    for entity in STREAM_ENTITIES:  # entities on at least two nodes (test above)
        events = [helpers.make_event(k, T0 + 5.0 * k, entity=entity) for k in range(3)]
        bogus = Event(event_id=f"x-{entity}", entity_id=entity, timestamp=T0 + 20.0, amount=900.0)
        withdrawing.update([*events, bogus])
        alone.update(events)
        assert withdrawing.withdraw(bogus)
        got, want = withdrawing.read(entity, T0 + 30.0), alone.read(entity, T0 + 30.0)
        np.testing.assert_array_equal(got.values, want.values)
