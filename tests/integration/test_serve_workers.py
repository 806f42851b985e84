"""`serve --workers 2` on the real PostgreSQL and Redis: both processes take a share of a burst of keep-alive
connections (each has its own SO_REUSEPORT socket), a killed worker is replaced while the other keeps
answering, and SIGTERM stops the whole server cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from decision_platform.devtools.tansu import free_port
from tests.integration.conftest import process_env, schema_with_models

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/12"
CONNECTIONS = 32
REQUESTS_PER_CONNECTION = 5


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    multiproc_dir: Path
    log: Path


def worker_pids(supervisor: int) -> set[int]:
    """The supervisor's uvicorn workers (its children started by multiprocessing's spawn)."""
    found = subprocess.run(
        ["pgrep", "-P", str(supervisor), "-f", "spawn_main"], capture_output=True, text=True, check=False
    )
    return {int(pid) for pid in found.stdout.split()}


def listeners(port: int) -> int:
    """How many sockets listen on the port (each worker's, once its application has started)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                count += local.endswith(f":{port:04X}") and state == "0A"
    return count


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", headers={"connection": "close"}, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def server(trained: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with schema_with_models(trained, "dp_workers", REDIS_URL) as schema:
        yield from _serve(schema, trained[1], tmp_path_factory.mktemp("workers"))


def _serve(schema: str, model_dir: Path, root: Path) -> Iterator[Server]:
    port = free_port()
    env = process_env(schema, model_dir, REDIS_URL, root / "spool")
    env.update(DP_LLM_URL="none", PROMETHEUS_MULTIPROC_DIR=str(root / "metrics"))
    (root / "metrics").mkdir()
    log = root / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "decision_platform.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "2",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            return listeners(port) == 2 and healthy(url)

        wait_for(up, 120, f"the server ({log})")
        yield Server(process, url, port, root / "metrics", log)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def decisions_per_process(multiproc_dir: Path) -> dict[int, float]:
    counts = {}
    for path in multiproc_dir.glob("counter_*.db"):
        merged = MultiProcessCollector.merge([str(path)], accumulate=True)
        counts[int(path.stem.split("_")[1])] = sum(
            s.value
            for m in merged
            if m.name == "dp_decisions"
            for s in m.samples
            if s.name.endswith("_total")
        )
    return counts


def test_a_burst_of_keep_alive_connections_is_shared_by_both_workers(server: Server) -> None:
    """32 connections opened at once, each kept alive for its requests: every worker must take a fair share
    (each has its own socket; the kernel spreads new connections over them by a hash of their addresses).
    Under saturation a shared socket did not (bench/README.md); here the point is that none idles."""
    before = decisions_per_process(server.multiproc_dir)
    barrier = threading.Barrier(CONNECTIONS)
    errors: list[str] = []

    def connection(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            barrier.wait()
            for i in range(REQUESTS_PER_CONNECTION):
                event = {"event_id": f"c{n}-{i}", "amount": 20.0 + i}
                answer = client.post("/decide", json={"entity_id": f"w{n}", "event": event})
                if answer.status_code != 200:
                    errors.append(f"{answer.status_code} {answer.text[:200]}")

    threads = [threading.Thread(target=connection, args=(n,)) for n in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    after = decisions_per_process(server.multiproc_dir)
    shares = {pid: after.get(pid, 0) - before.get(pid, 0) for pid in worker_pids(server.process.pid)}
    assert sum(shares.values()) == CONNECTIONS * REQUESTS_PER_CONNECTION, shares
    # Each connection's requests go to one process; a fair hash gives each process 16 +- 3 of 32.
    # Fewer than 4 of 32 on one side has a chance of ~2e-5 under an even spread.
    assert min(shares.values()) >= 4 * REQUESTS_PER_CONNECTION, shares


def test_a_killed_worker_is_replaced_while_the_other_answers(server: Server) -> None:
    first = worker_pids(server.process.pid)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    answered = sum(healthy(server.url) for _ in range(10))  # the survivor answers meanwhile
    assert answered >= 8, f"{answered} of 10 health checks answered during the restart"
    wait_for(lambda: len(worker_pids(server.process.pid) - {victim}) == 2, 90, "a replacement worker")
    wait_for(lambda: listeners(server.port) == 2, 90, "the replacement listening")
    assert all(healthy(server.url) for _ in range(8))
    assert "restarting" in server.log.read_text()


def test_sigterm_stops_the_server_and_its_workers(server: Server) -> None:
    workers = worker_pids(server.process.pid)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not healthy(server.url)
