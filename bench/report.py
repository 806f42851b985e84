"""Markdown tables from ``bench/results.jsonl``: how the numbers in bench/README.md are produced.

    .venv/bin/python bench/report.py                 # the last run
    .venv/bin/python bench/report.py --last 2        # the last two runs
    .venv/bin/python bench/report.py --run-id 1a2b3c4d --run-id 5e6f7a8b

Kept separate from the harness so the README can be regenerated from recorded runs, without rerunning
them, and so two runs are always shown with the same columns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results.jsonl"
LABELS = {"health": "GET /health", "read": "POST /decide (read-only)", "event": "POST /decide + event"}
STAGES = ("features", "anomaly", "risk", "policy", "reasons", "rules", "store", "total")


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def describe(run: dict[str, Any]) -> str:
    """One line saying what was measured where: date, commit, machine, backend, generator."""
    machine, gen, options = run["machine"], run["generator"], run["options"]
    dirty = f" + {machine['git_dirty_files']} modified files" if machine.get("git_dirty_files") else ""
    return (
        f"{run['date']} · commit `{machine['git_commit']}`{dirty} · {machine['nproc']} cores "
        f"({machine['cpu_model']}) · backend **{options['backend']}** ({run['backends']['database']}; "
        f"{run['backends']['feature_store']}) · {gen['version']} {gen.get('mode', 'closed loop')}, "
        f"{options['seconds']} s per scenario · workers {options['workers']} · run `{run['run_id']}`"
    )


def results_table(run: dict[str, Any]) -> str:
    closed = run["generator"].get("mode", "closed loop") == "closed loop"
    lines = [
        "| conc. | scenario | requests | errors | req/s | vs /health | p50 ms | p90 ms | p99 ms "
        "| max ms | server CPU | gen. CPU | other CPU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in run["results"]:
        health = next(
            (h for h in run["results"] if h["concurrency"] == r["concurrency"] and h["scenario"] == "health"),
            None,
        )
        ratio = ""
        if closed and health and health["rps"] and r["scenario"] != "health":
            ratio = f"{r['rps'] / health['rps']:.0%}"
        lat = r["latency_ms"]
        lines.append(
            f"| {r['concurrency']} | {LABELS[r['scenario']]} | {r['requests']:,} | {r['errors']:,} "
            f"| {r['rps']:,.0f} | {ratio} | {_num(lat.get('p50'))} | {_num(lat.get('p90'))} "
            f"| {_num(lat.get('p99'))} | {_num(lat.get('max'))} | {_num(r['server_cpu_cores'])} "
            f"| {_num(r['generator_cpu_cores'])} | {_num(r.get('other_cpu_cores'))} |"
        )
    return "\n".join(lines)


def stage_table(run: dict[str, Any]) -> str:
    lines = [
        "| conc. | scenario | " + " | ".join(STAGES) + " | HTTP mean | outside engine | DB batch |",
        "|---:|---|" + "---:|" * (len(STAGES) + 3),
    ]
    for r in run["results"]:
        split = r["server"]["stages"]
        if not split:
            continue
        cells = [_num(split[s]["mean_ms"], 3) for s in STAGES]
        http_mean = r["latency_ms"].get("mean")
        engine = split["total"]["mean_ms"]
        outside = http_mean - engine if http_mean is not None and engine is not None else None
        batch = _num(r["server"]["db_batch_mean"], 1)
        lines.append(
            f"| {r['concurrency']} | {LABELS[r['scenario']]} | "
            + " | ".join(cells)
            + f" | {_num(http_mean, 3)} | {_num(outside, 3)} | {batch} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--last", type=int, default=1, help="how many of the most recent runs")
    parser.add_argument("--run-id", action="append", default=[], help="specific runs (repeatable)")
    args = parser.parse_args(argv)
    runs = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    # The file is shared with other bench/ scripts: keep this harness's lines (early ones had no tag).
    runs = [r for r in runs if r.get("bench", "api") == "api" and "machine" in r and "results" in r]
    runs = [r for r in runs if r["run_id"] in args.run_id] if args.run_id else runs[-args.last :]
    if not runs:
        print("no matching runs", file=sys.stderr)
        return 1
    for run in runs:
        print(describe(run) + "\n")
        print(results_table(run) + "\n")
        print("Server-side mean per stage (ms), from `dp_decision_latency_seconds`:\n")
        print(stage_table(run) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
