"""Observability end to end: promtool on the shipped config, rules and dashboard queries; then the local
stack (`scripts/stack.py`, what `make stack` runs: tansu, the API with two uvicorn workers, the stream
worker, Debian's Prometheus on deploy/prometheus.yml + alerts.yml) on the running PostgreSQL and Redis,
real traffic including failures, and every dashboard query answered with data by that Prometheus."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
import yaml
from confluent_kafka import Producer
from prometheus_client.multiprocess import MultiProcessCollector

from decision_platform.config import PROJECT_ROOT
from decision_platform.devtools.tansu import free_port
from decision_platform.features.store import DEFAULT_KEY_PREFIX
from decision_platform.observability.local_prometheus import DEPLOY_DIR, binaries, dashboard_queries, query
from decision_platform.storage.spool import QUARANTINE_FILE
from tests.conftest import PG_URL, service_unavailable
from tests.integration.conftest import process_env, schema_with_models

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/11"
STACK = [sys.executable, str(PROJECT_ROOT / "scripts" / "stack.py")]
RATE_INTERVAL = "1m"  # stands for Grafana's $__rate_interval: the whole test fits in it
#: Metrics nothing in this stack emits: no LLM narrator runs (DP_LLM_URL is unset here) and the worker does
#: not observe its batch size yet. Their panels are parsed by promtool above; here they must stay empty,
#: which keeps this list honest: once something emits one, the test says to remove it.
NOT_YET_EMITTED = (
    "dp_llm_narratives_total",
    "dp_llm_narrative_duration_seconds",
    # The observed stack runs no shadow policy and no hot reload (tests/unit/test_registry_ops.py has them).
    "dp_shadow_decisions_total",
    "dp_model_reloads_total",
)
CORRUPT_ENTITY = "obs-corrupt"


@pytest.fixture(scope="module")
def tools() -> tuple[str, str]:
    found = binaries()
    if found is None:
        service_unavailable("prometheus + promtool (make prometheus / scripts/install-prometheus.sh)")
    assert found is not None
    return found


def promtool(tools: tuple[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tools[1], *args], capture_output=True, text=True, timeout=60, check=False)


# --- static checks with promtool


def test_prometheus_config_and_alert_rules_pass_promtool(tools: tuple[str, str]) -> None:
    for args in (
        ("check", "config", str(DEPLOY_DIR / "prometheus.yml")),
        ("check", "rules", str(DEPLOY_DIR / "alerts.yml")),
        ("test", "rules", str(DEPLOY_DIR / "alerts.test.yml")),  # each alert fires when it should
    ):
        result = promtool(tools, *args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_every_dashboard_query_is_valid_promql(tools: tuple[str, str], tmp_path: Path) -> None:
    """Each panel query becomes a recording rule, so that promtool parses every one of them."""

    def check(exprs: list[str]) -> subprocess.CompletedProcess[str]:
        rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
        path = tmp_path / "dashboard-queries.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
        return promtool(tools, "check", "rules", str(path))

    exprs = [expr.replace("$__rate_interval", RATE_INTERVAL) for _, _, expr in dashboard_queries()]
    assert len(exprs) >= 40
    result = check(exprs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
    assert check(["sum(rate(dp_decisions_total[1m])"]).returncode != 0  # the check does catch errors


# --- the running stack


@dataclass
class Stack:
    env: dict[str, str]
    api: str
    prometheus: str
    schema: str
    topic: str
    multiproc_dir: Path
    pids_dir: Path


@dataclass
class Traffic:
    api_decisions: int = 0
    fallbacks: int = 0
    events: int = 0
    poison: int = 0
    outcomes: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: Traffic) -> None:
        for name in ("api_decisions", "fallbacks", "events", "poison", "outcomes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors += other.errors


def run_stack(env: dict[str, str], command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STACK, command], env=env, capture_output=True, text=True, timeout=240, check=False, cwd=PROJECT_ROOT
    )


def logs(stack_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((stack_dir / "logs").glob("*")))


@pytest.fixture(scope="module")
def stack(
    tools: tuple[str, str], trained: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with schema_with_models(trained, "dp_obs", REDIS_URL) as schema:
        yield from _run_stack(schema, trained[1], tmp_path_factory.mktemp("stack"))


def _run_stack(schema: str, model_dir: Path, root: Path) -> Iterator[Stack]:
    api_port, prometheus_port = free_port(), free_port()
    topic = f"events-obs-{uuid.uuid4().hex[:6]}"
    env = process_env(schema, model_dir, REDIS_URL, root / "spool")
    env.update(
        DP_HOST="127.0.0.1",
        DP_PORT=str(api_port),
        DP_KAFKA_EVENTS_TOPIC=topic,
        DP_KAFKA_DECISIONS_TOPIC=f"{topic}-decisions",
        DP_KAFKA_DLQ_TOPIC=f"{topic}-dlq",
        DP_KAFKA_GROUP_ID=f"{topic}-workers",
        DP_KAFKA_SESSION_TIMEOUT_MS="3000",
        DP_KAFKA_HEARTBEAT_INTERVAL_MS="300",
        STACK_DIR=str(root / "stack"),
        STACK_KAFKA_PORT=str(free_port()),
        STACK_WORKER_METRICS_PORT=str(free_port()),
        STACK_PROMETHEUS_PORT=str(prometheus_port),
        STACK_SCRAPE_INTERVAL="1s",
        STACK_API_WORKERS="2",
    )
    started = run_stack(env, "start")
    try:
        assert started.returncode == 0, f"{started.stdout}\n{started.stderr}\n{logs(root / 'stack')}"
        yield Stack(
            env,
            f"http://127.0.0.1:{api_port}",
            f"http://127.0.0.1:{prometheus_port}",
            schema,
            topic,
            root / "stack" / "prometheus-multiproc",
            root / "stack" / "pids",
        )
    finally:
        run_stack(env, "stop")


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def scalar(prometheus: str, expr: str) -> float:
    result = query(prometheus, expr)
    return float(result[0]["value"][1]) if result else math.nan


def database_outage(stack: Stack, client: httpx.Client, traffic: Traffic) -> None:
    """The decisions table refuses a row: the decision is spooled and acknowledged, then quarantined (kept,
    with why) by the background replay, and the decisions after it are stored as usual."""
    constraint = f'ALTER TABLE "{stack.schema}".decisions'
    quarantine = Path(stack.env["DP_SPOOL_DIR"]) / QUARANTINE_FILE
    with psycopg.connect(PG_URL, autocommit=True) as connection:
        connection.execute(f"{constraint} ADD CONSTRAINT obs_outage CHECK (entity_id <> 'db-down') NOT VALID")
        try:
            response = client.post("/decide", json={"entity_id": "db-down"})
            assert response.status_code == 200, response.text
            traffic.api_decisions += 1
            refused = str(response.json()["decision_id"])
            wait_for(
                lambda: quarantine.exists() and refused in quarantine.read_text(), 10, "the quarantined row"
            )
        finally:
            connection.execute(f"{constraint} DROP CONSTRAINT obs_outage")
    assert client.post("/decide", json={"entity_id": "db-back"}).status_code == 200
    traffic.api_decisions += 1


def load(
    stack: Stack, client: httpx.Client, producer: Producer, worker: int, seconds: float, t: Traffic
) -> None:
    """Decisions with and without events, rule hits, fallbacks, outcomes, events through Kafka, poison."""
    outcomes = ("success", "fraud", "false_positive", "chargeback")
    deadline, i = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        i += 1
        event = {"event_id": f"w{worker}-{i}", "amount": 9000.0 if i % 5 == 0 else 10.0 + i}
        if i % 7 == 0:
            event["attributes"] = {"device_id": "dev-known-stolen-0001"}  # deny list: block
        for body in (
            {"entity_id": f"u{worker}-{i % 6}", "event": event},
            {"entity_id": CORRUPT_ENTITY, "event": {"event_id": f"c{worker}-{i}"}},  # fallback
        ):
            response = client.post("/decide", json=body)
            if response.status_code != 200:
                t.errors.append(response.text)
                continue
            decision = response.json()
            t.api_decisions += 1
            t.fallbacks += decision["fallback"] == "entity_windows_unreadable"
            if i % 2 == 0 and not decision["fallback"]:
                outcome = {
                    "decision_id": decision["decision_id"],
                    "outcome": outcomes[i // 2 % len(outcomes)],
                }
                t.outcomes += client.post("/outcome", json=outcome).status_code == 201
        batch = [
            {"event_id": f"k{worker}-{i}-{j}", "entity_id": f"s{worker}-{j}", "amount": 5.0} for j in range(3)
        ]
        if client.post("/events", json={"events": batch}).status_code == 202:
            t.events += len(batch)
        if i % 4 == 0:
            producer.produce(stack.topic, key=b"poison", value=b"{not json")
            t.poison += 1
        time.sleep(0.02)
    producer.flush(10)


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Traffic:
    store = redis.Redis.from_url(REDIS_URL)
    store.set(f"{DEFAULT_KEY_PREFIX}{{{CORRUPT_ENTITY}}}:z", b"not a sorted set")  # its windows unreadable
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.env['STACK_KAFKA_PORT']}"})
    counts = Traffic()
    # No keep-alive: every request opens a connection, so both uvicorn workers get some.
    limits = httpx.Limits(max_keepalive_connections=0)
    # Counters must be scraped once at 0 before they move, or increase() cannot see the first change.
    spooled = 'sum(dp_decisions_spooled_total{job="decision-api"})'
    wait_for(lambda: scalar(stack.prometheus, spooled) == 0, 15, "a first scrape of the API")
    with httpx.Client(base_url=stack.api, limits=limits, timeout=10) as client:
        database_outage(stack, client, counts)
        # One Traffic per thread, added up after: `+=` on a shared one would lose counts.
        per_thread = [Traffic(), Traffic()]
        threads = [
            threading.Thread(target=load, args=(stack, client, producer, w, 4.0, t))
            for w, t in enumerate(per_thread, start=1)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for part in per_thread:
        counts.add(part)
    assert not counts.errors, counts.errors[:3]
    api = 'sum(dp_decisions_total{job="decision-api"})'
    wait_for(
        lambda: scalar(stack.prometheus, api) == counts.api_decisions, 20, "the API's decisions in Prometheus"
    )
    consumed = "sum(dp_events_consumed_total)"
    wait_for(
        lambda: scalar(stack.prometheus, consumed) == counts.events + counts.poison, 30, "the worker's events"
    )
    wait_for(lambda: bool(query(stack.prometheus, "dp_consumer_lag_messages")), 15, "consumer lag")
    time.sleep(2.5)  # two more scrapes: every series has the two samples rate() needs
    return counts


def test_api_metrics_add_up_across_uvicorn_workers(stack: Stack, traffic: Traffic) -> None:
    """Whichever worker answers a scrape, it reports every worker's decisions (multiprocess mode)."""
    per_process = {}
    for path in stack.multiproc_dir.glob("counter_*.db"):
        merged = MultiProcessCollector.merge([str(path)], accumulate=True)
        per_process[path.name] = sum(
            s.value
            for m in merged
            if m.name == "dp_decisions"
            for s in m.samples
            if s.name.endswith("_total")
        )
    assert len([n for n in per_process.values() if n > 0]) >= 2, per_process  # both workers decided
    for _ in range(6):  # a new connection each time: different workers answer
        body = httpx.get(f"{stack.api}/metrics", headers={"connection": "close"}, timeout=5).text
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.splitlines()
            if line.startswith("dp_decisions_total{")
        )
        assert total == traffic.api_decisions


