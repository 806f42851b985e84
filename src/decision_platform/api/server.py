"""How the API is served: one uvicorn process, or N processes that each accept on their own socket.

Why not uvicorn's own ``--workers``: uvicorn binds one listening socket in the parent and every worker
accepts from it. A burst of new keep-alive connections (a load balancer's pool, a client's connection
pool) is then taken mostly by whichever process happens to wake first, and keep-alive pins the load
there: measured with 16 connections, one worker at 85% CPU and the other at 34%, two workers no faster
than one (bench/README.md). Here each worker binds its *own* listening socket to the same port with
``SO_REUSEPORT``, and the Linux kernel spreads new connections over the sockets by a hash of each
connection's addresses -- evenly, whatever each process is busy with.

The supervisor is small on purpose: start the workers, restart one that dies (a crash must not halve
capacity for good), stop them all on SIGINT / SIGTERM with uvicorn's graceful shutdown, and give up
when workers keep dying at start (a broken configuration should fail loudly, not restart forever).
Elsewhere than Linux (no ``SO_REUSEPORT`` balancing) uvicorn's shared-socket workers serve instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from decision_platform.observability.multiprocess import ENV_VAR as MULTIPROC_ENV_VAR

log = logging.getLogger(__name__)

#: The ASGI application, built in each worker process from its environment.
APP_FACTORY = "decision_platform.api.app:create_app"
#: Uvicorn's settings for every process: httptools for HTTP/1.1 parsing (measurably cheaper than h11).
UVICORN_OPTIONS = {"factory": True, "log_level": "warning", "http": "httptools"}
#: A worker that dies within this many seconds of its start counts as failing to start.
START_GRACE_S = 10.0
#: Consecutive failed starts after which the supervisor stops everything and exits non-zero.
MAX_FAILED_STARTS = 5
#: How long SIGTERM'd workers get to finish their requests (uvicorn drains) before SIGKILL.
STOP_TIMEOUT_S = 30.0


def reuseport_balances() -> bool:
    """True where SO_REUSEPORT spreads connections over the sockets that share a port (Linux >= 3.9)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bound_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``host:port``, optionally in a SO_REUSEPORT group, not listening yet.

    A worker's socket starts listening only when uvicorn serves on it, after the application's startup
    (models loaded, stores connected): the kernel hands connections only to listening sockets, so none
    waits in the queue of a worker that is still starting (or restarting).
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def ensure_port_free(host: str, port: int) -> None:
    """Raise OSError (address in use) when anything listens on the port already.

    SO_REUSEPORT would otherwise let the workers join the group of a *stale* server of the same user and
    share its traffic; a plain bind refuses whenever any socket holds the port.
    """
    bound_socket(host, port, reuse_port=False).close()


def serve_one_process(host: str, port: int) -> None:
    """Serve the API in this process (blocks until SIGINT / SIGTERM)."""
    import uvicorn

    uvicorn.run(APP_FACTORY, host=host, port=port, **UVICORN_OPTIONS)  # type: ignore[arg-type]


def _worker_main(host: str, port: int) -> None:
    """One worker process: its own SO_REUSEPORT socket, one uvicorn server on it (which listens once the
    application has started)."""
    import uvicorn

    sock = bound_socket(host, port, reuse_port=True)
    server = uvicorn.Server(uvicorn.Config(APP_FACTORY, **UVICORN_OPTIONS))  # type: ignore[arg-type]
    server.run(sockets=[sock])


@dataclass
class WorkerSupervisor:
    """Starts ``workers`` API processes on one port, restarts the ones that die, stops them together."""

    host: str
    port: int
    workers: int
    #: What each worker process runs, given host and port (a module-level function: spawn pickles it).
    target: Callable[[str, int], None] = _worker_main
    #: First wait before restarting a worker that failed to start; doubled per failure in a row, up to 5 s.
    backoff_s: float = 0.2
    _processes: list[BaseProcess] = field(default_factory=list)
    _started_at: dict[int, float] = field(default_factory=dict)
    _failed_starts: int = 0
    _stopping: bool = False

    def run(self) -> int:
        """Serve until SIGINT / SIGTERM (exit code 0), or until workers keep failing to start (1)."""
        ensure_port_free(self.host, self.port)
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for _ in range(self.workers):
                self._start_worker()
            log.info("serving on %s:%d with %d SO_REUSEPORT workers", self.host, self.port, self.workers)
            while not self._stopping:
                self._reap_and_restart(wait([p.sentinel for p in self._processes], timeout=0.5))
            return 0 if self._failed_starts < MAX_FAILED_STARTS else 1
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def _start_worker(self) -> None:
        # spawn, not fork: the parent may hold threads and locks, and each worker builds its own platform.
        process = multiprocessing.get_context("spawn").Process(
            target=self.target, args=(self.host, self.port), name="decision-platform-api", daemon=False
        )
        process.start()
        self._processes.append(process)
        self._started_at[process.pid or 0] = time.monotonic()

    def _reap_and_restart(self, ready: list[object]) -> None:
        for process in [p for p in self._processes if p.sentinel in ready]:
            process.join()
            self._processes.remove(process)
            pid = process.pid or 0
            _mark_metrics_dead(pid)
            lived = time.monotonic() - self._started_at.pop(pid, 0.0)
            self._failed_starts = self._failed_starts + 1 if lived < START_GRACE_S else 0
            if self._stopping:
                continue
            if self._failed_starts >= MAX_FAILED_STARTS:
                log.error("API workers keep dying at start (%d in a row): stopping", self._failed_starts)
                self._stopping = True
                return
            log.warning("API worker %d exited with %s after %.1f s: restarting", pid, process.exitcode, lived)
            time.sleep(min(self.backoff_s * 2**self._failed_starts, 5.0))  # back off while starts fail
            self._start_worker()

    def _stop_all(self) -> None:
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)  # uvicorn: stop accepting, finish requests, exit
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
            _mark_metrics_dead(process.pid or 0)
        self._processes.clear()


def _mark_metrics_dead(pid: int) -> None:
    """Drop a dead worker's live gauges from the merged /metrics (its counters stay: they happened)."""
    if os.environ.get(MULTIPROC_ENV_VAR) and pid:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve(host: str, port: int, workers: int) -> int:
    """Serve the API with ``workers`` processes; returns the exit code."""
    if workers <= 1:
        serve_one_process(host, port)
        return 0
    if not reuseport_balances():
        import uvicorn

        log.warning("no SO_REUSEPORT balancing on %s: uvicorn's shared-socket workers", sys.platform)
        uvicorn.run(APP_FACTORY, host=host, port=port, workers=workers, **UVICORN_OPTIONS)  # type: ignore[arg-type]
        return 0
    return WorkerSupervisor(host, port, workers).run()
