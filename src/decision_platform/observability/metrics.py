"""The platform's Prometheus metrics, defined once.

Names follow Prometheus conventions: a ``dp_`` namespace, base units (seconds), ``_total`` counters.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Sub-millisecond resolution matters: the whole /decide budget is 5 ms.
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

DECISIONS = Counter(
    "dp_decisions_total", "Decisions made, by final action and what decided it.", ["action", "decided_by"]
)
DECISION_LATENCY = Histogram(
    "dp_decision_latency_seconds",
    "Time spent per decision stage; stage=total is end to end inside the engine.",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
FALLBACKS = Counter("dp_fallbacks_total", "Decisions that fell back to rules + the safe action.", ["reason"])
RULE_HITS = Counter("dp_rule_hits_total", "Rules that fired.", ["rule", "tier"])
RULE_ERRORS = Counter(
    "dp_rule_errors_total", "Rules that could not be evaluated (treated as not fired).", ["rule"]
)
RISK_SCORE = Histogram("dp_risk_score", "Risk score distribution (P(bad)).", buckets=SCORE_BUCKETS)
ANOMALY_SCORE = Histogram("dp_anomaly_score", "Anomaly score distribution.", buckets=SCORE_BUCKETS)
OUTCOMES = Counter(
    "dp_outcomes_total", "Outcomes received, by outcome and the action taken.", ["outcome", "action"]
)
REWARD = Histogram(
    "dp_outcome_reward", "Reward of each outcome received.", buckets=(-100, -20, -5, -1, 0, 1, 5, 20, 100)
)
FEATURE_EVENTS = Counter(
    "dp_feature_events_total", "Events applied to the feature store, by result.", ["result"]
)  # result: applied | duplicate | late
FEATURE_STORE_ERRORS = Counter("dp_feature_store_errors_total", "Feature store failures.", ["operation"])
DB_ERRORS = Counter("dp_db_errors_total", "Database failures.", ["operation"])
DB_BATCH_SIZE = Histogram(
    "dp_db_batch_size", "Decisions written per group commit.", buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500)
)
DECISIONS_SPOOLED = Counter(
    "dp_decisions_spooled_total", "Decisions written to the local spool because the database failed."
)
MODEL_INFO = Gauge("dp_model_info", "Model versions in use (value 1).", ["kind", "version"])

# --- stream worker
EVENTS_CONSUMED = Counter("dp_events_consumed_total", "Events consumed by the stream worker.", ["topic"])
EVENTS_DEAD_LETTERED = Counter(
    "dp_events_dead_lettered_total", "Messages sent to the dead-letter topic, by reason.", ["reason"]
)
EVENTS_PRODUCED = Counter("dp_events_produced_total", "Events acknowledged by the broker (POST /events).")
CONSUMER_LAG = Gauge("dp_consumer_lag_messages", "Messages not yet consumed, per partition.", ["topic", "partition"])
WORKER_BATCH_SECONDS = Histogram(
    "dp_worker_batch_seconds",
    "Time to process one consumed batch end to end (parse, features, decide, store, publish, commit).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
