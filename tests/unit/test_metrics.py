"""Prometheus metrics: each one moves when what it counts happens (real requests, the real registry),
the worker's endpoint serves them, and multiprocess mode adds up several processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from decision_platform.core.actions import ACTION_NAMES
from decision_platform.devtools.tansu import free_port
from decision_platform.observability import metrics
from decision_platform.observability.multiprocess import ENV_VAR, prepare_multiprocess_dir

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
STAGES = ("features", "anomaly", "risk", "policy", "reasons", "rules", "store", "total")


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples) -> Callable[..., float]:
    return lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)


def test_a_decision_moves_its_action_source_stages_scores_and_rules(client: TestClient) -> None:
    before = scrape(client)
    body = client.post(
        "/decide", json={"entity_id": "m1", "event": {"event_id": "m1-e1", "amount": 9000.0}}
    ).json()
    moved = delta(before, scrape(client))

    source = body["policy"]["decided_by"]
    assert moved("dp_decisions_total", action=body["action_name"], decided_by=source) == 1
    for stage in STAGES:
        assert moved("dp_decision_latency_seconds_count", stage=stage) == 1, stage
    assert moved("dp_decision_latency_seconds_sum", stage="total") > 0
    assert moved("dp_risk_score_count") == 1
    assert moved("dp_risk_score_sum") == pytest.approx(body["risk"])
    assert moved("dp_anomaly_score_count") == 1
    assert moved("dp_rule_hits_total", rule="large_amount_step_up", tier="floor") == 1
    assert moved("dp_feature_events_total", result="applied") == 1
    assert moved("dp_fallbacks_total", reason="feature_store_unavailable") == 0


def test_a_feature_store_failure_counts_the_error_the_fallback_and_the_rules_it_blinds(
    client: TestClient,
) -> None:
    store = client.app.state.platform.store
    store.client.set(store.keys("broken")[0], b"not a sorted set")  # the store rejects this entity
    before = scrape(client)
    body = client.post("/decide", json={"entity_id": "broken", "event": {"event_id": "b1"}}).json()
    moved = delta(before, scrape(client))

    assert body["fallback"] == "entity_windows_unreadable"
    assert moved("dp_fallbacks_total", reason="entity_windows_unreadable") == 1
    assert moved("dp_feature_store_errors_total", operation="entity") == 1
    assert moved("dp_decisions_total", action=body["action_name"], decided_by="fallback") == 1
    assert moved("dp_risk_score_count") == 0  # no score on a fallback
    # Without features and scores, the velocity and anomaly rules cannot be evaluated.
    assert moved("dp_rule_errors_total", rule="extreme_anomaly") == 1


def test_an_outcome_counts_by_outcome_and_action_name_with_its_reward(client: TestClient) -> None:
    decision = client.post("/decide", json={"entity_id": "o1"}).json()
    before = scrape(client)
    outcome = client.post("/outcome", json={"decision_id": decision["decision_id"], "outcome": "fraud"})
    client.post("/outcome", json={"decision_id": decision["decision_id"], "outcome": "fraud"})  # idempotent
    moved = delta(before, scrape(client))

    assert moved("dp_outcomes_total", outcome="fraud", action=decision["action_name"]) == 1
    assert moved("dp_outcome_reward_count") == 1
    reward = outcome.json()["reward"]
    assert reward < 0
    assert moved("dp_outcome_reward_lost_total") == pytest.approx(-reward)
    assert moved("dp_outcome_reward_gained_total") == 0


def test_model_versions_in_use_are_an_info_metric(client: TestClient) -> None:
    versions = client.post("/decide", json={"entity_id": "v1"}).json()["model_versions"]
    samples = scrape(client)
    assert set(versions) == {"anomaly", "risk", "policy"}
    for kind, version in versions.items():
        assert value(samples, "dp_model_info", kind=kind, version=version) == 1


def test_action_labels_are_the_api_action_names() -> None:
    assert metrics.ACTION_LABELS == ACTION_NAMES
    assert [metrics.action_label(a) for a in range(3)] == list(ACTION_NAMES)


def test_observe_many_counts_like_observe_one_by_one() -> None:
    """The batch path's histograms must read as if each score had been observed: the same buckets (a value
    on a bound belongs to that bound's bucket), the same count and sum; a NaN is not a score."""
    import numpy as np
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    values = np.array([0.0, 0.05, 0.0500001, 0.5, 0.51, 1.0, 1.5, -0.2, 0.999, np.nan, 0.05])
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("score", "s", buckets=metrics.SCORE_BUCKETS, registry=one_by_one)
    for value in values[np.isfinite(values)]:
        reference.observe(float(value))
    metrics.observe_many(Histogram("score", "s", buckets=metrics.SCORE_BUCKETS, registry=batched), values)
    metrics.observe_many(Histogram("empty", "e", registry=batched), np.array([]))

    def samples(registry: CollectorRegistry, name: str) -> dict:
        found = parse(generate_latest(registry).decode())
        return {
            key: value for key, value in found.items() if key[0].startswith(name) and "created" not in key[0]
        }

    expected = samples(one_by_one, "score")
    got = samples(batched, "score")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got[("score_count", frozenset())] == 10


