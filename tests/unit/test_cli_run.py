"""`decision-platform run` (what `make run` calls) reaches the HTTP server with real settings."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from decision_platform.cli import main as cli
from decision_platform.config import Settings, get_settings


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

    monkeypatch.setattr(cli, "_why_train_first", lambda settings: None)
    monkeypatch.setattr(uvicorn, "run", lambda target, **kwargs: served.update(target=target, **kwargs))
    result = CliRunner().invoke(cli.app, ["run"])
    assert result.exit_code == 0, result.output
    assert served["target"] == "decision_platform.api.app:create_app" and served.get("workers", 1) == 1
    assert "curl -s" in result.output  # how to call it
    assert os.environ["DP_LLM_URL"] == narrates_with


def test_run_trains_first_when_the_champions_cannot_be_served(monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[str] = []
    monkeypatch.setenv("DP_LLM_URL", "none")
    monkeypatch.setattr(cli, "_why_train_first", lambda settings: "The registered champions cannot be served")
    monkeypatch.setattr(cli, "_train", lambda settings, source, *args: trained.append(source.value))
    monkeypatch.setattr(uvicorn, "run", lambda target, **kwargs: None)
    result = CliRunner().invoke(cli.app, ["run"])
    assert result.exit_code == 0, result.output
    assert trained == ["synthetic"]
    assert "cannot be served: training on the built-in synthetic data set" in " ".join(result.output.split())


def test_why_train_first_names_a_champion_that_does_not_load(
    make_settings: Callable[..., Settings], trained: tuple[str, Path], tmp_path: Path
) -> None:
    """Servable champions: no reason; an altered artifact (or an older format): the kind and why; none
    registered: no models yet."""
    models = tmp_path / "models"
    shutil.copytree(trained[1], models)
    settings = make_settings(model_dir=models)
    assert cli._why_train_first(settings) is None

    risk_artifact = next(p for p in (models / "risk").rglob("*") if p.is_file())
    risk_artifact.write_bytes(risk_artifact.read_bytes() + b"x")
    why = cli._why_train_first(settings)
    assert why is not None and "risk:" in why and "CorruptArtifactError" in why
    assert "anomaly:" not in why and "policy:" not in why

    empty = make_settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    from decision_platform.storage.database import make_engine

    engine = make_engine(empty.database_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM models")
    engine.dispose()
    assert cli._why_train_first(empty) == "No models yet"


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("DP_PORT", "abc", "DP_PORT ('abc'): Input should be a valid integer"),
        ("DP_PORT", "70000", "DP_PORT ('70000'): Input should be less than or equal to 65535"),
        ("DP_SAFE_ACTION", "7", "DP_SAFE_ACTION ('7')"),
        ("DP_EXPLORE_ACTIONS", "0,1", "DP_EXPLORE_ACTIONS: not valid JSON; a list is written [0, 1]"),
        ("DP_EXPLORE_ACTIONS", "[0, 5]", "DP_EXPLORE_ACTIONS ('5'): Input should be 0, 1 or 2"),
        ("DP_WORKER_BATCH_SIZE", "0", "DP_WORKER_BATCH_SIZE ('0')"),
        ("DP_FEATURE_STORE_TIMEOUT_S", "-1", "DP_FEATURE_STORE_TIMEOUT_S ('-1')"),
        # Another scheme reached SQLAlchemy / the store at start: a traceback; a URL's password is not echoed.
        ("DP_DATABASE_URL", "mysql://u:secret@h/db", "DP_DATABASE_URL: Value error, expected sqlite:"),
        ("DP_FEATURE_STORE_URL", "garbage", "DP_FEATURE_STORE_URL: Value error, expected memory://"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, said: str
) -> None:
    """A DP_ variable that is not a value of its setting was a pydantic traceback (exit 1) from whichever
    command read the settings first; a worker batch of 0 or a negative timeout was taken."""
    monkeypatch.setenv(variable, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.app, ["models", "list"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"bad setting: {said}" or said in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "secret" not in result.output


#: The project's rewards.yaml with ``chargeback`` (which the simulator and the Bayes policy price) renamed.
RENAMED_CHARGEBACK = (
    (Path(cli.__file__).parents[3] / "config" / "rewards.yaml")
    .read_text()
    .replace("  chargeback:", "  dispute:")
)


def broken_config(tmp_path: Path, name: str, text: str | None) -> Path:
    """A copy of the project's config/ with ``name`` rewritten to ``text`` (None: removed)."""
    config_dir = tmp_path / "config"
    shutil.copytree(Path(cli.__file__).parents[3] / "config", config_dir)
    if text is None:
        (config_dir / name).unlink()
    else:
        (config_dir / name).write_text(text)
    return config_dir


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        ("rules.yaml", "rules: [", "rules.yaml: rules.yaml is not valid YAML at line 1, column 9"),
        (
            "rules.yaml",
            "rules:\n  - {name: x, tier: block, when: 'no_such > 1'}\n",
            "unknown names ['no_such']",
        ),
        ("rules.yaml", None, "rules.yaml: cannot read: No such file or directory"),
        ("features.yaml", "windows: {1m: -5}\n", "window '1m' must be a positive number of seconds"),
        ("features.yaml", "windows: {", "features.yaml: not valid YAML at line 1"),
        ("rewards.yaml", "outcomes:\n  success:\n    allow: {base: abc}\n", "outcomes.success.allow.base"),
        (
            "rewards.yaml",
            "outcomes: {success: {allow: {per_amount: .inf}}}",
            "per_amount: Input should be a finite",
        ),
        ("rewards.yaml", "outcomes: {success: {allow: {base: 1e300}}}", "base: Input should be less than or"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_broken_config_file_stops_serve_and_worker_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str, name: str, text: str | None, said: str
) -> None:
    """A broken rules.yaml / features.yaml / rewards.yaml was a traceback from the application's startup
    (uvicorn's exit 3; the worker's own traceback); an infinite or huge reward was taken (a reward of inf
    is no JSON answer for POST /outcome)."""
    config_dir = broken_config(tmp_path, name, text)
    settings = Settings(
        config_dir=config_dir, model_dir=tmp_path / "models", kafka_bootstrap_servers="127.0.0.1:1", port=0
    )
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("served a broken configuration"))
    result = CliRunner().invoke(cli.app, [command])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert output.startswith(f"bad configuration: {config_dir / name}:") and said in output, output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--entities", "0"],
        ["train", "--days", "nan"],
        ["train", "--days", "-1"],
        ["train", "--seed", "-1"],
        ["replay", "--to", "http", "--url", "http://127.0.0.1:9", "--concurrency", "0"],
        ["replay", "--to", "http", "--url", "http://127.0.0.1:9", "--limit", "-1"],
        ["replay", "--to", "http", "--url", "http://127.0.0.1:9", "--rate", "nan"],
        ["replay", "--to", "http", "--url", "http://127.0.0.1:9", "--outcomes", "--outcome-delay", "inf"],
        ["serve", "--workers", "0"],
        ["retrain", "--seed", "-3"],
    ],
)
def test_out_of_range_numbers_on_the_command_line_are_exit_2(args: list[str]) -> None:
    """--entities 0, --days nan / -1, --seed -1, --concurrency 0 were tracebacks from deep inside (exit 1);
    --limit -1 replayed all events but the last; an infinite --outcome-delay would wait forever."""
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{args[-2]}'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["train", "--days", "1e300"], "more than the 20,000,000 a synthetic data set may hold"),
        (["train", "--entities", "99999999999999"], "more than the 20,000,000 a synthetic data set may hold"),
        (["replay", "--to", "http", "--days", "1e300"], "more than the 20,000,000 a synthetic data set"),
        (["replay", "--to", "http", "--url", "http://[::1"], "Invalid port"),
        (["replay", "--to", "http", "--url", "ftp://host/"], "expected an http:// or https:// URL"),
    ],
)
def test_a_data_set_too_large_to_make_or_a_url_no_request_can_go_to_is_exit_2(
    args: list[str], said: str
) -> None:
    """``--days 1e300`` was numpy's "Maximum allowed dimension exceeded", ``--entities 99999999999999`` a
    MemoryError (``--days 1e6`` ran for hours); ``--url http://[::1`` httpx's InvalidURL -- tracebacks;
    ``--url ftp://host/`` failed every event one by one. Now one line naming the option, exit 2."""
    result = CliRunner().invoke(cli.app, args)
    unboxed = " ".join(result.output.replace("\u2502", " ").split())  # typer boxes it at 80 columns
    assert result.exit_code == 2 and said in unboxed and "Traceback" not in result.output, result.output


