"""A real Prometheus on this machine (Debian's package), for `make stack` and the observability tests.

It runs deploy/prometheus.yml and deploy/alerts.yml, the files docker compose uses, with only the scrape
targets changed (compose service names -> 127.0.0.1 ports), so what is tested is what is shipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from decision_platform.config import PROJECT_ROOT

DEPLOY_DIR = PROJECT_ROOT / "deploy"
DASHBOARDS_DIR = DEPLOY_DIR / "grafana" / "dashboards"
API_JOB, WORKER_JOB = "decision-api", "decision-worker"


def binaries() -> tuple[str, str] | None:
    """Paths of ``prometheus`` and ``promtool``; None when not installed (scripts/install-prometheus.sh)."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    return (prometheus, promtool) if prometheus and promtool else None


def local_config(
    out_dir: Path,
    api_targets: list[str],
    worker_targets: list[str],
    listen: str,
    interval: str | None = None,
) -> Path:
    """Write deploy/prometheus.yml pointed at local targets (and the alerts file beside it); returns it."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY_DIR / "prometheus.yml").read_text("utf-8"))
    if interval:
        config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    targets = {API_JOB: api_targets, WORKER_JOB: worker_targets, "prometheus": [listen]}
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    out_dir.mkdir(parents=True, exist_ok=True)
    for rules in config.get("rule_files", []):
        shutil.copyfile(DEPLOY_DIR / rules, out_dir / rules)
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def start(config: Path, listen: str, data_dir: Path, log_path: Path) -> subprocess.Popen:
    """Start Prometheus in its own session (so that it can be stopped as a group); see wait_ready."""
    found = binaries()
    if found is None:
        raise FileNotFoundError("prometheus is not installed (scripts/install-prometheus.sh)")
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [
                found[0],
                f"--config.file={config}",
                f"--storage.tsdb.path={data_dir}",
                f"--web.listen-address={listen}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"Prometheus at {url} not ready within {timeout_s} s")


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query; the result vector (raises on a PromQL error)."""
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    if body.get("status") != "success":
        raise ValueError(f"{expr}: {body.get('error', response.text)}")
    return body["data"]["result"]


def dashboard_queries(directory: Path = DASHBOARDS_DIR) -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL) of every panel query of the provisioned dashboards."""
    found = []
    for path in sorted(directory.glob("*.json")):
        dashboard = json.loads(path.read_text("utf-8"))
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                found.append((dashboard["uid"], panel["title"], target["expr"]))
    return found
