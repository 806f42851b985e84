"""/decide while PostgreSQL is away: latency while spooling, and how long the background replay takes.

    .venv/bin/python bench/bench_outage.py --rate 200 --healthy 10 --refuse 10 --freeze 20

One run = one freshly trained model set, one server process on the real PostgreSQL and Redis, both behind
the fault tests' TCP proxy (decision_platform.devtools.tcp_proxy), and three phases of the same open-loop
load (``bench/loadgen.py``: a fixed schedule of ``--rate`` requests/s, each request's latency counted
from its due time, so a stalled server is charged for the wait):

* ``healthy``  everything forwarded: the reference the other phases are compared with, in the same run.
* ``refuse``   PostgreSQL refuses connections and existing ones are reset (a dead server).
* ``freeze``   PostgreSQL's sockets stay open and carry nothing (a stalled server, a partition).

Every /decide carries an event with a unique id. After each phase the proxy forwards again, nothing more
is sent, and the harness polls PostgreSQL directly until every event id acknowledged (2xx) in the phase
is stored: that is the replay time, and anything still missing after ``--recovery-timeout`` is lost.

Results are printed as a table and appended as one JSON line (``"bench": "outage"``) to
``bench/results.jsonl``. Server start-up, training, backends and the load generator are bench_api.py's
and loadgen.py's, so the numbers compare with theirs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from rich.markup import escape
from rich.table import Table

from bench_api import (
    Backends,
    Generator,
    add_run_options,
    by_label,
    console,
    delta,
    finish_run,
    fmt,
    free_port,
    machine_info,
    platform_command,
    running_server,
    save_run,
    scrape,
    server_log_problems,
    train,
    wait_ready,
)
from decision_platform.devtools.tcp_proxy import Mode, TcpProxy

#: (phase, proxy mode during it); durations come from the options of the same names.
PHASES = (("healthy", Mode.FORWARD), ("refuse", Mode.REFUSE), ("freeze", Mode.FREEZE))


@dataclass(frozen=True)
class Proxied:
    """PostgreSQL and Redis behind proxies, and the URLs the server uses to reach them through those."""

    pg: TcpProxy
    redis: TcpProxy
    database_url: str
    redis_url: str

    @classmethod
    def open(cls, database_url: str, redis_url: str) -> Proxied:
        pg_url, rd_url = urlsplit(database_url), urlsplit(redis_url)
        pg = TcpProxy((pg_url.hostname or "127.0.0.1", pg_url.port or 5432))
        redis = TcpProxy((rd_url.hostname or "127.0.0.1", rd_url.port or 6379))
        return cls(
            pg,
            redis,
            pg_url._replace(netloc=_netloc(pg_url.username, pg.port)).geturl(),
            rd_url._replace(netloc=_netloc(rd_url.username, redis.port)).geturl(),
        )

    def close(self) -> None:
        self.pg.close()
        self.redis.close()


def _netloc(user: str | None, port: int) -> str:
    return f"{user + '@' if user else ''}127.0.0.1:{port}"


# ----------------------------------------------------------------------------------------- database
def stored_count(database_url: str, schema: str, event_ids: list[str]) -> int:
    """How many of ``event_ids`` have a decision row; read directly, never through the proxy."""
    if not event_ids:
        return 0
    with psycopg.connect(database_url, connect_timeout=3, options=f"-csearch_path={schema}") as conn:
        row = conn.execute("SELECT count(*) FROM decisions WHERE event_id = ANY(%s)", (event_ids,)).fetchone()
    return int(row[0]) if row else 0


def duplicate_events(database_url: str, schema: str) -> int:
    """Event ids stored more than once (a retried or replayed decision stored twice)."""
    with psycopg.connect(database_url, connect_timeout=3, options=f"-csearch_path={schema}") as conn:
        row = conn.execute(
            "SELECT count(*) FROM (SELECT event_id FROM decisions WHERE event_id IS NOT NULL "
            "GROUP BY event_id HAVING count(*) > 1) AS d"
        ).fetchone()
    return int(row[0]) if row else 0


def wait_stored(
    database_url: str, schema: str, event_ids: list[str], timeout_s: float
) -> tuple[int, float | None]:
    """Poll until every acknowledged event is stored; (stored, seconds it took, None if it never did)."""
    start = time.monotonic()
    while True:
        stored = stored_count(database_url, schema, event_ids)
        waited = time.monotonic() - start
        if stored >= len(event_ids):
            return stored, waited
        if waited >= timeout_s:
            return stored, None
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------ the run
def run_phase(
    name: str,
    mode: Mode,
    seconds: int,
    args: argparse.Namespace,
    gen: Generator,
    proxied: Proxied,
    backends: Backends,
    base_url: str,
    port: int,
    run_tag: str,
    workdir: Path,
) -> dict[str, Any]:
    """One phase: the fault on, load for ``seconds``, the fault off, then the wait for the replay."""
    before = scrape(base_url)
    proxied.pg.set_mode(mode)
    result = gen.run(
        port, "event", args.concurrency, seconds, args.entities, f"{run_tag}-{name}", args.seed, workdir
    )
    acked: list[str] = result.pop("acked_event_ids", [])
    assert backends.schema is not None
    in_db_during = stored_count(backends.database_url, backends.schema, acked)
    proxied.pg.forward()  # and nothing more is sent: the replay has to happen in the background
    in_db, replay_s = wait_stored(backends.database_url, backends.schema, acked, args.recovery_timeout)
    window = delta(before, scrape(base_url))
    statuses = result.get("statuses", {})
    result.update(
        {
            "phase": name,
            "proxy_mode": mode.value,
            "acknowledged": len(acked),
            "status_503": int(statuses.get("503", 0)),
            "stored_during_phase": in_db_during,
            "stored_after_recovery": in_db,
            "lost": len(acked) - in_db,
            "replay_s": replay_s,
            "server": {
                "spooled": window.get(("dp_decisions_spooled_total", ()), 0.0),
                "replayed": window.get(("dp_spool_replayed_total", ()), 0.0),
                "quarantined": sum(by_label(window, "dp_spool_quarantined_total", "kind").values()),
                "fallbacks": by_label(window, "dp_fallbacks_total", "reason"),
                "db_errors": by_label(window, "dp_db_errors_total", "operation"),
            },
        }
    )
    return result


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference or math.isnan(value) or math.isnan(reference):
        return None
    return value / reference


def print_results(run: dict[str, Any]) -> None:
    options = run["options"]
    table = Table(
        title=f"/decide under PostgreSQL outages — open loop at {options['rate']:g} req/s over "
        f"{options['concurrency']} connections, real PostgreSQL + Redis behind the proxy"
    )
    columns = (
        "phase",
        "s",
        "requests",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "p99 vs healthy",
        "errors",
        "503",
        "acked",
        "in DB during",
        "in DB after",
        "lost",
        "replay s",
        "spooled",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "phase" else "right")
    healthy_p99 = next((r["latency_ms"].get("p99") for r in run["results"] if r["phase"] == "healthy"), None)
    for r in run["results"]:
        lat = r["latency_ms"]
        vs = ratio(lat.get("p99"), healthy_p99)
        replay = r["replay_s"]
        table.add_row(
            r["phase"],
            str(r["seconds"]),
            f"{r['requests']:,}",
            fmt(lat.get("p50")),
            fmt(lat.get("p95")),
            fmt(lat.get("p99")),
            fmt(lat.get("max")),
            "" if vs is None or r["phase"] == "healthy" else f"{vs:,.1f}x",
            f"[red]{r['errors']:,}[/]" if r["errors"] else "0",
            f"{r['status_503']:,}",
            f"{r['acknowledged']:,}",
            f"{r['stored_during_phase']:,}",
            f"{r['stored_after_recovery']:,}",
            f"[red]{r['lost']:,}[/]" if r["lost"] else "0",
            "[red]never[/]" if replay is None else f"{replay:.1f}",
            f"{r['server']['spooled']:,.0f}",
        )
    console.print(table)
    console.print(
        "[dim]errors: non-2xx answers + socket errors + requests unanswered 10 s after the phase; "
        "lost: acknowledged but not in PostgreSQL after the recovery wait; replay s: from the proxy "
        "forwarding again to the last acknowledged decision stored, with no request sent meanwhile.[/dim]"
    )
    problems = run["server_log"]
    if problems.get("count"):
        console.print(
            f"server logged {problems['count']} warnings/errors, first: {escape(str(problems['first'][:3]))}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="/decide latency while spooling and background replay time (issue 11).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s in every phase")
    parser.add_argument("--concurrency", type=int, default=32, help="connections sharing the schedule")
    parser.add_argument("--healthy", type=int, default=10, help="seconds of the healthy phase")
    parser.add_argument("--refuse", type=int, default=10, help="seconds PostgreSQL refuses (0: skip)")
    parser.add_argument("--freeze", type=int, default=20, help="seconds PostgreSQL is frozen (0: skip)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured healthy seconds first")
    parser.add_argument(
        "--recovery-timeout", type=float, default=60.0, help="longest wait for the replay after a phase"
    )
    parser.add_argument("--entities", type=int, default=1000, help="distinct entity ids in the requests")
    add_run_options(parser)
    return parser


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # the finally blocks stop the server, close the proxies, drop the schema


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate <= 0 or args.concurrency < 1 or args.healthy < 1:
        raise SystemExit("--rate > 0, --concurrency >= 1, --healthy >= 1")
    signal.signal(signal.SIGTERM, _terminate)
    machine = machine_info()
    run_tag = secrets.token_hex(4)
    cmd = platform_command()
    workdir = Path(tempfile.mkdtemp(prefix=f"dp-outage-{run_tag}-"))
    gen = Generator("python", "bench/loadgen.py", rate=args.rate, extra_args=("--acked-event-ids",))
    backends: Backends | None = None
    proxied: Proxied | None = None
    try:
        backends = Backends.prepare(
            "real", workdir, args.database_url, args.redis_url, run_tag, dict(args.server_env)
        )
        train_s = train(
            cmd, backends.env, workdir, args.train_entities, args.train_days, args.train_timesteps
        )
        console.print(f"trained in {train_s:.1f} s; schema {backends.schema}; temp dir {workdir}")
        proxied = Proxied.open(args.database_url, args.redis_url)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        env = {
            **backends.env,
            "DP_DATABASE_URL": proxied.database_url,
            "DP_FEATURE_STORE_URL": proxied.redis_url,
            "DP_PORT": str(port),
        }
        results: list[dict[str, Any]] = []
        with running_server(cmd, env, workdir, port, 1) as server:
            wait_ready(server, base_url, workdir)
            if args.warmup:
                with console.status(f"warming up for {args.warmup} s"):
                    gen.run(
                        port,
                        "event",
                        args.concurrency,
                        args.warmup,
                        args.entities,
                        f"{run_tag}-w",
                        0,
                        workdir,
                    )
            for name, mode in PHASES:
                seconds = int(getattr(args, name))
                if seconds <= 0:
                    continue
                with console.status(f"{name}: {seconds} s at {args.rate:g} req/s, then the replay"):
                    result = run_phase(
                        name, mode, seconds, args, gen, proxied, backends, base_url, port, run_tag, workdir
                    )
                result["seconds"] = seconds
                results.append(result)
            if server.poll() is not None:
                raise SystemExit(f"the server exited during the run (code {server.returncode})")
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        options["server_env"] = dict(args.server_env)
        run: dict[str, Any] = {
            "bench": "outage",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "run_id": run_tag,
            "label": args.label,
            "options": options,
            "machine": machine,
            "train_s": round(train_s, 1),
            "results": results,
            "server_log": server_log_problems(workdir),
        }
        print_results(run)
        save_run(run, args)
        return 0
    finally:
        if proxied is not None:
            proxied.close()
        finish_run(backends, workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())