def test_prometheus_counts_what_happened(stack: Stack, traffic: Traffic) -> None:
    p = stack.prometheus
    assert scalar(p, 'sum(dp_decisions_total{job="decision-api"})') == traffic.api_decisions
    assert scalar(p, 'sum(dp_decisions_total{job="decision-worker"})') == traffic.events  # one per event
    assert scalar(p, "sum(dp_events_dead_lettered_total)") == traffic.poison
    assert scalar(p, 'sum(dp_fallbacks_total{reason="entity_windows_unreadable"})') == traffic.fallbacks > 0
    assert scalar(p, "sum(dp_outcomes_total)") == traffic.outcomes > 0
    assert scalar(p, "sum(dp_decisions_spooled_total)") == 1  # the outage
    assert scalar(p, "sum(dp_db_errors_total)") >= 1
    assert scalar(p, 'sum(dp_events_produced_total{job="decision-api"})') == traffic.events
    assert {r["metric"]["kind"] for r in query(p, "dp_model_info")} == {"anomaly", "risk", "policy"}


def test_every_dashboard_query_returns_data(stack: Stack, traffic: Traffic) -> None:
    empty, unexpected = [], []
    for uid, title, expr in dashboard_queries():
        result = query(stack.prometheus, expr.replace("$__rate_interval", RATE_INTERVAL))
        values = [float(r["value"][1]) for r in result]
        if any(name in expr for name in NOT_YET_EMITTED):
            if any(math.isfinite(v) for v in values):
                unexpected.append(f"{uid} / {title}: now has data, remove it from NOT_YET_EMITTED")
        elif not any(math.isfinite(v) for v in values):
            empty.append(f"{uid} / {title}: {expr} -> {values or 'no series'}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert not unexpected, "\n".join(unexpected)


def test_alert_and_recording_rules_evaluate_on_live_data(stack: Stack, traffic: Traffic) -> None:
    groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    rules = {r.get("name"): r for g in groups for r in g["rules"]}
    assert len(rules) == 14
    assert all(r["health"] == "ok" for r in rules.values()), {n: r.get("lastError") for n, r in rules.items()}
    slow_share = scalar(stack.prometheus, "dp:decision_slow:ratio_rate5m")
    assert 0.0 <= slow_share <= 1.0
    # The outage spooled a decision: the database alert fires at once (no `for`).
    wait_for(
        lambda: any(
            a["labels"]["alertname"] == "DecisionsSpooled"
            for a in httpx.get(f"{stack.prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        ),
        10,
        "the DecisionsSpooled alert",
    )
    # ... and the row the database refused is quarantined: that pages too.
    wait_for(
        lambda: any(
            a["labels"]["alertname"] == "RecordsQuarantined"
            for a in httpx.get(f"{stack.prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        ),
        10,
        "the RecordsQuarantined alert",
    )


def test_stack_stop_stops_every_process_it_started(stack: Stack, traffic: Traffic) -> None:
    recorded = [json.loads(p.read_text()) for p in stack.pids_dir.glob("*.json")]
    assert {Path(str(r["args"][0])).name for r in recorded} >= {"tansu", "decision-platform", "prometheus"}
    stopped = run_stack(stack.env, "stop")
    assert stopped.returncode == 0, stopped.stderr
    for entry in recorded:
        state = Path(f"/proc/{entry['pid']}/stat")
        assert not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] == "Z", entry["args"]
    assert not list(stack.pids_dir.glob("*.json"))
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stack.api}/health", timeout=2)
