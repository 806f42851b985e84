"""What the partitioned decision log costs on insert: the same batches into the flat table (schema 0004:
unique index on event_id) and into the day-partitioned one (0005: the event claim trigger).

Two schemas of the machine's PostgreSQL (dropped at the end); rows through the repository's real insert
path (``Repository.insert_decisions``), each with an event id, ids of today's partition.

    .venv/bin/python bench/bench_decision_log.py --rows 50000 --batch 500
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from rich.console import Console
from rich.table import Table

from decision_platform.core.ids import DecisionIdGenerator
from decision_platform.storage.database import MIGRATIONS_DIR, make_engine, migrate
from decision_platform.storage.repository import Repository

PG = "postgresql://postgres@127.0.0.1:5432/test"
console = Console()


def row(decision_id: int, k: int) -> dict:
    return {
        "id": decision_id,
        "entity_id": f"user-{k % 5000}",
        "event_id": f"bench-{k}",
        "created_at": datetime.now(UTC),
        "features": {f"f{j}": float(j * k % 97) for j in range(22)},
        "amount": 12.5,
        "anomaly": 0.4,
        "risk": 0.1,
        "probabilities": [0.8, 0.15, 0.05],
        "proposed_action": 0,
        "action_mask": [True, True, True],
        "action": 0,
        "propensity": 0.8,
        "decided_by": "policy",
        "rules_fired": [],
        "fallback": None,
        "model_versions": {"policy": "p", "risk": "r", "anomaly": "a"},
        "reasons": [{"feature": "amount", "value": 12.5, "direction": "up", "weight": 0.2}],
        "explanation": "Allowed: nothing unusual.",
        "explanation_source": "template",
        "latency_ms": 1.0,
        "event_type": "payment",
        "attributes": {"device_id": "d1"},
        "shadow": None,
    }


def measure(revision: str, rows: int, batch: int) -> float:
    schema = f"bench_log_{uuid.uuid4().hex[:8]}"
    engine = make_engine(PG, schema)
    try:
        if revision == "head":
            migrate(engine, schema)
        else:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            with engine.begin() as connection:
                connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
                config.attributes["connection"] = connection
                config.attributes["schema"] = schema
                command.upgrade(config, revision)
        repository = Repository(engine)
        ids = DecisionIdGenerator(node_id=1)
        batches = [
            [row(ids.next_id(), k) for k in range(s, min(s + batch, rows))] for s in range(0, rows, batch)
        ]
        repository.insert_decisions(batches[0])  # warm the pool and the plan
        started = time.perf_counter()
        for chunk in batches[1:]:
            repository.insert_decisions(chunk)
        seconds = time.perf_counter() - started
        return (rows - len(batches[0])) / seconds
    finally:
        engine.dispose()
        with psycopg.connect(PG, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    flat = measure("0004", args.rows, args.batch)
    partitioned = measure("head", args.rows, args.batch)
    table = Table(title=f"decision inserts, {args.rows} rows in batches of {args.batch} (insert_decisions)")
    for column in ("decisions table", "rows/s", "ratio"):
        table.add_column(column, justify="right")
    table.add_row("flat, unique event_id index (0004)", f"{flat:,.0f}", "1.00")
    table.add_row(
        "day partitions + event claim trigger (0005)", f"{partitioned:,.0f}", f"{partitioned / flat:.2f}"
    )
    console.print(table)
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    record = {
        "bench": "decision_log",
        "commit": git,
        "rows": args.rows,
        "batch": args.batch,
        "flat_rows_per_s": flat,
        "partitioned_rows_per_s": partitioned,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(Path(__file__).parent / "results.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
