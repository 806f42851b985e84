"""A local Redis Cluster for tests and benchmarks: N masters from the machine's ``redis-server``.

The feature store's cluster mode (``redis+cluster://``) must be exercised on a real cluster: slot
routing, MOVED answers and per-node script caches only exist there. Redis ships no cluster in one
process, so this starts ``redis-server --cluster-enabled yes`` N times on free 127.0.0.1 ports in a
private directory (nothing saved to disk), joins them with ``redis-cli --cluster create`` (no replicas)
and waits until every node reports ``cluster_state:ok``. Every wait is bounded; ``stop`` ends only the
processes started here.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LocalRedisCluster", "start_cluster"]


def _free_port() -> int:
    """A port free now, whose +10000 cluster-bus port is free too (Redis listens on both)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) for a Redis Cluster node")


@dataclass
class LocalRedisCluster:
    """A running local cluster: its nodes' ports, processes and directory."""

    ports: list[int]
    directory: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The feature store URL: every master as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def stop_node(self, index: int, timeout_s: float = 5.0) -> None:
        """Stop one master (an outage of the slots it serves)."""
        _stop(self.processes[index], timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop every node and delete the directory."""
        for process in self.processes:
            _stop(process, timeout_s)
        shutil.rmtree(self.directory, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


def start_cluster(
    masters: int = 3,
    *,
    redis_server: str = "redis-server",
    redis_cli: str = "redis-cli",
    timeout_s: float = 30.0,
) -> LocalRedisCluster:
    """Start ``masters`` nodes and join them into one cluster (all 16384 slots covered).

    Raises FileNotFoundError when the binaries are missing, RuntimeError when the cluster does not form
    within ``timeout_s`` (the nodes are stopped first).
    """
    server, cli = shutil.which(redis_server), shutil.which(redis_cli)
    if server is None or cli is None:
        raise FileNotFoundError(f"{redis_server} and {redis_cli} are needed for a local Redis Cluster")
    directory = Path(tempfile.mkdtemp(prefix="dp-redis-cluster-"))
    cluster = LocalRedisCluster(ports=[], directory=directory)
    deadline = time.monotonic() + timeout_s
    try:
        for _ in range(masters):
            port = _free_port()
            node_dir = directory / str(port)
            node_dir.mkdir()
            log = open(node_dir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the node
            options = {
                "port": str(port),
                "bind": "127.0.0.1",
                "dir": str(node_dir),
                "cluster-enabled": "yes",
                "cluster-config-file": "nodes.conf",
                "cluster-node-timeout": "2000",
                "save": "",  # nothing on disk: a test cluster starts empty
                "appendonly": "no",
                "protected-mode": "no",
            }
            args = [server, *(part for name, value in options.items() for part in (f"--{name}", value))]
            cluster.processes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
            cluster.ports.append(port)
        for port, process in zip(cluster.ports, cluster.processes, strict=True):
            _wait_listening(port, process, deadline)
        addresses = [f"127.0.0.1:{p}" for p in cluster.ports]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        for port in cluster.ports:
            _wait_cluster_ok(cli, port, deadline)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_listening(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited with code {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"redis-server on port {port} did not listen in time")


def _wait_cluster_ok(cli: str, port: int, deadline: float) -> None:
    """Each node must see every slot assigned and the state ok before clients may use it."""
    while time.monotonic() < deadline:
        info = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(port), "cluster", "info"],
            capture_output=True,
            text=True,
            timeout=max(0.5, deadline - time.monotonic()),
        ).stdout
        if "cluster_state:ok" in info:
            return
        time.sleep(0.05)
    raise RuntimeError(f"Redis Cluster node {port} did not reach cluster_state:ok in time")
