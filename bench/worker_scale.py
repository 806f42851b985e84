"""Scale-out of the stream worker: N ``decision-platform worker`` processes in one consumer group.

Used by ``bench_worker.py --processes 1,2``. For each N: a fresh topic (4 partitions) and group, an empty
decision log, empty windows; N worker processes are started and the bench waits until their partition
assignments split the topic (the group has settled, so no rebalance falls inside the measurement); then
all events are produced at once and the clock runs from the first produce to the moment the last
decision is stored in PostgreSQL (polled every 20 ms). events/s = events / that time.

Backends: the machine's PostgreSQL (own schema, dropped at the end) and Redis db 12 (flushed), or with
``--redis-cluster`` a local 3-master Redis Cluster started for the run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis
from confluent_kafka import Producer

from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.events.kafka import ensure_topics

PARTITIONS = 4
_ASSIGNED = re.compile(r"assigned partitions \[([\d, ]*)\]")


@dataclass
class ScaleResult:
    processes: int
    events: int
    seconds: float
    #: Messages each process reported when it stopped (all > 0: every process took part).
    per_process: list[int]

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def _assigned(log: Path) -> list[int]:
    lines = _ASSIGNED.findall(log.read_text() if log.exists() else "")
    return [int(p) for p in lines[-1].split(",") if p.strip()] if lines else []


def _env(settings: Settings) -> dict[str, str]:
    env = {**os.environ}
    for name, value in settings.model_dump().items():
        if value is not None and not isinstance(value, tuple):
            env[f"DP_{name.upper()}"] = str(value)
    return env


def _count(pg: str, schema: str) -> int:
    with psycopg.connect(pg, options=f"-csearch_path={schema}") as connection:
        row = connection.execute("SELECT count(*) FROM decisions").fetchone()
    return int(row[0]) if row else 0


def _reset(settings: Settings, pg: str, schema: str) -> None:
    """An empty decision log and empty windows: every run decides the same events from scratch."""
    with psycopg.connect(pg, options=f"-csearch_path={schema}", autocommit=True) as connection:
        connection.execute("TRUNCATE outcomes, explanations, decision_events, decisions")
    url = settings.feature_store_url
    if url.startswith("redis+cluster://"):
        for address in url.split("://", 1)[1].split(","):
            host, port = address.rsplit(":", 1)
            redis.Redis(host=host, port=int(port)).flushall()
    else:
        redis.Redis.from_url(url).flushdb()


def run_processes(
    base: Settings, events: Sequence[Event], processes: int, pg: str, work: Path, timeout_s: float = 600
) -> ScaleResult:
    """One measurement with ``processes`` worker processes (see the module docstring)."""
    suffix = uuid.uuid4().hex[:6]
    settings = base.model_copy(
        update={
            "kafka_events_topic": f"bench-scale-events-{suffix}",
            "kafka_decisions_topic": f"bench-scale-decisions-{suffix}",
            "kafka_dlq_topic": f"bench-scale-dlq-{suffix}",
            "kafka_group_id": f"bench-scale-{suffix}",
            "kafka_events_partitions": PARTITIONS,
        }
    )
    assert settings.database_schema is not None
    _reset(settings, pg, settings.database_schema)
    ensure_topics(settings)
    payloads = [(e.entity_id.encode(), e.model_dump_json().encode()) for e in events]
    logs = [work / f"worker-{suffix}-{k}.log" for k in range(processes)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "decision_platform.cli", "worker"],
            env=_env(settings),
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        for log in logs
    ]
    try:
        deadline = time.monotonic() + 120
        while True:
            owned = [_assigned(log) for log in logs]
            if sorted(p for o in owned for p in o) == list(range(PARTITIONS)) and all(owned):
                break
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                raise RuntimeError(f"the workers did not share the partitions: {owned}; see {logs}")
            time.sleep(0.1)
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "linger.ms": 5})
        started = time.perf_counter()
        for key, value in payloads:
            producer.produce(settings.kafka_events_topic, key=key, value=value)
            producer.poll(0)
        producer.flush(30)
        deadline = time.monotonic() + timeout_s
        while _count(pg, settings.database_schema) < len(payloads):
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all {len(payloads)} events were decided within {timeout_s} s")
            time.sleep(0.02)
        seconds = time.perf_counter() - started
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
    per_process = []
    for log in logs:
        found = re.findall(r"worker stopped after (\d+)", log.read_text())
        per_process.append(int(found[-1]) if found else 0)
    return ScaleResult(processes, len(payloads), seconds, per_process)
