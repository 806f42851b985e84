"""`decision-platform run` (what `make run` calls) reaches the HTTP server with real settings."""

from __future__ import annotations

import os
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from decision_platform.cli import main as cli


@pytest.mark.parametrize(("given", "narrates_with"), [(None, "embedded://"), ("none", "none")])
def test_run_serves_with_uvicorn_when_models_exist(
    monkeypatch: pytest.MonkeyPatch, given: str | None, narrates_with: str
) -> None:
    """`make run` with DP_LLM_URL unset serves with the embedded LLM narrator (the server, started later,
    reads it from the environment); DP_LLM_URL=none keeps the template."""
    served: dict[str, Any] = {}
    monkeypatch.setenv("DP_LLM_URL", given or "")  # recorded, so that what `run` sets is undone
    if given is None:
        monkeypatch.delenv("DP_LLM_URL")
    monkeypatch.delenv("DP_HTTP_SERVER", raising=False)

    class Registry:
        def has_champions(self) -> bool:
            return True

    monkeypatch.setattr(cli, "open_registry", lambda settings: Registry())
    monkeypatch.setattr(uvicorn, "run", lambda target, **kwargs: served.update(target=target, **kwargs))
    result = CliRunner().invoke(cli.app, ["run"])
    assert result.exit_code == 0, result.output
    assert served["target"] == "decision_platform.api.app:create_app" and served["workers"] == 1
    assert "curl -s" in result.output  # how to call it
    assert os.environ["DP_LLM_URL"] == narrates_with
