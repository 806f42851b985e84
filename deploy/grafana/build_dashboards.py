"""Build the Grafana dashboards (dashboards/*.json) from the short panel lists below.

Review and edit the panels here, then run ``python deploy/grafana/build_dashboards.py``; the JSON files
are what Grafana provisions, and tests check they are up to date with this file and that every query
returns data from a real Prometheus scraping the platform. Standard library only, so it runs anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources/prometheus.yml
R = "$__rate_interval"  # Grafana picks it from the scrape interval and the zoom level


@dataclass
class Panel:
    title: str
    #: (PromQL, legend) pairs, one per line on the panel.
    queries: list[tuple[str, str]]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | heatmap | table
    width: int = 12
    height: int = 8
    description: str = ""
    stacked: bool = False


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel] = field(default_factory=list)


def quantiles(metric: str, selector: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list:
    """histogram_quantile lines of one histogram, merged across processes and instances."""
    return [
        (f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{selector}[{R}])))", f"p{q * 100:g}")
        for q in qs
    ]


def share(numerator: str, denominator: str) -> str:
    """A ratio that reads 0 (not "no data") while the numerator's series does not exist yet."""
    return f"(sum(rate({numerator}[{R}])) or vector(0)) / sum(rate({denominator}[{R}]))"


def stat(title: str, expr: str, unit: str, width: int = 6, note: str = "") -> Panel:
    """A single number (the last value), 4 units high."""
    return Panel(title, [(expr, title)], unit, "stat", width, 4, note)


def lines(
    title: str, queries: list, unit: str = "short", width: int = 12, stacked: bool = False, note: str = ""
) -> Panel:
    """A time series panel, one line per query and label set."""
    return Panel(title, queries, unit, "timeseries", width, 8, note, stacked)


def heatmap(title: str, histogram: str, selector: str = "", unit: str = "short") -> Panel:
    """A histogram's buckets over time (observations per bucket)."""
    expr = f"sum by (le) (increase({histogram}_bucket{selector}[{R}]))"
    return Panel(title, [(expr, "{{le}}")], unit, "heatmap")


def by(label: str, counter: str, legend: str = "") -> list:
    """Rate of a counter, one line per value of ``label`` (comma-separated labels allowed)."""
    return [(f"sum by ({label}) (rate({counter}[{R}]))", legend or "{{" + label + "}}")]


# The API's decisions only: the stream worker decides in batches, so its stage timings are per batch.
TOTAL = '{job="decision-api",stage="total"}'
STAGES = '{job="decision-api",stage!="total"}'
WITHIN_5MS = '{job="decision-api",stage="total",le="0.005"}'

OVERVIEW = Dashboard(
    "dp-overview",
    "Decision platform / Overview",
    "Traffic, actions, fallbacks, latency and outcomes at a glance.",
    [
        stat("Decisions per second", f"sum(rate(dp_decisions_total[{R}]))", "ops"),
        stat("Blocked", share('dp_decisions_total{action="block"}', "dp_decisions_total"), "percentunit"),
        stat(
            "Fallbacks",
            share("dp_fallbacks_total", "dp_decisions_total"),
            "percentunit",
            note="Decisions taken by rules + the safe action because a stage failed (alert: > 5%).",
        ),
        stat(
            "p99 decision latency",
            quantiles("dp_decision_latency_seconds", TOTAL, (0.99,))[0][0],
            "s",
            note="End to end inside the engine, storage included. SLO: 99% within 5 ms.",
        ),
        lines("Decisions by action", by("action", "dp_decisions_total"), "ops", stacked=True),
        lines(
            "Decisions by source",
            by("decided_by", "dp_decisions_total"),
            "ops",
            stacked=True,
            note="policy: the learned policy chose; rule: a rule forced or removed its choice; "
            "fallback: a stage failed.",
        ),
        lines("Fallbacks by reason", by("reason", "dp_fallbacks_total"), "ops"),
        lines("Outcomes by outcome", by("outcome", "dp_outcomes_total"), "ops", stacked=True),
        lines(
            "Dependency errors",
            [
                *by("operation", "dp_feature_store_errors_total", "feature store {{operation}}"),
                *by("operation", "dp_db_errors_total", "database {{operation}}"),
                (f"sum(rate(dp_decisions_spooled_total[{R}]))", "decisions spooled"),
            ],
            "ops",
            note="Spooled decisions are durable on local disk and replayed when the database is back.",
        ),
        lines(
            "Spool: acknowledged, not yet in the database",
            [
                ("sum(dp_spool_pending_records)", "pending records"),
                (f"sum(rate(dp_spool_replayed_total[{R}]))", "replayed / s"),
                ("sum(dp_spool_quarantined_total)", "quarantined (total)"),
                ("min(dp_database_up)", "database up (1) / spooling (0)"),
            ],
            note="Pending drains in the background once the database answers; a quarantined record was "
            "refused by the database for good and waits in the spool's quarantine.jsonl (alert).",
        ),
        lines(
            "Targets up",
            [('sum by (job) (up{job=~"decision-api|decision-worker"})', "{{job}}")],
            note="Processes answering the scrape, per job.",
        ),
    ],
)

