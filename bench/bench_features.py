"""Feature store throughput: pipelined update batches of 1000 events, single reads, and offline.py.

    .venv/bin/python bench/bench_features.py [--events 20000] [--entities 2000] [--spec default,windowed]

``default`` is config/features.yaml's spec; ``windowed`` adds the amount's std and two numeric attributes
aggregated over the windows (every aggregation, std included), the cost of the attribute windows.

Runs on fakeredis (memory://) and on redis://127.0.0.1:6379/13 when reachable, and with ``--redis-cluster``
on a local 3-master Redis Cluster started for the run (redis+cluster://). Uses its own key prefix and
deletes its keys afterwards. Compare numbers from one run: the machine is shared.
"""

from __future__ import annotations

import argparse
import time
import uuid

import numpy as np

from decision_platform.core.events import Event
from decision_platform.features import (
    FeatureSpec,
    RedisClusterFeatureStore,
    RedisFeatureStore,
    compute_features,
    open_feature_store,
)

REDIS_URL = "redis://127.0.0.1:6379/13"
BATCH = 1000
T0 = 1_767_571_200.0


def make_events(n: int, entities: int, seed: int = 0) -> list[Event]:
    """A day of traffic: Poisson-ish arrivals, some out of order, a few devices per entity."""
    rng = np.random.default_rng(seed)
    times = T0 + np.sort(rng.uniform(0, 86400, n)) - rng.choice([0.0, 0.0, 0.0, 30.0], n)
    owners = rng.integers(0, entities, n)
    amounts = rng.lognormal(3, 1, n)
    devices = rng.integers(0, 3, n)
    balances = rng.normal(1000, 200, n)
    counters = rng.integers(0, 30, n)
    return [
        Event.model_construct(
            event_id=f"b{k}",
            entity_id=f"u{owners[k]}",
            timestamp=float(times[k]),
            event_type="payment",
            amount=float(amounts[k]),
            attributes={
                "device_id": f"d{owners[k]}-{devices[k]}",
                "balance": float(balances[k]),
                **({"C1": int(counters[k])} if k % 3 else {}),  # sometimes missing
            },
        )
        for k in range(n)
    ]


#: The default spec plus what attribute windows cost: the amount's std and two attributes over all windows.
WINDOWED = FeatureSpec.model_validate(
    {
        "aggregations": ["count", "sum", "mean", "max", "std"],
        "attribute_windows": [
            {
                "attribute": a,
                "aggregations": ["count", "sum", "mean", "max", "std"],
                "windows": ["1m", "5m", "1h", "24h"],
            }
            for a in ("balance", "C1")
        ],
    }
)
SPECS = {"default": FeatureSpec(), "windowed": WINDOWED}


def bench_store(store: RedisFeatureStore, events: list[Event], label: str) -> None:
    # Same-run reference (the machine is shared): pipelined PINGs, the floor of any pipelined command. A
    # cluster pipeline routes by key (no PING): an EXISTS of each event's entity key, split per node alike.
    keyed = isinstance(store, RedisClusterFeatureStore)
    floor = "EXISTS" if keyed else "PING"
    start = time.perf_counter()
    for i in range(0, len(events), BATCH):
        pipe = store.client.pipeline(transaction=False)
        for event in events[i : i + BATCH]:
            if keyed:
                pipe.exists(store.keys(event.entity_id)[0])
            else:
                pipe.ping()
        pipe.execute()
    ping_rate = len(events) / (time.perf_counter() - start)

    start = time.perf_counter()
    for i in range(0, len(events), BATCH):
        store.update(events[i : i + BATCH])
    rate = len(events) / (time.perf_counter() - start)
    print(
        f"{label:10s} update  {rate:10,.0f} events/s  (batches of {BATCH}; "
        f"pipelined {floor} {ping_rate:,.0f}/s, ratio {rate / ping_rate:.2f})"
    )

    lat = []
    for k in range(min(2000, len(events))):
        t = time.perf_counter()
        store.read(events[k].entity_id, events[-1].timestamp)
        lat.append(time.perf_counter() - t)
    p50, p99 = np.percentile(np.array(lat) * 1e6, [50, 99])
    print(f"{label:10s} read    p50 {p50:7.0f} us   p99 {p99:7.0f} us")


def cleanup(store: RedisFeatureStore) -> None:
    keys = list(store.client.scan_iter(match=f"{store.key_prefix}*", count=1000))
    for i in range(0, len(keys), 500):
        store.client.delete(*keys[i : i + 500])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--entities", type=int, default=2_000)
    parser.add_argument("--spec", default="default,windowed", help="comma-separated: default, windowed")
    parser.add_argument("--redis-cluster", action="store_true", help="also a local 3-master Redis Cluster")
    args = parser.parse_args()
    events = make_events(args.events, args.entities)
    backends = [("memory://bench", "fakeredis"), (REDIS_URL, "redis")]
    cluster = None
    if args.redis_cluster:
        from decision_platform.devtools.redis_cluster import start_cluster

        cluster = start_cluster(masters=3)
        backends.append((cluster.url, "cluster"))
    try:
        run(args, events, backends)
    finally:
        if cluster is not None:
            cluster.stop()


def run(args: argparse.Namespace, events: list[Event], backends: list[tuple[str, str]]) -> None:
    for spec_name in args.spec.split(","):
        spec = SPECS[spec_name]
        print(f"spec {spec_name}: {spec.dim} features")
        prefix = f"dp:bench:{uuid.uuid4().hex[:8]}:"
        for url, label in backends:
            store = open_feature_store(url, spec, timeout_s=5.0, key_prefix=prefix)
            assert isinstance(store, RedisFeatureStore)
            if not store.ping():
                print(f"{label:10s} skipped: {url} unreachable")
                continue
            try:
                # fakeredis is ~10x slower: a slice keeps the run short.
                sample = events if label != "fakeredis" else events[: max(BATCH, len(events) // 4)]
                bench_store(store, sample, label)
            finally:
                cleanup(store)
                store.close()

        start = time.perf_counter()
        compute_features(events, spec)
        elapsed = time.perf_counter() - start
        print(f"{'offline':10s} compute {len(events) / elapsed:10,.0f} events/s")


if __name__ == "__main__":
    main()
