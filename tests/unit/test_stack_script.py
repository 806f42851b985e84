"""scripts/stack.py stop: it stops the processes it recorded, and never one that only reuses their pid.
(The whole stack is started and stopped for real in tests/integration/test_observability.py.)"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from decision_platform.config import PROJECT_ROOT


def load_stack_script(stack_dir: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("STACK_DIR", str(stack_dir))
    spec = importlib.util.spec_from_file_location("stack_script", PROJECT_ROOT / "scripts" / "stack.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)


def test_stop_stops_what_was_recorded_and_spares_a_reused_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = load_stack_script(tmp_path, monkeypatch)
    assert stack.stop() == 0
    assert "nothing to stop" in capsys.readouterr().out

    ours, stranger = sleeper(), sleeper()
    try:
        stack._record("api", ours, tmp_path / "api.log")
        # The pid of a process we started, now belonging to another one: its start time differs.
        stack._record("kafka", stranger, tmp_path / "kafka.log")
        entry = json.loads((stack.PIDS / "kafka.json").read_text())
        (stack.PIDS / "kafka.json").write_text(json.dumps({**entry, "start_time": "1"}))

        assert stack.stop() == 0
        assert ours.wait(timeout=10) is not None  # stopped
        assert stranger.poll() is None  # untouched
        out = capsys.readouterr().out
        assert "api         stopped" in out and "kafka       not running" in out
        assert not list(stack.PIDS.glob("*.json"))
    finally:
        for process in (ours, stranger):
            if process.poll() is None:
                process.kill()
            process.wait()
