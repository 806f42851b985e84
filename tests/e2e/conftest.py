"""The fault-injection harness: the real API server in a subprocess, PostgreSQL and Redis behind switchable
TCP proxies, bounded load that records what the server acknowledged, and the check that every
acknowledged decision and outcome reached PostgreSQL.

A subprocess rather than TestClient because the faults are about processes: SIGKILL, a restart on the
same spool, threads blocked on a frozen socket, a liveness probe that must still answer. The proxies run
in the test process, in front of the machine's shared PostgreSQL and Redis, which are never touched
(own schema, Redis db 13).

Every wait is bounded: server start-up, each request (client timeout), the load threads' shutdown, and the
wait for the background replay. The server is killed at teardown whatever happened, and the tail of its
log is printed (pytest shows it when the test failed).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from decision_platform.config import Settings
from decision_platform.core.rewards import RewardTable
from decision_platform.devtools.tansu import free_port
from decision_platform.devtools.tcp_proxy import TcpProxy
from tests.conftest import CONFIG_DIR, PG_URL, REDIS_URL, service_unavailable
from tests.integration.conftest import pg_schema, query

__all__ = ["pg_schema"]  # re-exported fixture: a private PostgreSQL schema per test

#: Redis db of these tests (the other integration tests use 14, the benches 12).
REDIS_DB = 13
#: Start-up of the server: imports, models, migration check; generous for a loaded 2-core machine.
STARTUP_TIMEOUT_S = 90.0
#: How long the background replay may take to bring every acknowledged record into PostgreSQL.
DURABLE_TIMEOUT_S = 30.0
#: Client timeout of one request: an answer slower than this counts as "no answer".
REQUEST_TIMEOUT_S = 10.0

_PG = urlsplit(PG_URL)
_REDIS = urlsplit(REDIS_URL)
REWARDS = RewardTable.load(CONFIG_DIR / "rewards.yaml")

#: The server's DP_DB_WRITE_TIMEOUT_S: how long a stalled database may hold a batch before it is spooled.
DB_WRITE_TIMEOUT_S = 1.0


# ------------------------------------------------------------------------------------------- backends
@dataclass
class Backends:
    """A private schema holding the trained models' registry, and proxies in front of PG and Redis."""

    schema: str
    pg: TcpProxy
    redis: TcpProxy

    @property
    def database_url(self) -> str:
        """PostgreSQL as the server sees it: through the proxy."""
        return f"postgresql://{_PG.username or 'postgres'}@127.0.0.1:{self.pg.port}{_PG.path}"

    @property
    def feature_store_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/{REDIS_DB}"


def _flush_redis_db() -> None:
    client = redis.Redis(host=_REDIS.hostname, port=_REDIS.port or 6379, db=REDIS_DB, socket_timeout=3)
    with contextlib.closing(client):
        try:
            client.flushdb()
        except redis.ConnectionError:
            service_unavailable(f"Redis at {_REDIS.hostname}:{_REDIS.port}")


@pytest.fixture
def backends(pg_schema: str, make_settings: Callable[..., Settings]) -> Iterator[Backends]:
    """Migrated schema + champions (copied straight to PostgreSQL, not through the proxy), proxies up."""
    make_settings(database_url=PG_URL, database_schema=pg_schema)
    _flush_redis_db()
    with (
        TcpProxy((_PG.hostname or "127.0.0.1", _PG.port or 5432)) as pg,
        TcpProxy((_REDIS.hostname or "127.0.0.1", _REDIS.port or 6379)) as redis_proxy,
    ):
        yield Backends(pg_schema, pg, redis_proxy)
    _flush_redis_db()


# --------------------------------------------------------------------------------------------- server
class ServerFailedError(AssertionError):
    """The server exited or never served; the message carries the tail of its log."""


