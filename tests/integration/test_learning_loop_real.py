"""The learning loop on the real backends: served through the HTTP API on PostgreSQL and Redis, retrained
by the CLI in the same way an operator would, picked up by the running server without a restart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from decision_platform.api.app import create_app
from decision_platform.cli import main as cli
from decision_platform.config import Settings
from decision_platform.serving.platform import Platform
from tests.conftest import PG_URL
from tests.integration.conftest import query
from tests.loop import register_allow_all_champion, serve_over_http

pytestmark = pytest.mark.integration


def test_outcomes_retrain_gate_promote_and_hot_reload_on_postgresql(
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
    pg_schema: str,
    redis_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Data collection: a poor champion (allows almost everything) with generous exploration.
    settings = make_settings(
        database_url=PG_URL,
        database_schema=pg_schema,
        feature_store_url=redis_db,
        exploration_floor=0.2,
        explore_actions=(0, 1, 2),
        model_refresh_s=0.2,
    )
    platform = start_platform(settings)
    poor = register_allow_all_champion(platform.registry)
    platform.reload_models()
    with TestClient(create_app(settings, platform)) as client:
        assert client.post("/decide", json={"entity_id": "x"}).json()["model_versions"]["policy"] == poor
        n = serve_over_http(client, platform.rewards)

        # An operator retrains from another process (here: the CLI in this one), judged as it would serve.
        production = settings.model_copy(
            update={"exploration_floor": 0.01, "explore_actions": (0, 1), "model_dir": settings.model_dir}
        )
        monkeypatch.setattr(cli, "get_settings", lambda: production)
        monkeypatch.setattr("decision_platform.cli.retrain.get_settings", lambda: production)
        learning = tmp_path / "config"
        learning.mkdir()
        for path in settings.config_dir.iterdir():
            if path.is_file():
                (learning / path.name).write_bytes(path.read_bytes())
        # The test's data is small: the gate's sample limits and the PPO budget scaled down with it.
        config = (learning / "learning.yaml").read_text()
        # (and the same split as tests/loop.py's: fraud comes in campaigns, both parts need some).
        for old, new in (
            ("min_decisions: 300", "min_decisions: 200"),
            ("ppo_timesteps: 20000", "ppo_timesteps: 2048"),
            ("holdout_fraction: 0.3", "holdout_fraction: 0.4"),
            ("max_fraud_allow_rate: 0.5", "max_fraud_allow_rate: 0.75"),  # as tests/loop.py says why
        ):
            assert old in config
            config = config.replace(old, new)
        (learning / "learning.yaml").write_text(config)
        production.config_dir = learning
        result = CliRunner().invoke(cli.app, ["retrain"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "Promotion gate" in result.output and "promoted" in result.output, result.output

        (champion,) = query(
            pg_schema, "SELECT version FROM models WHERE kind = 'policy' AND status = 'champion'"
        )
        assert champion[0] != poor, result.output
        report = json.loads(
            Path(
                next(
                    line.split("report: ")[1].split()[0]
                    for line in result.output.splitlines()
                    if "report: " in line
                )
            ).read_text()
        )
        assert report["data"]["decisions"] >= n and report["promoted"] is True
        # The running server picks the new champion up by itself (registry polling), no restart.
        deadline = time.monotonic() + 10
        version = poor
        while version != champion[0] and time.monotonic() < deadline:
            time.sleep(0.2)
            version = client.post("/decide", json={"entity_id": "after"}).json()["model_versions"]["policy"]
        assert version == champion[0]