LATENCY = Dashboard(
    "dp-latency",
    "Decision platform / Latency",
    "Where a decision's time goes, and the 5 ms SLO.",
    [
        lines(
            "End-to-end decision latency",
            quantiles("dp_decision_latency_seconds", TOTAL),
            "s",
            note="Inside the engine, from features to durable storage.",
        ),
        lines(
            "p99 by stage",
            [
                (
                    "histogram_quantile(0.99, sum by (le, stage) "
                    f"(rate(dp_decision_latency_seconds_bucket{STAGES}[{R}])))",
                    "{{stage}}",
                )
            ],
            "s",
        ),
        lines(
            "Mean time per stage",
            [
                (
                    f"sum by (stage) (rate(dp_decision_latency_seconds_sum{STAGES}[{R}])) / "
                    f"sum by (stage) (rate(dp_decision_latency_seconds_count{STAGES}[{R}]))",
                    "{{stage}}",
                )
            ],
            "s",
            stacked=True,
            note="Stacked, the stages add up to the mean end-to-end time.",
        ),
        stat(
            "Decisions within 5 ms",
            f"sum(rate(dp_decision_latency_seconds_bucket{WITHIN_5MS}[{R}])) / "
            f"sum(rate(dp_decision_latency_seconds_count{TOTAL}[{R}]))",
            "percentunit",
            note="SLO: 99%.",
        ),
        lines(
            "Error budget burn rate",
            [("dp:decision_slow:ratio_rate5m / 0.01", "5m"), ("dp:decision_slow:ratio_rate1h / 0.01", "1h")],
            width=6,
            note="1 spends the budget (1% of decisions over 5 ms) exactly; alerts page at 14.4 (1h and 5m) "
            "and open a ticket at 6 (6h and 30m).",
        ),
        heatmap("End-to-end latency distribution", "dp_decision_latency_seconds", TOTAL, "s"),
        lines(
            "Batch sizes",
            [(q, f"group commit {name}") for q, name in quantiles("dp_db_batch_size", "", (0.5, 0.99))]
            + [(q, f"API micro-batch {name}") for q, name in quantiles("dp_api_batch_size", "", (0.5, 0.99))],
            note="Decisions written per database transaction, and POST /decide requests decided together "
            "(serving/batcher.py): both grow with concurrency.",
        ),
    ],
)

MODEL_POLICY = Dashboard(
    "dp-model-policy",
    "Decision platform / Model & policy behaviour",
    "What the models score, what the policy and the rules decide, and what came of it.",
    [
        Panel("Models in use", [("max by (kind, version) (dp_model_info)", "")], kind="table", width=8),
        lines(
            "Actions by source",
            by("decided_by, action", "dp_decisions_total", "{{decided_by}} {{action}}"),
            "ops",
            width=8,
            stacked=True,
        ),
        lines(
            "Policy overruled by rules",
            [(share('dp_decisions_total{decided_by="rule"}', "dp_decisions_total"), "decided by a rule")],
            "percentunit",
            width=8,
        ),
        heatmap("Risk score distribution", "dp_risk_score"),
        heatmap("Anomaly score distribution", "dp_anomaly_score"),
        lines("Risk percentiles", quantiles("dp_risk_score", "", (0.5, 0.9, 0.99)), "percentunit"),
        lines("Rule hits by rule", by("rule, tier", "dp_rule_hits_total", "{{rule}} ({{tier}})"), "ops"),
        lines(
            "Rules that could not be evaluated",
            by("rule", "dp_rule_errors_total"),
            "ops",
            note="A missing fact (e.g. no anomaly score on a fallback) or a type error: the rule does "
            "not fire.",
        ),
        lines(
            "Outcomes by action", by("action, outcome", "dp_outcomes_total", "{{action}}: {{outcome}}"), "ops"
        ),
        lines(
            "Mean reward per outcome received",
            [
                (
                    f"(sum(rate(dp_outcome_reward_gained_total[{R}])) - sum(rate(dp_outcome_reward_lost_total"
                    f"[{R}]))) / sum(rate(dp_outcome_reward_count[{R}]))",
                    "mean reward",
                )
            ],
        ),
        lines(
            "LLM narratives by result",
            by("result", "dp_llm_narratives_total"),
            "ops",
            note="rejected: the grounding check refused the narrative and the template sentence stays.",
        ),
        lines("LLM narrative latency", quantiles("dp_llm_narrative_duration_seconds", "", (0.5, 0.95)), "s"),
        lines(
            "Shadow policy: agreement with the champion",
            [
                (
                    f'sum(rate(dp_shadow_decisions_total{{agrees="true"}}[{R}])) '
                    f"/ sum(rate(dp_shadow_decisions_total[{R}]))",
                    "agreement",
                )
            ],
            "percentunit",
            note="The shadow's choice under the same rules vs the champion's top choice; logged, never "
            "applied. Estimated value: `decision-platform models compare`.",
        ),
        lines(
            "Model reloads",
            by("result", "dp_model_reloads_total", "reload {{result}}"),
            "ops",
            note="refused: the new set would serve worse (a champion cannot load); the old one is kept.",
        ),
    ],
)