class ApiServer:
    """``decision-platform serve`` in its own process group, logging to a file.

    Its own session lets :meth:`kill` / :meth:`stop` signal exactly this server (and anything it forked)
    by the group id this harness created, nothing else.
    """

    def __init__(self, env: dict[str, str], workdir: Path, name: str) -> None:
        self.env = env
        self.workdir = workdir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> ApiServer:
        """Start and wait until ``/health`` answers (not ``/ready``: a degraded start must serve too)."""
        args = [sys.executable, "-m", "decision_platform.cli", "serve", "--host", "127.0.0.1"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*args, "--port", str(self.port)],
                env=self.env,
                cwd=self.workdir,  # no stray .env of the checkout is read
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerFailedError(self._failure(f"exited with code {self.process.returncode}"))
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return self
                time.sleep(0.2)
        raise ServerFailedError(self._failure(f"did not answer /health within {timeout_s:.0f} s"))

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing is flushed (the durability promise under test)."""
        self._signal(signal.SIGKILL)
        self._wait(10.0)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 15 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15.0)
        except subprocess.TimeoutExpired:
            self.kill()

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def _wait(self, timeout_s: float) -> None:
        if self.process is not None:
            self.process.wait(timeout=timeout_s)

    def tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _failure(self, what: str) -> str:
        return f"server {self.base_url} {what}; log {self.log_path}:\n{self.tail()}"


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies (even by SIGKILL), so that no
    server outlives an aborted run. Linux only; elsewhere teardown alone stops it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


def server_env(backends: Backends, model_dir: Path, spool_dir: Path, **overrides: str) -> dict[str, str]:
    """The server's environment: this process's minus every DP_ setting, plus the test's backends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DP_")}
    env.update(
        {
            "DP_DATABASE_URL": backends.database_url,
            "DP_DATABASE_SCHEMA": backends.schema,
            "DP_FEATURE_STORE_URL": backends.feature_store_url,
            "DP_MODEL_DIR": str(model_dir),
            "DP_SPOOL_DIR": str(spool_dir),
            "DP_CONFIG_DIR": str(CONFIG_DIR),
            "DP_POLICY_SEED": "0",
            # A stall is detected within this; 1 s (default 2) leaves the p99 bound a margin on a busy box.
            "DP_DB_WRITE_TIMEOUT_S": str(DB_WRITE_TIMEOUT_S),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


@pytest.fixture
def start_api(
    backends: Backends, trained: tuple[str, Path], tmp_path: Path
) -> Iterator[Callable[..., ApiServer]]:
    """Start API servers on the test's backends (same spool for all: a restart finds what was spooled).

    Teardown kills every server this test started and prints the tail of each log.
    """
    servers: list[ApiServer] = []

    def start(name: str = "api", **env_overrides: str) -> ApiServer:
        env = server_env(backends, trained[1], tmp_path / "spool", **env_overrides)
        server = ApiServer(env, tmp_path, f"{name}-{len(servers)}")
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()
        server.kill()  # no-op when stopped; a server that ignored SIGTERM is gone now
        print(f"--- {server.log_path} (last lines) ---\n{server.tail()}")


# ---------------------------------------------------------------------------------------- the ledger
@dataclass
class Answer:
    """One request and what came back (``status`` None: no answer within the client timeout, or an error)."""

    kind: str  # decide | outcome | get | health
    phase: str
    elapsed_s: float
    status: int | None
    retry_after: str | None = None
    body: Any = None
    error: str | None = None
    decision_id: int | None = None
    #: time.monotonic() when the request was sent: places slow answers within a fault.
    sent_at: float = 0.0


@dataclass(frozen=True)
class Acked:
    """A decision the server answered 200 for: it promised it is durable."""

    decision_id: int
    event_id: str
    action: int
    amount: float | None
    fallback: str | None
    phase: str


@dataclass
class Ledger:
    """Everything the clients saw, shared by the load threads and the test (thread-safe appends)."""

    phase: str = "before"
    answers: list[Answer] = field(default_factory=list)
    decisions: dict[int, Acked] = field(default_factory=dict)
    #: decision id -> (outcome, the reward rewards.yaml gives it): outcomes answered 200/201.
    outcomes: dict[int, tuple[str, float]] = field(default_factory=dict)
    #: event id -> every decision id a 200 answer gave for it (more than one: a retry got a new decision).
    ids_by_event: dict[str, set[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)

    def acknowledge(self, acked: Acked) -> None:
        with self._lock:
            self.decisions[acked.decision_id] = acked
            self.ids_by_event.setdefault(acked.event_id, set()).add(acked.decision_id)

    def acknowledge_outcome(self, decision_id: int, outcome: str, reward: float) -> None:
        with self._lock:
            self.outcomes[decision_id] = (outcome, reward)

    def of(self, kind: str, phase: str | None = None) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.kind == kind and (phase is None or a.phase == phase)]

    def violations(self) -> list[str]:
        """Answers the platform promises never to give, whatever the fault:

        a 5xx other than 503, a 503 without ``Retry-After``, a 404 for a decision it acknowledged, and
        two decisions for one event.
        """
        out: list[str] = []
        with self._lock:
            answers = list(self.answers)
            acked = set(self.decisions)
            retried = {e: ids for e, ids in self.ids_by_event.items() if len(ids) > 1}
        for a in answers:
            where = f"{a.kind} in phase {a.phase!r}"
            if a.status is not None and a.status >= 500 and a.status != 503:
                out.append(f"{a.status} from {where}: {a.body}")
            elif a.status == 503 and not a.retry_after:
                out.append(f"503 without Retry-After from {where}: {a.body}")
            elif a.status == 404 and a.decision_id in acked:
                out.append(f"404 from {where} for acknowledged decision {a.decision_id}")
        out.extend(f"event {e} acknowledged as several decisions {sorted(ids)}" for e, ids in retried.items())
        return out

    def unanswered(self, kind: str, phase: str | None = None) -> list[Answer]:
        return [a for a in self.of(kind, phase) if a.status is None]


def outcome_for(action: int) -> str:
    """An outcome that is plausible for any action (``success`` cannot follow a block)."""
    return "fraud" if action == 2 else "success"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values (a phase where nothing was answered)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ---------------------------------------------------------------------------------------- the client
class ApiClient:
    """The API's calls, each recorded in the ledger. Bodies are encoded here with ``json.dumps`` (ASCII
    escapes), so a test can send what a JSON parser accepts but a store cannot hold: "\\u0000", a lone
    "\\ud800", 2**70."""

    def __init__(self, base_url: str, ledger: Ledger, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.base_url = base_url
        self.ledger = ledger
        self._client = httpx.Client(base_url=base_url, timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(
        self, kind: str, method: str, path: str, body: Any = None, decision_id: int | None = None
    ) -> Answer:
        phase = self.ledger.phase
        content = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if body is not None else {}
        sent_at, start = time.monotonic(), time.perf_counter()
        try:
            response = self._client.request(method, path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            answer = Answer(kind, phase, time.perf_counter() - start, None, error=repr(exc))
        else:
            try:
                parsed = response.json()
            except ValueError:
                parsed = response.text[:500]
            answer = Answer(
                kind,
                phase,
                time.perf_counter() - start,
                response.status_code,
                response.headers.get("retry-after"),
                parsed,
            )
        answer.decision_id = decision_id
        answer.sent_at = sent_at
        self.ledger.add(answer)
        return answer

    def decide(self, body: dict[str, Any]) -> Answer:
        answer = self._call("decide", "POST", "/decide", body)
        if answer.status == 200:
            decision = answer.body
            answer.decision_id = int(decision["decision_id"])
            event = body.get("event") or {}
            self.ledger.acknowledge(
                Acked(
                    answer.decision_id,
                    str(event.get("event_id")),
                    int(decision["action"]),
                    event.get("amount"),
                    decision.get("fallback"),
                    answer.phase,
                )
            )
        return answer

    def outcome(self, acked: Acked) -> Answer:
        name = outcome_for(acked.action)
        body = {"decision_id": acked.decision_id, "outcome": name}
        answer = self._call("outcome", "POST", "/outcome", body, acked.decision_id)
        if answer.status in (200, 201):
            self.ledger.acknowledge_outcome(
                acked.decision_id, name, REWARDS.reward(name, acked.action, acked.amount)
            )
        return answer

    def get_decision(self, decision_id: int) -> Answer:
        return self._call("get", "GET", f"/decisions/{decision_id}", decision_id=decision_id)

    def health(self) -> Answer:
        return self._call("health", "GET", "/health")


def event_body(event_id: str, entity: int, amount: float = 25.0, **event: Any) -> dict[str, Any]:
    """A /decide request on one event (``event`` overrides or adds event fields)."""
    payload = {
        "event_id": event_id,
        "amount": amount,
        "event_type": "payment",
        "attributes": {"device_id": f"d-{entity % 97}"},
        **event,
    }
    return {"entity_id": f"e2e-{entity}", "event": payload}


# ------------------------------------------------------------------------------------- the load
class Load:
    """Open-loop /decide traffic: ``rate`` requests/s on a fixed schedule, whatever the answers, as real
    clients send them (a closed loop would stop sending while the server stalls and hide the stall).

    At most ``max_in_flight`` requests are open at once (bounded: a stalled server holds that many
    connections, the rest of the schedule waits). Every ``outcome_every``-th acknowledged decision gets its
    outcome posted at once, so outcomes land on decisions made during the fault too. Event ids are unique
    (``run_id``-n).
    """

    def __init__(
        self,
        base_url: str,
        ledger: Ledger,
        run_id: str,
        rate: float = 60.0,
        max_in_flight: int = 64,
        outcome_every: int = 4,
    ) -> None:
        self.base_url = base_url
        self.ledger = ledger
        self.run_id = run_id
        self.interval_s = 1.0 / rate
        self.outcome_every = outcome_every
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="load")
        self._local = threading.local()
        self._clients: list[ApiClient] = []
        self._acked = itertools.count(1)
        self._scheduler = threading.Thread(target=self._schedule, name="load-schedule", daemon=True)

    def __enter__(self) -> Load:
        self._scheduler.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sending: requests not sent yet are dropped, those in flight finish (client timeout)."""
        self._stop.set()
        self._scheduler.join(5.0)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for client in self._clients:
            client.close()

    def _schedule(self) -> None:
        first = time.monotonic()
        for n in itertools.count():
            if self._stop.wait(max(0.0, first + n * self.interval_s - time.monotonic())):
                return
            self._pool.submit(self._one, n)

    def _client(self) -> ApiClient:
        client = getattr(self._local, "client", None)
        if client is None:  # one keep-alive connection per pool thread
            client = self._local.client = ApiClient(self.base_url, self.ledger)
            self._clients.append(client)
        return client

    def _one(self, n: int) -> None:
        if self._stop.is_set():
            return
        client = self._client()
        answer = client.decide(event_body(f"{self.run_id}-{n}", n % 500))
        if (
            answer.status == 200
            and answer.decision_id is not None
            and next(self._acked) % self.outcome_every == 0
        ):
            client.outcome(self.ledger.decisions[answer.decision_id])


class Prober:
    """GET /health every ``interval_s`` on its own connection: what a liveness probe would see."""

    def __init__(
        self, base_url: str, ledger: Ledger, interval_s: float = 0.25, timeout_s: float = 3.0
    ) -> None:
        self._client = ApiClient(base_url, ledger, timeout_s)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10.0)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._client.health()


# ------------------------------------------------------------------------------------- durability
@dataclass
class Durability:
    """What PostgreSQL holds of what was acknowledged."""

    acknowledged: int
    missing: list[int]
    wrong_event: list[tuple[int, str, str | None]]
    duplicate_events: list[tuple[str, int]]
    outcomes_acknowledged: int
    missing_outcomes: list[int]
    wrong_outcomes: list[tuple[int, tuple[str, float], tuple[str, float]]]
    waited_s: float

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.wrong_event
            or self.duplicate_events
            or self.missing_outcomes
            or self.wrong_outcomes
        )

    def describe(self) -> str:
        return (
            f"after {self.waited_s:.1f} s: {len(self.missing)} of {self.acknowledged} acknowledged decisions "
            f"missing (first {self.missing[:5]}); {len(self.wrong_event)} stored with another event "
            f"{self.wrong_event[:3]}; event ids stored twice {self.duplicate_events[:5]}; "
            f"{len(self.missing_outcomes)} of {self.outcomes_acknowledged} acknowledged outcomes missing "
            f"(first {self.missing_outcomes[:5]}); wrong outcome/reward {self.wrong_outcomes[:3]}"
        )


def durability(schema: str, ledger: Ledger, waited_s: float = 0.0) -> Durability:
    """Compare the ledger with the database, read directly (not through the proxy)."""
    stored = dict(query(schema, "SELECT id, event_id FROM decisions"))
    duplicates = query(
        schema,
        "SELECT event_id, count(*) FROM decisions WHERE event_id IS NOT NULL "
        "GROUP BY event_id HAVING count(*) > 1",
    )
    outcomes = {
        row[0]: (row[1], float(row[2]))
        for row in query(schema, "SELECT decision_id, outcome, reward FROM outcomes")
    }
    acked = dict(ledger.decisions)
    acked_outcomes = dict(ledger.outcomes)
    wrong_outcomes = [
        (d, want, outcomes[d])
        for d, want in acked_outcomes.items()
        if d in outcomes
        and (outcomes[d][0] != want[0] or not math.isclose(outcomes[d][1], want[1], abs_tol=1e-6))
    ]
    return Durability(
        acknowledged=len(acked),
        missing=sorted(set(acked) - set(stored)),
        wrong_event=[
            (d, a.event_id, stored[d]) for d, a in acked.items() if d in stored and stored[d] != a.event_id
        ],
        duplicate_events=[(str(e), int(n)) for e, n in duplicates],
        outcomes_acknowledged=len(acked_outcomes),
        missing_outcomes=sorted(set(acked_outcomes) - set(outcomes)),
        wrong_outcomes=wrong_outcomes,
        waited_s=waited_s,
    )


def wait_durable(schema: str, ledger: Ledger, timeout_s: float = DURABLE_TIMEOUT_S) -> Durability:
    """Poll the database until every acknowledged record is there (or ``timeout_s``): the replay must
    happen in the background, so this sends the server nothing."""
    start = time.monotonic()
    while True:
        result = durability(schema, ledger, time.monotonic() - start)
        if result.ok or result.waited_s >= timeout_s:
            return result
        time.sleep(0.5)


class Findings:
    """Soft assertions: a fault test checks several promises, and a report of *all* that broke says more
    than the first one. ``verify()`` fails the test with every finding."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
        return ok

    def nothing_lost(self, schema: str, ledger: Ledger, timeout_s: float = DURABLE_TIMEOUT_S) -> Durability:
        """The promise of DESIGN.md §11, checked after a fault: every acknowledged decision and outcome is
        in PostgreSQL (once, under its own event) within ``timeout_s``, and no answer broke the contract."""
        result = wait_durable(schema, ledger, timeout_s)
        problems = ledger.violations()
        if self.expect(result.acknowledged > 0, "nothing was acknowledged: no load reached the server"):
            self.expect(result.ok, f"not durable: {result.describe()}")
        self.expect(not problems, f"{len(problems)} answers broke the contract, e.g. {problems[:4]}")
        return result

    def verify(self) -> None:
        assert not self.failures, f"{len(self.failures)} promise(s) broken:\n- " + "\n- ".join(self.failures)


@pytest.fixture
def findings() -> Iterator[Findings]:
    found = Findings()
    yield found
    if found.failures:  # shown by pytest when the test failed, e.g. on an exception before verify()
        print("findings so far:\n- " + "\n- ".join(found.failures))


def status_counts(answers: list[Answer]) -> Counter[int | None]:
    return Counter(a.status for a in answers)