@pytest.mark.parametrize(
    ("command", "name", "text", "said"),
    [
        ("retrain", "learning.yaml", "gate: {min_decisions: abc}\n", "learning.yaml: gate.min_decisions"),
        # s32: loaded, then a timedelta OverflowError deep in retrain (.inf), or NaN rewards in the gate
        ("retrain", "learning.yaml", "outcomes: {horizon_hours: .inf}\n", "outcomes.horizon_hours"),
        ("retrain", "learning.yaml", "outcomes: {horizon_hours: 1e300}\n", "outcomes.horizon_hours"),
        ("retrain", "learning.yaml", "outcomes: {default_reward: .nan}\n", "outcomes.default_reward"),
        ("retrain", "learning.yaml", "outcomes: {default_reward: -1e300}\n", "outcomes.default_reward"),
        ("retrain", "learning.yaml", "gate: {min_improvement: .nan}\n", "gate.min_improvement"),
        ("retrain", "rewards.yaml", "outcomes: [", "rewards.yaml: not valid YAML at line 1"),
        ("train", "rewards.yaml", None, "rewards.yaml: cannot read: No such file or directory"),
        ("train", "features.yaml", "windows: {1m: -5}\n", "window '1m' must be a positive number of seconds"),
        # s33: an outcome the learning loop prices, renamed: a KeyError traceback from deep in either
        ("retrain", "rewards.yaml", RENAMED_CHARGEBACK, "chargeback.allow, chargeback.throttle"),
        ("train", "rewards.yaml", RENAMED_CHARGEBACK, "chargeback.allow, chargeback.throttle"),
    ],
)
def test_a_broken_config_file_stops_train_and_retrain_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str, name: str, text: str | None, said: str
) -> None:
    """A broken learning.yaml or rewards.yaml was a pydantic / YAML traceback from retrain and train (train
    only after loading and featurising the whole data set)."""
    config_dir = broken_config(tmp_path, name, text)
    settings = Settings(
        config_dir=config_dir, model_dir=tmp_path / "models", database_url=f"sqlite:///{tmp_path / 'dp.db'}"
    )
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    monkeypatch.setattr("decision_platform.cli.retrain.get_settings", lambda: settings)
    args = ["--entities", "30", "--days", "1", "--timesteps", "0"] if command == "train" else []
    result = CliRunner().invoke(cli.app, [command, *args])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert f"bad configuration: {config_dir / name}:" in output and said in output, output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("window", [["--until", "0001-01-01"], ["--since", "0001-01-01T00:00:00"]])
