"""Latency of the analyst console's pages with a million decisions in PostgreSQL.

    .venv/bin/python bench/bench_console.py --decisions 1000000 --requests 200

One run: a small model set trained into a private schema ``bench_console_<id>``, then ``--decisions``
synthetic decisions bulk-loaded with COPY (ids time-ordered over the last ``--days`` days, 50k entities,
~80% allow / 15% throttle / 5% block, rules fired on the throttles and blocks, ~10% with an outcome),
``ANALYZE``, one server (``decision-platform serve``, no LLM), and closed-loop requests from one
connection, one scenario at a time:

* ``queue``            the default queue page (throttles and blocks, newest first)
* ``queue_deep``       a page from the middle of the table (keyset cursor ``before=<id>``)
* ``queue_block_rule`` blocks on which one common rule fired
* ``queue_filters``    throttles and blocks, risk band 0.5..1, no outcome yet, the last 24 h
* ``queue_entity``     one entity's decisions
* ``decision``         the decision page of a random decision (record, outcome, timeline, narrative facts)
* ``models``           the models page (registry, serving set, reports; no shadow registered)

Then, once, ``decision-platform rules backtest config/rules.yaml`` over the whole window (every decision),
timed end to end: what a what-if of that size costs.

Latency is the client's, request sent to body read, over keep-alive. The schema is dropped at the end,
whatever happened. Results are printed and appended to ``bench/results.jsonl`` (``bench: console``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.table import Table

from bench_api import (
    REPO_ROOT,
    Backends,
    add_run_options,
    console,
    finish_run,
    free_port,
    machine_busy_seconds,
    machine_info,
    platform_command,
    running_server,
    save_run,
    train,
    wait_for_quiet,
    wait_ready,
)

GOAL_P95_MS = 100.0
ENTITIES = 50_000
RULES = [
    ("velocity_step_up", "floor"),
    ("card_testing_burst", "block"),
    ("large_amount_step_up", "floor"),
    ("extreme_anomaly", "floor"),
]
FEATURES = [
    "count_1m",
    "count_5m",
    "count_1h",
    "sum_1h",
    "mean_24h",
    "max_24h",
    "distinct_device_1h",
    "amount",
]
COLUMNS = [
    "id",
    "entity_id",
    "event_id",
    "created_at",
    "features",
    "amount",
    "anomaly",
    "risk",
    "probabilities",
    "proposed_action",
    "action_mask",
    "action",
    "propensity",
    "decided_by",
    "rules_fired",
    "fallback",
    "model_versions",
    "reasons",
    "explanation",
    "explanation_source",
    "latency_ms",
    "event_type",
    "attributes",
    "shadow",
]
EPOCH_MS = 1_704_067_200_000  # core/ids.py


def _copy_text(value: Any) -> str:
    """One field in COPY's text format."""
    if value is None:
        return "\\N"
    text = value if isinstance(value, str) else str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def synthetic_rows(n: int, days: float, seed: int, labelled: list[int]) -> Iterator[list[Any]]:
    """``n`` decision rows (COPY field lists), oldest first; appends the ids of the ~10% with an outcome
    to ``labelled``. A generator: a million rows are never all in memory."""
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    span_ms = int(days * 86_400_000)
    start_ms = now_ms - span_ms
    versions = orjson.dumps(
        {"anomaly": "anomaly-bench", "risk": "risk-bench", "policy": "policy-bench"}
    ).decode()
    for i in range(n):
        ms = start_ms + (span_ms * i) // n
        decision_id = ((ms - EPOCH_MS) << 22) | (i & 0xFFF)
        roll = rng.random()
        action = 0 if roll < 0.80 else (1 if roll < 0.95 else 2)
        risk = rng.random() * (0.3 if action == 0 else 1.0)
        fired = []
        if action:
            name, tier = RULES[0] if action == 1 else RULES[1]
            if rng.random() < 0.3:
                name, tier = rng.choice(RULES[2:])
            fired.append({"name": name, "tier": tier, "description": "", "inputs": []})
        features = {f: round(rng.random() * 20, 3) for f in FEATURES}
        reasons = [
            {
                "feature": f,
                "value": features[f],
                "direction": "raises_risk",
                "weight": round(rng.random(), 3),
                "kind": "risk",
                "description": f,
                "text": f"{f} {features[f]}",
            }
            for f in FEATURES[:3]
        ]
        created = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()
        mask = [action != 1 or not fired, True, True]
        yield (
            [
                decision_id,
                f"e{rng.randrange(ENTITIES)}",
                f"ev-{i}",
                created,
                orjson.dumps(features).decode(),
                features["amount"],
                round(rng.random(), 4),
                round(risk, 4),
                "[0.7, 0.2, 0.1]",
                0,
                orjson.dumps(mask).decode(),
                action,
                0.7,
                "rule" if fired else "policy",
                orjson.dumps(fired).decode(),
                None,
                versions,
                orjson.dumps(reasons).decode(),
                "Synthetic decision for the console bench.",
                "template",
                1.0,
                "payment",
                orjson.dumps({"country": "FR", "device_id": f"d-{rng.randrange(10**6)}"}).decode(),
                None,
            ]
        )
        if rng.random() < 0.1:
            labelled.append(decision_id)


