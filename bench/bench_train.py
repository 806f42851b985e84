"""What `decision-platform train` costs: peak memory and time, at growing sizes of one data set.

    .venv/bin/python bench/bench_train.py --path ../shared/data/cards-dev.csv.gz \\
        --mapping ../shared/data/cards-dev.yaml --fractions 0.25,0.5,1

Each size is the first fraction of the file's rows (a gzip copy in a temp dir), trained by the real CLI
in its own process (``train --source csv --no-promote``, a private SQLite registry and model dir, the
default configuration) so that its peak RSS is its own: ``ru_maxrss`` of the finished child. Memory
should grow linearly with the events and stay bounded: the table gives MB and seconds per million
events (the slope between the smallest and the largest size, which removes the fixed cost of the
imports) and the peak extrapolated to ``--target`` events. A JSON line goes to bench/results.jsonl.

``--grow-to N`` adds a size the file does not have: rows beyond its end are its rows again, later in
time (the mapping's time column plus the file's span, ids suffixed), so the same entities carry on for
another span. That is the memory and time of N events, not new information: use it for cost, never for
model quality.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform as host
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).with_name("results.jsonl")


def head(path: Path, rows: int, out: Path) -> int:
    """The header and the first ``rows`` data rows of a (gzip) CSV, as gzip; the rows written."""
    opener = gzip.open if path.suffix == ".gz" else open
    written = 0
    with opener(path, "rt", newline="") as src, gzip.open(out, "wt", newline="", compresslevel=1) as dst:
        dst.write(src.readline())
        for line in src:
            if written >= rows:
                break
            dst.write(line)
            written += 1
    return written


def grown(path: Path, rows: int, out: Path, mapping: Path) -> int:
    """The file's rows, then its rows again a time span later (ids suffixed) up to ``rows``, as gzip."""
    spec = yaml.safe_load(mapping.read_text(encoding="utf-8"))
    time_column, id_column = spec["time"]["column"], spec.get("id_column")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as src:
        reader = csv.reader(src)
        header = next(reader)
        data = list(reader)
    at_time = header.index(time_column)
    at_id = header.index(id_column) if id_column else None
    times = [float(row[at_time]) for row in data]
    span = max(times) - min(times) + 1.0
    with gzip.open(out, "wt", newline="", compresslevel=1) as dst:
        writer = csv.writer(dst)
        writer.writerow(header)
        for written in range(rows):
            lap, at = divmod(written, len(data))
            row = data[at]
            if lap:
                row = list(row)
                row[at_time] = repr(float(row[at_time]) + lap * span)
                if at_id is not None:
                    row[at_id] = f"{row[at_id]}-{lap}"
            writer.writerow(row)
    return rows


def count_rows(path: Path) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as src:
        return sum(1 for _ in src) - 1


def train_once(csv: Path, mapping: Path, workdir: Path, timesteps: int | None) -> tuple[float, float, str]:
    """(peak RSS in MB, wall seconds, what it printed) of one `train` process."""
    env = os.environ | {
        "DP_MODEL_DIR": str(workdir / "models"),
        "DP_DATABASE_URL": f"sqlite:///{workdir / 'registry.db'}",
        "DP_LLM_URL": "none",
    }
    # The mapping's features file is found by name next to it; the CLI needs both.
    command = [sys.executable, "-m", "decision_platform.cli", "train", "--source", "csv"]
    command += ["--path", str(csv), "--mapping", str(mapping), "--no-promote"]
    if timesteps is not None:
        command += ["--timesteps", str(timesteps)]
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"train failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; max over children
    if peak <= before:
        raise SystemExit("sizes must run from small to large: ru_maxrss is the largest child's so far")
    return peak / 1024.0, seconds, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path", type=Path, required=True)
    parser.add_argument("--mapping", type=Path, required=True)
    parser.add_argument("--fractions", default="0.25,0.5,1", help="increasing fractions of the rows")
    parser.add_argument("--target", type=int, default=590_000, help="events to extrapolate the peak to")
    parser.add_argument("--timesteps", type=int, default=None, help="PPO steps (default: train's)")
    parser.add_argument(
        "--grow-to", type=int, default=None, help="add a run of this many events (the file repeated later)"
    )
    parser.add_argument("--show-output", action="store_true", help="print each train's own tables")
    args = parser.parse_args()
    fractions = sorted(float(f) for f in args.fractions.split(","))
    total = count_rows(args.path)
    if args.grow_to is not None and args.grow_to > total:
        fractions.append(args.grow_to / total)
    console = Console()
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="dp-bench-train-") as tmp:
        for fraction in fractions:
            workdir = Path(tmp) / f"f{fraction:g}"
            workdir.mkdir()
            name = args.path.name if args.path.suffix == ".gz" else f"{args.path.name}.gz"
            data_file = workdir / name
            wanted = round(total * fraction)
            if wanted > total:
                events = grown(args.path, wanted, data_file, args.mapping)
            else:
                events = head(args.path, wanted, data_file)
            # The features file is looked up beside the mapping under the mapping's own name.
            mapping = workdir / args.mapping.name
            mapping.write_bytes(args.mapping.read_bytes())
            features = args.mapping.with_name(args.mapping.stem + ".features.yaml")
            if features.exists():
                (workdir / features.name).write_bytes(features.read_bytes())
            console.print(f"training on {events:,} events ...")
            peak, seconds, printed = train_once(data_file, mapping, workdir, args.timesteps)
            if args.show_output:
                console.print(printed, markup=False, highlight=False)
            rows.append({"events": events, "peak_rss_mb": peak, "seconds": seconds})
            data_file.unlink()
    first, last = rows[0], rows[-1]
    span = max(1, last["events"] - first["events"])
    mb_per_million = (
        (last["peak_rss_mb"] - first["peak_rss_mb"]) / span * 1e6 if len(rows) > 1 else float("nan")
    )
    s_per_million = last["seconds"] / last["events"] * 1e6
    fixed = last["peak_rss_mb"] - mb_per_million * last["events"] / 1e6
    at_target = fixed + mb_per_million * args.target / 1e6

    table = Table(title=f"decision-platform train on {args.path.name}")
    for column in ("events", "peak RSS (MB)", "wall (s)", "s per million events"):
        table.add_column(column, justify="right")
    for row in rows:
        per_million = row["seconds"] / row["events"] * 1e6
        table.add_row(
            f"{row['events']:,}", f"{row['peak_rss_mb']:,.0f}", f"{row['seconds']:.0f}", f"{per_million:.0f}"
        )
    console.print(table)
    console.print(
        f"memory: {mb_per_million:,.0f} MB per million events above a fixed {fixed:,.0f} MB "
        f"(imports, models); extrapolated peak at {args.target:,} events: {at_target:,.0f} MB"
    )
    record = {
        "bench": "train",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": host.python_version()},
        "data": args.path.name,
        "runs": rows,
        "mb_per_million_events": mb_per_million,
        "fixed_mb": fixed,
        "seconds_per_million_events": s_per_million,
        "extrapolated_peak_mb": {str(args.target): at_target},
    }
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