STREAM = Dashboard(
    "dp-stream",
    "Decision platform / Stream health",
    "Kafka ingestion: consumption, lag, dead letters, batch latency, feature windows.",
    [
        stat("Events consumed per second", f"sum(rate(dp_events_consumed_total[{R}]))", "ops", width=8),
        stat(
            "Consumer lag",
            "sum(dp_consumer_lag_messages)",
            "short",
            width=8,
            note="Messages waiting in Kafka, all partitions (alert: > 10k for 5 minutes).",
        ),
        stat("Workers up", 'sum(up{job="decision-worker"})', "short", width=8),
        lines("Events consumed by topic", by("topic", "dp_events_consumed_total"), "ops"),
        lines("Dead-lettered by reason", by("reason", "dp_events_dead_lettered_total"), "ops"),
        lines(
            "Consumer lag by partition",
            [("max by (topic, partition) (dp_consumer_lag_messages)", "{{topic}}/{{partition}}")],
        ),
        lines(
            "Batch latency",
            quantiles("dp_worker_batch_seconds", "", (0.5, 0.99)),
            "s",
            note="Consume, features, decide, store, publish, commit: one batch.",
        ),
        lines("Batch size", quantiles("dp_worker_batch_size", "", (0.5, 0.99))),
        lines(
            "Feature-store events by result",
            by("result", "dp_feature_events_total"),
            "ops",
            note="duplicate: an event id already counted (at-least-once delivery); late: older than the "
            "largest window, dropped.",
        ),
        lines(
            "Events produced (POST /events)",
            [(f"sum(rate(dp_events_produced_total[{R}]))", "events/s")],
            "ops",
        ),
    ],
)

DASHBOARDS = (OVERVIEW, LATENCY, MODEL_POLICY, STREAM)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = []
    for i, (expr, legend) in enumerate(panel.queries):
        target = {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
        if panel.kind == "heatmap":
            target["format"] = "heatmap"
        if panel.kind == "table":
            target.update(format="table", instant=True)
        targets.append(target)
    custom: dict = {}
    options: dict = {}
    if panel.kind == "timeseries":
        custom = {
            "fillOpacity": 20 if panel.stacked else 0,
            "stacking": {"mode": "normal" if panel.stacked else "none"},
        }
        options = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    elif panel.kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
        }
    elif panel.kind == "heatmap":
        options = {"calculate": False, "yAxis": {"unit": panel.unit}, "color": {"scheme": "Oranges"}}
    elif panel.kind == "table":
        options = {"showHeader": True}
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit, "custom": custom}, "overrides": []},
        "options": options,
    }


def dashboard_json(dashboard: Dashboard) -> dict:
    """Grafana's dashboard model; panels flow left to right in rows 24 units wide."""
    panels, x, y, row_height = [], 0, 0, 0
    for panel_id, panel in enumerate(dashboard.panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel_json(panel, panel_id, x, y))
        x, row_height = x + panel.width, max(row_height, panel.height)
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["decision-platform"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["decision-platform"],
                "title": "Decision platform",
                "asDropdown": False,
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "panels": panels,
    }


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{d.uid}.json": json.dumps(dashboard_json(d), indent=2, ensure_ascii=False) + "\n"
        for d in DASHBOARDS
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, text in render_all().items():
        (OUT / name).write_text(text, encoding="utf-8")
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