def test_worker_metrics_server_serves_the_stream_metrics() -> None:
    port = free_port()
    metrics.start_worker_metrics_server(port)
    topic = f"events-{port}"
    metrics.EVENTS_CONSUMED.labels(topic=topic).inc(3)
    metrics.CONSUMER_LAG.labels(topic=topic, partition="2").set(41)
    samples = parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    assert value(samples, "dp_events_consumed_total", topic=topic) == 3
    assert value(samples, "dp_consumer_lag_messages", topic=topic, partition="2") == 41


WRITER = textwrap.dedent(
    """
    import sys, time
    from decision_platform.observability import metrics
    n, lag = int(sys.argv[1]), float(sys.argv[2])
    metrics.DECISIONS.labels(action="allow", decided_by="policy").inc(n)
    metrics.MODEL_INFO.labels(kind="risk", version="risk-v1").set(1)
    metrics.CONSUMER_LAG.labels(topic="events", partition="0").set(lag)
    """
)


def test_multiprocess_mode_adds_up_the_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `serve --workers N` relies on: every process writes its samples to files, /metrics merges."""
    env = {**os.environ, ENV_VAR: str(tmp_path)}
    for n, lag in ((2, 500.0), (3, 7.0)):  # the second process reports lag last: its value wins
        subprocess.run([sys.executable, "-c", WRITER, str(n), str(lag)], env=env, check=True, timeout=60)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    body, content_type = metrics.render()
    samples = parse(body.decode())

    assert content_type.startswith("text/plain")
    assert value(samples, "dp_decisions_total", action="allow", decided_by="policy") == 5
    assert value(samples, "dp_model_info", kind="risk", version="risk-v1") == 1  # one series, no pid label
    assert value(samples, "dp_consumer_lag_messages", topic="events", partition="0") == 7


def test_prepare_multiprocess_dir_empties_stale_samples_and_exports_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare_multiprocess_dir exports the variable: setenv first so that monkeypatch restores the original.
    monkeypatch.setenv(ENV_VAR, "")
    monkeypatch.delenv(ENV_VAR)
    assert prepare_multiprocess_dir(1, tmp_path / "unused") is None  # one process: nothing to share
    assert not (tmp_path / "unused").exists()

    directory = tmp_path / "mp"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"stale")
    (directory / "README").write_text("kept")
    assert prepare_multiprocess_dir(4, directory) == directory
    assert os.environ[ENV_VAR] == str(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["README"]
    # Set by the user: used even for one worker.
    assert prepare_multiprocess_dir(1, tmp_path / "other") == directory
