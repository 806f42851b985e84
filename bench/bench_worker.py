"""End-to-end throughput of one stream-worker process: consume -> features -> decide -> store -> publish.

Starts its own tansu broker (or uses --bootstrap), trains tiny models into a temporary registry, produces
N synthetic events, then runs one StreamWorker (one process, one thread) until every event is decided,
and prints events/s with the split of the time per stage. Backends: the machine's PostgreSQL (own schema,
dropped at the end) and Redis (db 12, flushed at the end), or the embedded ones with --embedded.

    .venv/bin/python bench/bench_worker.py --events 20000 --batch 500
    .venv/bin/python bench/bench_worker.py --events 20000 --batch 500 --processes 1,2 [--redis-cluster]

``--processes``: N separate worker processes in one consumer group instead (bench/worker_scale.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
import redis
from confluent_kafka import Producer
from rich.console import Console
from rich.table import Table

from decision_platform.config import PROJECT_ROOT, Settings
from decision_platform.core.rewards import RewardTable
from decision_platform.data import generate
from decision_platform.devtools.redis_cluster import start_cluster
from decision_platform.devtools.tansu import start_broker
from decision_platform.events.kafka import KafkaSink, KafkaSource, ensure_topics
from decision_platform.learning.replay import shift_to_now
from decision_platform.models.registry import ModelRegistry
from decision_platform.models.risk import RiskConfig
from decision_platform.serving.platform import WORKER_GC_THRESHOLD, Platform, settle_heap
from decision_platform.serving.worker import StreamWorker
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.training.train import TrainConfig, train_all

PG = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/12"
console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument(
        "--embedded", action="store_true", help="SQLite + fakeredis instead of PostgreSQL + Redis"
    )
    parser.add_argument("--no-decide", action="store_true", help="windows only (worker_decide=False)")
    parser.add_argument("--bootstrap", help="an existing broker instead of a fresh tansu")
    parser.add_argument(
        "--processes", help="e.g. 1,2: worker processes in one group, one run each (worker_scale.py)"
    )
    parser.add_argument(
        "--redis-cluster", action="store_true", help="windows on a local 3-master Redis Cluster"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dp-bench-worker-"))
    schema = f"bench_worker_{uuid.uuid4().hex[:8]}"
    broker = None
    if args.bootstrap:
        bootstrap = args.bootstrap
    else:
        broker, bootstrap = start_broker(log_path=work / "tansu.log")
    suffix = uuid.uuid4().hex[:6]
    settings = Settings(
        database_url=f"sqlite:///{work / 'bench.db'}" if args.embedded else PG,
        database_schema=None if args.embedded else schema,
        feature_store_url=f"memory://{suffix}" if args.embedded else REDIS,
        feature_store_timeout_s=10.0,
        model_dir=work / "models",
        spool_dir=work / "spool",
        kafka_bootstrap_servers=bootstrap,
        kafka_events_topic=f"bench-events-{suffix}",
        kafka_decisions_topic=f"bench-decisions-{suffix}",
        kafka_dlq_topic=f"bench-dlq-{suffix}",
        kafka_group_id=f"bench-{suffix}",
        kafka_session_timeout_ms=3000,
        kafka_heartbeat_interval_ms=300,
        worker_batch_size=args.batch,
        db_batch_size=args.batch,
        worker_decide=not args.no_decide,
    )
    cluster = None
    if args.redis_cluster:
        cluster = start_cluster(masters=3)
        settings = settings.model_copy(update={"feature_store_url": cluster.url})
    try:
        engine = make_engine(settings.database_url, settings.database_schema)
        migrate(engine, settings.database_schema)
        with console.status("training tiny models for the bench"):
            train_all(
                generate(n_entities=400, days=3, seed=3),
                PROJECT_ROOT / "config" / "features.yaml",
                RewardTable.load(PROJECT_ROOT / "config" / "rewards.yaml"),
                ModelRegistry(Repository(engine), settings.model_dir),
                TrainConfig(anomaly_trees=100, risk=RiskConfig(epochs=3), ppo_timesteps=2048),
            )
        events = shift_to_now(generate(n_entities=max(200, args.events // 4), days=3, seed=11).events)
        events = events[: args.events]
        if args.processes:
            scale_out(settings, events, [int(n) for n in args.processes.split(",")], args, work)
            return
        ensure_topics(settings)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        for event in events:
            producer.produce(
                settings.kafka_events_topic,
                key=event.entity_id.encode(),
                value=event.model_dump_json().encode(),
            )
            producer.poll(0)
        producer.flush(30)

        platform = Platform.start(settings)
        settle_heap(WORKER_GC_THRESHOLD)  # as `decision-platform worker` does once started
        worker = StreamWorker(settings, platform.engine, platform.store, KafkaSink(settings))
        source = KafkaSource(settings)
        stop = threading.Event()
        done = {"n": 0, "first": None, "cpu": 0.0}
        original_poll, original_commit = source.poll, source.commit

        def polling(max_messages, timeout_s):  # type: ignore[no-untyped-def]
            messages = original_poll(max_messages, timeout_s)
            if messages and done["first"] is None:
                done["first"] = time.perf_counter()  # start the clock at the first batch (after group join)
                done["cpu"] = time.process_time()
            return messages

        def committing(messages):  # type: ignore[no-untyped-def]
            original_commit(messages)  # counted once committed: durable, published, acknowledged
            done["n"] += len(messages)
            if done["n"] >= len(events):
                stop.set()

        source.poll = polling  # type: ignore[method-assign]
        source.commit = committing  # type: ignore[method-assign]
        thread = threading.Thread(target=worker.run, args=(source, stop), daemon=True)
        thread.start()
        thread.join(600)
        elapsed = time.perf_counter() - (done["first"] or time.perf_counter())
        # This process's CPU (every thread: worker, writer, librdkafka) over the same window: on a machine
        # shared with other work, wall time stretches with the neighbours' load, CPU time much less.
        cpu = time.process_time() - done["cpu"]
        platform.close()

        rate = done["n"] / elapsed if elapsed else 0.0
        stages = worker.stage_seconds
        accounted = sum(stages.values())
        table = Table(
            title=f"stream worker, one process: {done['n']} events, batch {args.batch}, "
            f"{'embedded' if args.embedded else 'PostgreSQL + Redis'}, tansu"
        )
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        table.add_column("share", justify="right")
        table.add_column("µs / event", justify="right")
        for stage, seconds in {**stages, "poll + commit + other": max(elapsed - accounted, 0.0)}.items():
            table.add_row(
                stage,
                f"{seconds:.2f}",
                f"{seconds / elapsed:.0%}",
                f"{seconds / max(done['n'], 1) * 1e6:.0f}",
            )
        console.print(table)
        console.print(
            "features: the wait for the batch's windows, updated in the background while the batch before "
            "is decided (StreamWorker.run); Redis' own time overlaps the other stages"
        )
        console.print(f"[bold]{rate:,.0f} events/s end to end[/bold] (goal: 20,000); {elapsed:.1f} s")
        console.print(
            f"worker process CPU {cpu / max(done['n'], 1) * 1e6:.0f} µs/event (all its threads; "
            "PostgreSQL, Redis and the broker are other processes)"
        )
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        record = {
            "bench": "worker",
            "commit": git,
            "events": done["n"],
            "batch": args.batch,
            "embedded": args.embedded,
            "decide": not args.no_decide,
            "events_per_s": rate,
            "stages_s": stages,
            "elapsed_s": elapsed,
            "cpu_s": cpu,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with open(Path(__file__).parent / "results.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    finally:
        if cluster is not None:
            cluster.stop()
        if broker is not None:
            broker.kill()
        if not args.embedded:
            with psycopg.connect(PG, autocommit=True) as connection:
                connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            redis.Redis.from_url(REDIS).flushdb()
        shutil.rmtree(work, ignore_errors=True)


def scale_out(
    settings: Settings, events: list, counts: list[int], args: argparse.Namespace, work: Path
) -> None:
    """events/s of 1, 2, ... worker processes on the same events, and the ratio to the first count."""
    from worker_scale import run_processes

    if settings.database_schema is None:
        raise SystemExit("--processes needs PostgreSQL (not --embedded): the processes share the log")
    results = [run_processes(settings, events, n, PG, work) for n in counts]
    store = "Redis Cluster (3 masters)" if args.redis_cluster else "Redis"
    table = Table(
        title=f"stream worker processes, one group, 4 partitions: {len(events)} events, batch "
        f"{args.batch}, PostgreSQL + {store}, tansu"
    )
    for column in ("processes", "events/s", "ratio", "seconds", "events per process"):
        table.add_column(column, justify="right")
    for result in results:
        table.add_row(
            str(result.processes),
            f"{result.events_per_s:,.0f}",
            f"{result.events_per_s / results[0].events_per_s:.2f}",
            f"{result.seconds:.1f}",
            " / ".join(f"{n:,}" for n in result.per_process),
        )
    console.print(table)
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    with open(Path(__file__).parent / "results.jsonl", "a") as handle:
        for result in results:
            record = {
                "bench": "worker_processes",
                "commit": git,
                "processes": result.processes,
                "events": result.events,
                "batch": args.batch,
                "feature_store": "redis-cluster" if args.redis_cluster else "redis",
                "events_per_s": result.events_per_s,
                "elapsed_s": result.seconds,
                "per_process": result.per_process,
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
