"""The platform's Prometheus metrics, defined once, and how a process exposes them.

Names follow Prometheus conventions: a ``dp_`` namespace, base units in the name (``_seconds``,
``_messages``), ``_total`` counters, an ``_info`` gauge of value 1 for versions. Dashboards
(deploy/grafana) and alert rules (deploy/alerts.yml) query exactly these names: rename one and the
observability tests fail until they follow.

Several processes, one view: ``decision-platform serve --workers N`` runs N uvicorn processes, and a
scrape reaches only one of them. With ``PROMETHEUS_MULTIPROC_DIR`` set (before any process imports
prometheus_client; see :mod:`decision_platform.observability.multiprocess`), every process writes its
samples to files there and :func:`render` merges them, so counters are totals across workers.
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector

from decision_platform.core.actions import ACTION_NAMES

#: Label values of ``action``: the API's ``action_name``.
ACTION_LABELS = ACTION_NAMES

# Sub-millisecond resolution matters: the whole /decide budget is 5 ms (the SLO bucket is le="0.005").
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))

# --- decisions (API and stream worker: the same engine)
DECISIONS = Counter(
    "dp_decisions_total",
    "Decisions made, by final action and what decided it (policy, rule or fallback).",
    ["action", "decided_by"],
)
DECISION_LATENCY = Histogram(
    "dp_decision_latency_seconds",
    "Time per decision stage (features, anomaly, risk, policy, reasons, rules, store); "
    "stage=total is end to end inside the engine, storage included.",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)


@cache
def stage_latency(stage: str) -> Histogram:
    """``DECISION_LATENCY`` of one stage, looked up once: ``labels()`` takes the metric's lock and builds
    a key on every call (~3% of a serving process's GIL time at concurrency 16, several calls a batch)."""
    return DECISION_LATENCY.labels(stage=stage)


FALLBACKS = Counter("dp_fallbacks_total", "Decisions that fell back to rules + the safe action.", ["reason"])
RULE_HITS = Counter("dp_rule_hits_total", "Rules that fired.", ["rule", "tier"])
RULE_ERRORS = Counter(
    "dp_rule_errors_total", "Rules that could not be evaluated (treated as not fired).", ["rule"]
)


class RuleMetrics:
    """The rules' observer in serving (rules.RuleObserver): every hit and error into the counters above."""

    def fired(self, rule: str, tier: str) -> None:
        RULE_HITS.labels(rule=rule, tier=tier).inc()

    def failed(self, rule: str) -> None:
        RULE_ERRORS.labels(rule=rule).inc()


RULE_METRICS = RuleMetrics()
RISK_SCORE = Histogram("dp_risk_score", "Risk score distribution (P(bad)).", buckets=SCORE_BUCKETS)
ANOMALY_SCORE = Histogram("dp_anomaly_score", "Anomaly score distribution.", buckets=SCORE_BUCKETS)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every finite v, with one increment per bucket touched instead of two
    locked increments per value (two score histograms a decision were ~7% of a stream worker's GIL time at
    500-event batches). Reads prometheus_client's bucket bounds and values as ``observe`` does: a test
    (test_metrics.py) keeps the two equal."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return
    histogram._raise_if_not_observable()
    histogram._sum.inc(float(values.sum()))
    # observe() counts a value in the first bucket whose upper bound is >= it: searchsorted's "left".
    buckets, counts = np.unique(np.searchsorted(histogram._upper_bounds, values), return_counts=True)
    for bucket, count in zip(buckets.tolist(), counts.tolist(), strict=True):
        histogram._buckets[bucket].inc(count)


# The version is a label; the value is always 1. "max" merges processes without a pid label.
MODEL_INFO = Gauge(
    "dp_model_info", "Model versions in use (value 1).", ["kind", "version"], multiprocess_mode="max"
)
# A separate family: dp_model_info stays "what decides", one version per kind.
SHADOW_MODEL_INFO = Gauge(
    "dp_shadow_model_info",
    "Shadow model versions scored beside the champion (value 1); logged, never applied.",
    ["kind", "version"],
    multiprocess_mode="max",
)
SHADOW_DECISIONS = Counter(
    "dp_shadow_decisions_total",
    "Decisions a shadow policy also scored, by whether its choice (argmax of its distribution under the "
    "same rules) agrees with the champion's.",
    ["agrees"],
)
SHADOW_ERRORS = Counter(
    "dp_shadow_errors_total",
    "Shadow policy failures, by stage (load, score); serving goes on without the shadow.",
    ["stage"],
)
MODEL_RELOADS = Counter(
    "dp_model_reloads_total",
    "Hot reloads of the serving models: applied, or refused (the new set would serve worse: kept the old).",
    ["result"],
)

# --- outcomes
OUTCOMES = Counter(
    "dp_outcomes_total", "Outcomes received, by outcome and the action taken.", ["outcome", "action"]
)
REWARD = Histogram(
    "dp_outcome_reward", "Reward of each outcome received.", buckets=(-100, -20, -5, -1, 0, 1, 5, 20, 100)
)
# prometheus_client exposes no _sum for a histogram with negative buckets (a sum that can go down is not a
# counter), so the running sum of rewards is kept as two counters: mean = (gained - lost) / count.
REWARD_GAINED = Counter("dp_outcome_reward_gained_total", "Sum of the positive rewards of outcomes received.")
REWARD_LOST = Counter("dp_outcome_reward_lost_total", "Sum of the magnitudes of the negative rewards.")

# --- dependencies
FEATURE_EVENTS = Counter(
    "dp_feature_events_total", "Events applied to the feature store, by result.", ["result"]
)  # result: applied | duplicate | late | withdrawn
EVENT_ID_CONFLICTS = Counter(
    "dp_event_id_conflicts_total",
    "Events refused because another entity's event, or one of the entity's with other content, holds their "
    "event_id (409 / dead letter).",
)
FEATURE_STORE_ERRORS = Counter("dp_feature_store_errors_total", "Feature store failures.", ["operation"])
DB_ERRORS = Counter("dp_db_errors_total", "Database failures.", ["operation"])
DAMAGED_ROWS = Counter(
    "dp_damaged_rows_total",
    "Stored rows a reader skipped, refused or showed as damaged: a column not holding what the platform "
    "writes there (reader 'database read': a read the database refused for what it holds).",
    ["reader"],
)
DB_BATCH_SIZE = Histogram(
    "dp_db_batch_size", "Decisions written per group commit.", buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500)
)
API_BATCH_SIZE = Histogram(
    "dp_api_batch_size",
    "POST /decide requests decided together in one micro-batch (serving/batcher.py).",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
DECISIONS_SPOOLED = Counter(
    "dp_decisions_spooled_total", "Decisions written to the local spool because the database failed."
)
SPOOL_APPENDED = Counter(
    "dp_spool_appended_total", "Records written to the local spool, by kind (decision | outcome).", ["kind"]
)
SPOOL_ERRORS = Counter(
    "dp_spool_errors_total",
    "Records the local spool could not make durable (full disk, I/O error) while the database could not take "
    "them either: answered 503, never acknowledged; by kind (decision | outcome).",
    ["kind"],
)
SPOOL_TIMEOUTS = Counter(
    "dp_spool_timeouts_total",
    "Records whose spool write was given up after DP_SPOOL_TIMEOUT_S (a disk that hangs), or that waited "
    "that long for their event's first try to reach the disk: answered 503, never acknowledged (also counted "
    "in dp_spool_errors_total when the append itself timed out); by kind (decision | outcome).",
    ["kind"],
)
SPOOL_REPLAYED = Counter("dp_spool_replayed_total", "Spooled records replayed into the database.")
SPOOL_QUARANTINED = Counter(
    "dp_spool_quarantined_total",
    "Records the database refused for good, moved to the spool's quarantine file, by kind.",
    ["kind"],
)
SPOOL_PENDING = Gauge(
    "dp_spool_pending_records",
    "Acknowledged records in the local spool, not yet in the database.",
    multiprocess_mode="livesum",
)
DATABASE_UP = Gauge(
    "dp_database_up",
    "1 when the write path reaches the database, 0 while it spools.",
    multiprocess_mode="livemin",
)

# --- stream worker (events/). Exposed by start_worker_metrics_server().
EVENTS_CONSUMED = Counter("dp_events_consumed_total", "Events consumed by the stream worker.", ["topic"])
EVENTS_DEAD_LETTERED = Counter(
    "dp_events_dead_lettered_total", "Messages sent to the dead-letter topic, by reason.", ["reason"]
)
EVENTS_PRODUCED = Counter("dp_events_produced_total", "Events acknowledged by the broker (POST /events).")
# Set it with .set() (not inc/dec): "mostrecent" keeps the value of the process that wrote last, so a
# partition that moved to another worker shows its new owner's lag, not the old owner's stale one.
CONSUMER_LAG = Gauge(
    "dp_consumer_lag_messages",
    "Messages not yet consumed, per partition (high watermark - committed offset).",
    ["topic", "partition"],
    multiprocess_mode="mostrecent",
)
WORKER_BATCH_SECONDS = Histogram(
    "dp_worker_batch_seconds",
    "Time to process one consumed batch end to end (parse, features, decide, store, publish, commit).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
WORKER_BATCH_SIZE = Histogram(
    "dp_worker_batch_size",
    "Messages per consumed batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
WORKER_COMMIT_FAILURES = Counter(
    "dp_worker_commit_failures_total",
    "Offset commits of the stream worker the broker did not take (asynchronous: a later commit on the "
    "partition covers them; else their messages are redelivered, their effects idempotent).",
)
WORKER_BATCH_FAILURES = Counter(
    "dp_worker_batch_failures_total",
    "Batch attempts that failed (a dependency down or slow: broker, feature store, database) and are "
    "processed again, uncommitted meanwhile; by the error's type.",
    ["error"],
)

# --- explanations (LLM narratives, written off the hot path)
LLM_NARRATIVES = Counter(
    "dp_llm_narratives_total",
    "LLM narratives requested, by result: accepted, rejected (failed the grounding check; the template "
    "is kept), error, timeout.",
    ["result"],
)
NARRATOR_ACTIVE = Gauge(
    "dp_narrator_active",
    "Which narrator writes narratives now (value 1): llm, starting (the template while the model is "
    "fetched and loaded) or template.",
    ["narrator", "model"],
    multiprocess_mode="max",
)
LLM_LATENCY = Histogram(
    "dp_llm_narrative_duration_seconds",
    "Time of one LLM narrative call, whatever its result.",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0),
)


def action_label(action: int) -> str:
    """The ``action`` label of a numeric action (0 allow, 1 throttle, 2 block)."""
    return ACTION_LABELS[action]


def observe_reward(reward: float) -> None:
    """Count an outcome's reward: in the distribution and in the running sum."""
    REWARD.observe(reward)
    (REWARD_GAINED if reward >= 0 else REWARD_LOST).inc(abs(reward))


def _registry() -> CollectorRegistry:
    """The registry to expose: merged files of every process in multiprocess mode, else this process's."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return registry


def render() -> tuple[bytes, str]:
    """The exposition body and its content type, for ``GET /metrics``."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def start_worker_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` of this process (or of all processes sharing PROMETHEUS_MULTIPROC_DIR) on
    ``host:port`` from a daemon thread: how the stream worker, which has no HTTP API, gets scraped.
    Use host 0.0.0.0 in a container."""
    start_http_server(port, addr=host, registry=_registry())