def bulk_load(database_url: str, schema: str, n: int, days: float, seed: int) -> dict[str, float]:
    """COPY ``n`` synthetic decisions (in chunks) and outcomes for some; ANALYZE. Returns timings."""
    import psycopg

    timings: dict[str, float] = {}
    labelled: list[int] = []
    t0 = time.perf_counter()
    with psycopg.connect(database_url, options=f"-csearch_path={schema}") as conn:
        with conn.cursor() as cursor:
            with cursor.copy(f"COPY decisions ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                buffer = io.StringIO()
                for i, row in enumerate(synthetic_rows(n, days, seed, labelled), 1):
                    buffer.write("\t".join(_copy_text(v) for v in row) + "\n")
                    if i % 20_000 == 0:
                        copy.write(buffer.getvalue())
                        buffer = io.StringIO()
                copy.write(buffer.getvalue())
            with cursor.copy(
                "COPY outcomes (decision_id, outcome, reward, received_at, imputed) FROM STDIN"
            ) as copy:
                now = dt.datetime.now(dt.UTC).isoformat()
                copy.write("".join(f"{d}\tsuccess\t1.0\t{now}\tf\n" for d in labelled))
        conn.commit()
        timings["copy_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        conn.autocommit = True
        conn.execute("ANALYZE decisions")
        conn.execute("ANALYZE outcomes")
        timings["analyze_s"] = time.perf_counter() - t0
    return timings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def scenarios(rows_ids: list[int], rng: random.Random) -> dict[str, Any]:
    middle = rows_ids[len(rows_ids) // 2]
    return {
        "queue": lambda: "/console/queue",
        "queue_deep": lambda: f"/console/queue?before={middle - rng.randrange(10**9)}",
        "queue_block_rule": lambda: "/console/queue?action=block&rule=card_testing_burst",
        "queue_filters": lambda: "/console/queue?risk_min=0.5&risk_max=1&unlabelled=1&since=24h",
        "queue_entity": lambda: f"/console/queue?action=any&entity=e{rng.randrange(ENTITIES)}",
        "decision": lambda: f"/console/decisions/{rng.choice(rows_ids)}",
        "models": lambda: "/console/models",
    }


def measure(base_url: str, path_of: Any, requests: int, warmup: int = 10) -> dict[str, Any]:
    latencies, statuses = [], {}
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for i in range(warmup + requests):
            path = path_of()
            t0 = time.perf_counter()
            answer = client.get(path)
            elapsed = (time.perf_counter() - t0) * 1000.0
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            if i >= warmup:
                latencies.append(elapsed)
    return {
        "requests": requests,
        "p50_ms": round(percentile(latencies, 50), 2),
        "p95_ms": round(percentile(latencies, 95), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
        "statuses": statuses,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--requests", type=int, default=200, help="timed requests per scenario")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="seconds to wait for an idle machine")
    add_run_options(parser)
    parser.set_defaults(train_entities=300, train_days=3.0, train_timesteps=2048)
    return parser


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # the finally block stops the server and drops the schema


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="bench-console-"))
    run_tag = f"console_{secrets.token_hex(4)}"
    backends = None
    try:
        backends = Backends.prepare(
            "real",
            workdir,
            args.database_url,
            args.redis_url,
            run_tag,
            {"DP_LLM_URL": "none", **dict(args.server_env)},
        )
        cmd = platform_command()
        train_s = train(
            cmd, backends.env, workdir, args.train_entities, args.train_days, args.train_timesteps
        )
        assert backends.schema is not None
        with console.status(f"loading {args.decisions:,} decisions with COPY"):
            load = bulk_load(backends.database_url, backends.schema, args.decisions, args.days, args.seed)
        console.print(
            f"trained in {train_s:.0f} s; generated + COPY {load['copy_s']:.0f} s, "
            f"ANALYZE {load['analyze_s']:.1f} s; schema {backends.schema}"
        )
        import psycopg

        with psycopg.connect(backends.database_url, options=f"-csearch_path={backends.schema}") as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM decisions ORDER BY id")]
            size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('decisions'))").fetchone()[0]
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        results: dict[str, Any] = {}
        rng = random.Random(args.seed)
        with running_server(cmd, backends.env, workdir, port, 1) as proc:
            wait_ready(proc, base_url, workdir)
            for name, path_of in scenarios(ids, rng).items():
                other = wait_for_quiet(args.quiet_wait)
                busy0, t0 = machine_busy_seconds(), time.monotonic()
                results[name] = measure(base_url, path_of, args.requests)
                results[name]["machine_busy_cores"] = round(
                    (machine_busy_seconds() - busy0) / (time.monotonic() - t0), 2
                )
                results[name]["other_before_cores"] = round(other, 2)
        started = time.perf_counter()
        backtest = subprocess.run(
            [
                *cmd,
                "rules",
                "backtest",
                str(REPO_ROOT / "config" / "rules.yaml"),
                "--since",
                f"{args.days + 1}d",
                "--json",
            ],
            env=backends.env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        backtest_s = time.perf_counter() - started
        if backtest.returncode != 0:
            raise SystemExit(f"rules backtest failed: {backtest.stderr[-2000:]}")
        replayed = json.loads(backtest.stdout)
        console.print(
            f"rules backtest of {replayed['decisions']:,} decisions: {backtest_s:.1f} s "
            f"({replayed['decisions'] / backtest_s:,.0f} decisions/s), {replayed['changed']:,} changed"
        )
        table = Table(title=f"Console pages, {len(ids):,} decisions in PostgreSQL ({size}), one connection")
        for column in (
            "scenario",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            f"p95 ≤ {GOAL_P95_MS:.0f}",
            "statuses",
            "busy cores",
        ):
            table.add_column(column, justify="left" if column in ("scenario", "statuses") else "right")
        for name, r in results.items():
            ok = "yes" if r["p95_ms"] <= GOAL_P95_MS else "[red]no[/red]"
            table.add_row(
                name,
                f"{r['p50_ms']:.1f}",
                f"{r['p95_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['max_ms']:.1f}",
                ok,
                json.dumps(r["statuses"]),
                f"{r['machine_busy_cores']:.2f}",
            )
        console.print(table)
        run = {
            "bench": "console",
            "when": dt.datetime.now(dt.UTC).isoformat(),
            "machine": machine_info(),
            "decisions": len(ids),
            "table_size": size,
            "load": load,
            "results": results,
            "backtest": {"decisions": replayed["decisions"], "seconds": round(backtest_s, 2)},
            "label": args.label,
        }
        save_run(run, args)
        return 0 if all(r["p95_ms"] <= GOAL_P95_MS for r in results.values()) else 1
    finally:
        finish_run(backends, workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())