def test_retrain_over_a_window_from_the_first_year_says_what_it_found(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, window: list[str]
) -> None:
    """A naive --since / --until was taken for local time: year 1 was 'ValueError: year 0 is out of range'
    (a traceback) from the query's time bound. Now naive is UTC, as for every other command, and an empty
    window is said in one line (exit 2)."""
    settings = make_settings()
    monkeypatch.setattr("decision_platform.cli.retrain.get_settings", lambda: settings)
    result = CliRunner().invoke(cli.app, ["retrain", *window])
    assert result.exit_code == 2, result.output
    assert "0 logged decisions" in result.output and "Traceback" not in result.output


def test_train_into_a_model_dir_it_cannot_write_says_so_before_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DP_MODEL_DIR under a file (or on a read-only disk): train read the data and trained every model, then
    stopped with a NotADirectoryError traceback when registering the first artifact. Now it stops first."""
    (tmp_path / "file").write_text("not a directory")
    settings = Settings(
        model_dir=tmp_path / "file" / "models", database_url=f"sqlite:///{tmp_path / 'dp.db'}"
    )
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    monkeypatch.setattr(cli, "_synthetic", lambda *args: pytest.fail("the data was made before the check"))
    result = CliRunner().invoke(cli.app, ["train", "--entities", "30", "--days", "1", "--timesteps", "0"])
    assert result.exit_code == 2, result.output
    assert f"DP_MODEL_DIR: cannot write to {tmp_path / 'file' / 'models'}: Not a directory" in result.output
