"""The API's process supervisor (api/server.py): a port already taken, workers that die at start, SIGTERM.

The real thing -- two uvicorn workers on real backends sharing the load -- is
tests/integration/test_serve_workers.py; these use stand-in worker functions to check the supervisor's
own promises quickly.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from decision_platform.api.server import WorkerSupervisor, bound_socket, ensure_port_free
from decision_platform.cli.main import app
from decision_platform.config import get_settings
from decision_platform.devtools.tansu import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT groups: Linux")


def die_at_start(host: str, port: int) -> None:
    sys.exit(3)


def listen_and_record(host: str, port: int) -> None:
    """A worker that binds into the port's SO_REUSEPORT group, leaves its pid in a file, waits for SIGTERM."""
    sock = bound_socket(host, port, reuse_port=True)
    Path(os.environ["SUPERVISOR_TEST_DIR"], str(os.getpid())).touch()
    time.sleep(600)  # until SIGTERM ends it
    sock.close()


def test_a_port_in_use_is_named_before_any_worker_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            ensure_port_free("127.0.0.1", port)
        monkeypatch.setenv("DP_HOST", "127.0.0.1")
        monkeypatch.setenv("DP_PORT", str(port))
        get_settings.cache_clear()  # serve reads (and sets) the process-wide settings
        try:
            result = CliRunner().invoke(app, ["serve", "--workers", "1"])
        finally:
            get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output


def test_workers_that_keep_dying_at_start_stop_the_supervisor() -> None:
    supervisor = WorkerSupervisor("127.0.0.1", free_port(), 2, target=die_at_start, backoff_s=0.01)
    started = time.monotonic()
    assert supervisor.run() == 1  # non-zero: a process manager sees the failure, no endless restarts
    assert time.monotonic() - started < 60


def test_sigterm_stops_every_worker_and_exits_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERVISOR_TEST_DIR", str(tmp_path))
    port = free_port()
    supervisor = WorkerSupervisor("127.0.0.1", port, 2, target=listen_and_record)

    # Once both workers listen, SIGTERM this process, as a process manager would the supervisor.
    def stop_when_listening() -> None:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_listening, daemon=True).start()
    assert supervisor.run() == 0
    pids = [int(p.name) for p in tmp_path.iterdir()]
    assert len(pids) == 2
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    ensure_port_free("127.0.0.1", port)  # nothing listens any more
