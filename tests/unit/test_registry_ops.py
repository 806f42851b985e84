"""Registry operations (rollback, shadow, promoting a shadow), the shadow policy at serving, hot reload."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.models.baseline_policy import load_policy
from decision_platform.models.bundle import load_champions
from decision_platform.models.registry import (
    InvalidOperationError,
    ModelRegistry,
    RegistryConflictError,
    UnknownVersionError,
)
from decision_platform.observability import metrics
from decision_platform.serving.engine import DecisionRequest
from decision_platform.serving.platform import Platform
from decision_platform.storage.database import make_engine
from decision_platform.storage.errors import DatabaseUnavailable
from decision_platform.storage.repository import Repository
from tests.model_helpers import corrupt, register_policy

ALLOW, THROTTLE, BLOCK = 0, 1, 2
StartPlatform = Callable[[Settings], Platform]


def _requests(n: int, prefix: str) -> list[DecisionRequest]:
    """Events of a few entities, one of them allow-listed (a cap rule: block not allowed)."""
    entities = ["r1", "r2", "r3", "internal-monitoring"]
    requests = []
    for i in range(n):
        entity = entities[i % len(entities)]
        amount = 9000.0 if i % 5 == 0 else 20.0 + i  # some large amounts: a floor rule
        event = Event(event_id=f"{prefix}-{i}", entity_id=entity, amount=amount, event_type="payment")
        requests.append(DecisionRequest(entity, event))
    return requests


def _status(registry: ModelRegistry, version: str) -> str:
    record = registry.repository.get_model(version)
    assert record is not None
    return record["status"]


def test_rollback_restores_the_previous_champion_and_decisions_carry_it(
    make_settings: Callable[..., Settings], start_platform: StartPlatform
) -> None:
    platform = start_platform(make_settings())
    registry = platform.registry
    original = platform.models.versions["policy"]
    blocker = register_policy(registry, BLOCK)
    registry.promote(blocker)
    assert platform.reload_models().versions["policy"] == blocker
    assert platform.engine.decide("rb1").record.model_versions["policy"] == blocker
    assert _status(registry, original) == "retired"

    assert registry.rollback("policy") == {"policy": (blocker, original)}
    result = platform.reload_models()
    assert result.applied and result.versions["policy"] == original
    assert platform.engine.decide("rb1").record.model_versions["policy"] == original
    rolled_back = registry.repository.get_model(blocker)
    assert rolled_back is not None
    assert rolled_back["status"] == "retired" and rolled_back["promoted_at"] is None  # promotion undone

    with pytest.raises(RegistryConflictError, match="nothing to roll back to for policy"):
        registry.rollback("policy")
    with pytest.raises(RegistryConflictError, match="anomaly, risk, policy"):
        registry.rollback()  # all kinds together or none
    assert registry.champion("policy")["version"] == original  # type: ignore[index]
    with pytest.raises(InvalidOperationError, match="unknown model kind"):
        registry.rollback("ranking")


def test_rollbacks_step_back_through_history_instead_of_toggling(
    make_settings: Callable[..., Settings], start_platform: StartPlatform
) -> None:
    registry = start_platform(make_settings()).registry
    first = registry.champion("policy")["version"]  # type: ignore[index]
    second, third = register_policy(registry, ALLOW), register_policy(registry, BLOCK)
    registry.promote(second)
    registry.promote(third)
    assert registry.rollback("policy")["policy"] == (third, second)
    assert registry.rollback("policy")["policy"] == (second, first)
    with pytest.raises(RegistryConflictError):
        registry.rollback("policy")
    registry.promote(third)  # promoting explicitly is always possible
    assert registry.rollback("policy")["policy"] == (third, first)


def test_shadow_rules(make_settings: Callable[..., Settings], start_platform: StartPlatform) -> None:
    platform = start_platform(make_settings())
    registry = platform.registry
    with pytest.raises(InvalidOperationError, match="only policy models can shadow"):
        registry.shadow(platform.models.versions["anomaly"])
    with pytest.raises(RegistryConflictError, match="champion cannot also be the shadow"):
        registry.shadow(platform.models.versions["policy"])
    with pytest.raises(UnknownVersionError, match="no model version"):
        registry.shadow("policy-nope")

    first, second = register_policy(registry, BLOCK), register_policy(registry, ALLOW)
    assert registry.shadow(first) is None
    assert registry.shadow(second) == first  # one shadow per kind
    assert (_status(registry, first), _status(registry, second)) == ("challenger", "shadow")

    registry.promote(second)  # the shadow becomes the champion: no shadow left
    assert _status(registry, second) == "champion" and registry.shadow_record() is None
    assert registry.unshadow() is None

    registry.shadow(first)
    assert registry.unshadow() == first and _status(registry, first) == "challenger"


def test_shadow_decisions_are_logged_and_never_change_the_applied_decision(
    make_settings: Callable[..., Settings], start_platform: StartPlatform
) -> None:
    requests = _requests(24, "sh")
    plain = start_platform(make_settings()).engine.decide_batch(requests)

    platform = start_platform(make_settings())
    shadow = register_policy(platform.registry, BLOCK)
    platform.registry.shadow(shadow)
    assert platform.reload_models().shadow == {"policy": shadow}
    calls: list[int] = []
    policy = platform.engine.models.shadow_policy
    assert policy is not None
    original = policy.probabilities
    policy.probabilities = lambda states: calls.append(len(states)) or original(states)  # type: ignore[method-assign]
    before = {a: metrics.SHADOW_DECISIONS.labels(agrees=a)._value.get() for a in ("true", "false")}

    shadowed = platform.engine.decide_batch(requests)

    assert calls == [len(requests)]  # vectorised: one call for the batch
    for without, with_shadow in zip(plain, shadowed, strict=True):
        a, b = without.record, with_shadow.record
        # Same seed, same events: the shadow changes nothing of what is applied.
        for field in (
            "action",
            "propensity",
            "probabilities",
            "proposed_action",
            "action_mask",
            "decided_by",
        ):
            assert getattr(a, field) == getattr(b, field), field
        assert a.shadow is None
        record = b.shadow
        assert record["version"] == shadow and record["version"] != b.model_versions["policy"]
        mask = b.action_mask
        assert mask[record["action"]], "the shadow's choice respects the rules"
        probabilities = np.array(record["probabilities"])
        assert probabilities.sum() == pytest.approx(1.0)
        assert all(p == 0.0 for p, allowed in zip(probabilities, mask, strict=True) if not allowed)
        # An always-block policy blocks wherever the rules allow it, else takes the nearest allowed action.
        assert record["action"] == (BLOCK if mask[BLOCK] else THROTTLE)
        stored = platform.repository.get_decision(b.id)
        assert stored is not None and stored.shadow == record
    assert any(not d.record.action_mask[BLOCK] for d in shadowed)  # the allow-listed entity was there
    moved = sum(metrics.SHADOW_DECISIONS.labels(agrees=a)._value.get() - before[a] for a in before)
    assert moved == len(requests)


def test_a_fallback_decision_logs_no_shadow(
    make_settings: Callable[..., Settings], start_platform: StartPlatform
) -> None:
    platform = start_platform(make_settings(feature_store_url="redis://127.0.0.1:1/0"))
    platform.registry.shadow(register_policy(platform.registry, BLOCK))
    platform.reload_models()
    row = platform.engine.decide("fb1").record
    assert row.fallback == "feature_store_unavailable" and row.shadow is None


def test_a_corrupt_shadow_is_left_out_and_serving_goes_on(
    make_settings: Callable[..., Settings], start_platform: StartPlatform
) -> None:
    settings = make_settings()
    engine = make_engine(settings.database_url)
    registry = ModelRegistry(Repository(engine), settings.model_dir)
    shadow = register_policy(registry, BLOCK)
    registry.shadow(shadow)
    corrupt(registry, shadow)
    engine.dispose()
    errors = metrics.SHADOW_ERRORS.labels(stage="load")._value.get()

    platform = start_platform(settings)
    assert platform.models.complete and platform.models.shadow_policy is None
    assert "hash" in (platform.models.shadow_error or "")
    assert metrics.SHADOW_ERRORS.labels(stage="load")._value.get() == errors + 1
    row = platform.engine.decide("cs1").record
    assert row.fallback is None and row.shadow is None


def test_a_reload_keeps_the_current_set_when_a_new_champion_cannot_be_loaded(
    make_settings: Callable[..., Settings], start_platform: StartPlatform
) -> None:
    platform = start_platform(make_settings())
    serving = platform.models.versions["policy"]
    broken = register_policy(platform.registry, BLOCK)
    corrupt(platform.registry, broken)
    with pytest.raises(Exception, match="hash"):
        platform.registry.promote(broken)  # refused before anything changes
    platform.registry.promote(broken, verify=False)
    result = platform.reload_models()
    assert not result.applied and "cannot all be loaded" in (result.reason or "")
    assert result.versions["policy"] == serving
    row = platform.engine.decide("kc1").record
    assert row.fallback is None and row.model_versions["policy"] == serving
    assert platform.refresh_models() is None  # a failed attempt is not retried until the registry changes


def test_a_champion_that_scores_nan_is_never_served(
    make_settings: Callable[..., Settings], start_platform: StartPlatform
) -> None:
    """A policy whose weights were NaN when registered: its hash matches, so promote() took it, a hot
    reload served it, and every decision raised in the sampler (/decide 500, the stream worker retrying
    its batch forever). Now the reload refuses it and the current set keeps serving; and should scores
    ever come out NaN anyway, those rows fall back (rules + the safe action), counted, never a 500."""
    platform = start_platform(make_settings())
    serving = platform.models.versions["policy"]
    broken = register_policy(platform.registry, ALLOW, nan=True)
    platform.registry.promote(broken)
    refused = metrics.MODEL_RELOADS.labels(result="refused")._value.get()
    result = platform.reload_models()
    assert not result.applied and "probabilities" in result.errors["policy"]
    assert metrics.MODEL_RELOADS.labels(result="refused")._value.get() == refused + 1
    row = platform.engine.decide("nan1").record
    assert row.fallback is None and row.model_versions["policy"] == serving

    # The engine's own guard, for scores that come out NaN some other way (an overflow on odd inputs).
    source = platform.registry.verified_path(platform.registry.record(broken))
    nan_models = replace(platform.engine.models, policy=load_policy(source))
    platform.engine.swap_models(nan_models, platform.engine.reasons)
    fallbacks = metrics.FALLBACKS.labels(reason="invalid_scores")._value.get()
    for n in (1, 8):  # row by row, and batched
        records = [d.record for d in platform.engine.decide_batch(_requests(n, f"nan-{n}"))]
        assert {r.fallback for r in records} == {"invalid_scores"}
        assert all(r.decided_by == "fallback" and r.probabilities is None for r in records)
    assert metrics.FALLBACKS.labels(reason="invalid_scores")._value.get() == fallbacks + 9


def test_decisions_in_flight_finish_with_the_set_they_started_with(
    make_settings: Callable[..., Settings], start_platform: StartPlatform
) -> None:
    platform = start_platform(make_settings())
    old = platform.models.versions["policy"]
    platform.registry.promote(register_policy(platform.registry, ALLOW))
    policy = platform.engine.models.policy
    assert policy is not None
    original = policy.probabilities

    def reload_midway(states: np.ndarray) -> np.ndarray:
        platform.reload_models()  # a promotion lands while this batch is being scored
        return original(states)

    policy.probabilities = reload_midway  # type: ignore[method-assign]
    decisions = platform.engine.decide_batch(_requests(3, "fl"))
    assert {d.record.model_versions["policy"] for d in decisions} == {old}
    assert platform.engine.decide("fl").record.model_versions["policy"] != old


def test_a_promotion_from_another_process_reaches_a_running_platform(
    make_settings: Callable[..., Settings], start_platform: StartPlatform
) -> None:
    settings = make_settings(model_refresh_s=0.05)
    platform = start_platform(settings)
    assert platform.start_model_refresh() and not platform.start_model_refresh()
    # Another process (the CLI): its own connection to the same database.
    engine = make_engine(settings.database_url)
    cli_registry = ModelRegistry(Repository(engine), settings.model_dir)
    new = register_policy(cli_registry, THROTTLE)
    cli_registry.promote(new)
    shadow = register_policy(cli_registry, BLOCK)
    cli_registry.shadow(shadow)
    engine.dispose()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and platform.engine.models.shadow_version != shadow:
        time.sleep(0.02)
    assert platform.engine.models.versions["policy"] == new
    assert platform.engine.models.shadow_version == shadow
    assert platform.models is platform.engine.models
    row = platform.engine.decide("rf1").record
    assert row.model_versions["policy"] == new and row.shadow["version"] == shadow
    platform.close()
    assert platform.refresher is None


def test_models_commands(
    make_settings: Callable[..., Settings], start_platform: StartPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from decision_platform.cli import main as cli
    from decision_platform.cli import models as models_commands

    settings = make_settings()
    platform = start_platform(settings)
    monkeypatch.setattr(models_commands, "get_settings", lambda: settings)
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli.app, ["models", *args], terminal_width=200)
        return result.exit_code, result.output

    shadow = register_policy(platform.registry, BLOCK)
    assert run("shadow", platform.models.versions["anomaly"]) == (
        1,
        f"only policy models can shadow; {platform.models.versions['anomaly']} is of kind anomaly\n",
    )
    code, out = run("shadow", shadow)
    assert code == 0 and f"{shadow} is now the shadow policy" in out
    code, out = run("list", "--kind", "policy")
    assert code == 0 and "shadow" in out and "champion" in out
    with platform.repository.engine.begin() as connection:  # a registry row a hand edit left
        connection.exec_driver_sql(
            f"UPDATE models SET metrics = '[]', data_window = 'null' WHERE version = '{shadow}'"
        )
    code, out = run("list", "--kind", "policy")
    assert (
        code == 0 and shadow in out
    )  # it failed with AttributeError: 'list' object has no attribute 'items'

    assert run("compare")[1].startswith("no logged decisions with a shadow policy")
    platform.reload_models()
    decisions = platform.engine.decide_batch(_requests(12, "cli"))
    for i, decision in enumerate(decisions):
        platform.repository.record_outcome(decision.record.id, "success", 1.0 if i % 3 else -5.0)
    code, out = run("compare", "--limit", "100", "--since", "2000-01-01")
    assert code == 0, out
    assert f"shadow {shadow}" in out and "12 decisions, agreement" in out
    assert "champion \\ shadow" in out and "DR - on-policy" in out
    assert run("compare", "--since", "yesterday")[0] == 2

    code, out = run("unshadow")
    assert code == 0 and f"{shadow} is no longer the shadow" in out
    code, out = run("rollback", "--kind", "policy")
    assert code == 1 and "nothing to roll back to for policy" in out
    new = register_policy(platform.registry, ALLOW)
    assert run("promote", new)[0] == 0
    code, out = run("rollback")
    assert code == 1 and "nothing to roll back to for anomaly, risk" in out
    code, out = run("rollback", "--kind", "policy")
    assert code == 0 and f"policy: {new} -> " in out


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["promote", "policy-\udcff"], "not a model version: 'policy-\\udcff'"),  # argv not UTF-8
        (["shadow", "a" * 65], "not a model version"),
        (["list", "--kind", "rsik"], "'rsik': expected anomaly, risk or policy"),
        (["rollback", "--kind", "rsik"], "'rsik': expected anomaly, risk or policy"),
        (["compare", "--since", "0001-01-01T00:00:00+01:00"], "out of the range of dates"),
        (["compare", "--limit", "99999999999999999999"], "9223372036854775807"),
    ],
)
def test_models_commands_refuse_what_no_registry_holds_in_one_line(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, args: list[str], said: str
) -> None:
    """A version argv could not decode (UnicodeEncodeError from the driver), a --since that leaves the
    range of dates once in UTC or a --limit beyond SQLite's integers (OverflowError) were tracebacks; a
    misspelt --kind listed nothing (list) or was a registry refusal (rollback, exit 1). Now exit 2, one
    line naming the option, before the registry is touched."""
    from typer.testing import CliRunner

    from decision_platform.cli import main as cli
    from decision_platform.cli import models as models_commands

    settings = make_settings()
    monkeypatch.setattr(models_commands, "get_settings", lambda: settings)
    result = CliRunner().invoke(cli.app, ["models", *args], terminal_width=200)
    assert result.exit_code == 2, result.output
    said_in_box = " ".join(result.output.replace("\u2502", " ").split())  # typer's box wraps long lines
    assert said in said_in_box and "Traceback" not in result.output, result.output


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[:40],  # cut short
        lambda text: "[{}]",  # JSON, but records without what serving reads (a KeyError stopped the start)
        lambda text: text.replace('"artifact_sha256"', '"sha"', 1),
    ],
    ids=["cut short", "empty record", "a record without its hash"],
)
def test_a_damaged_serving_cache_during_an_outage_serves_fallbacks_instead_of_crashing(
    trained: tuple[str, Path], tmp_path: Path, damage: Callable[[str], str]
) -> None:
    """A start while the database is down reads the champions from the serving cache. A cache that is
    damaged (cut short by a power cut, zeroed by a bad disk) raised its JSON error out of the platform's
    start: the server could not start while the database was down, and a supervisor restarted it into the
    same traceback. Now it starts as without a cache: fallbacks, until the registry answers."""
    db_url, model_dir = trained
    cache = tmp_path / "serving.json"
    up = ModelRegistry(Repository(make_engine(db_url)), model_dir, cache)
    assert load_champions(up).complete and cache.is_file()  # the cache is written on every read
    cache.write_text(damage(cache.read_text("utf-8")), "utf-8")
    down = ModelRegistry(Repository(make_engine("postgresql://postgres@127.0.0.1:1/none")), model_dir, cache)
    loaded = load_champions(down)
    assert not loaded.complete
    assert all(error.startswith("registry unavailable") for error in loaded.errors.values()), loaded.errors


def test_a_frozen_database_holds_the_model_refresher_no_longer_than_a_read(
    make_settings: Callable[..., Settings], start_platform: StartPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresher's poll had no deadline: a frozen PostgreSQL held it for the whole freeze. Now it is
    bounded as a request's read is (DP_DB_READ_TIMEOUT_S), then fails at once while the database is down."""
    platform = start_platform(make_settings(db_read_timeout_s=0.3, db_probe_interval_s=60))
    thawed = threading.Event()
    serving_state = platform.registry.serving_state

    def frozen() -> frozenset[tuple[str, str, str]]:
        thawed.wait(10)
        return serving_state()

    monkeypatch.setattr(platform.registry, "serving_state", frozen)
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            platform.refresh_models()
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            platform.refresh_models()
        assert time.monotonic() - started < 0.1
    finally:
        thawed.set()


def test_a_model_row_whose_time_sqlite_cannot_read_neither_stops_serving_nor_the_listings(
    make_settings: Callable[..., Settings], start_platform: StartPlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry row on SQLite whose created_at / promoted_at a hand edit left as text no time reads from
    ('yesterday', '12/07/2026'): the driver's ValueError stopped the server's start ("Application startup
    failed"), and `models list`, GET /admin/models and the console's models page failed with it. Such a
    time now reads as unknown: the champion serves, the listings show the row without it."""
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from decision_platform.api.app import create_app
    from decision_platform.cli import main as cli
    from decision_platform.cli import models as models_commands

    settings = make_settings(api_key="k", model_refresh_s=0)
    engine = make_engine(settings.database_url)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE models SET created_at = 'yesterday', promoted_at = '12/07/2026' WHERE kind = 'risk'"
        )
    engine.dispose()
    platform = start_platform(settings)
    assert platform.models.complete
    with TestClient(create_app(settings, platform)) as client:
        decided = client.post("/decide", json={"entity_id": "t1"})
        assert decided.status_code == 200 and decided.json()["fallback"] is None
        listed = client.get("/admin/models", headers={"X-API-Key": "k"})
        assert listed.status_code == 200, listed.text
        risk = next(m for m in listed.json()["models"] if m["kind"] == "risk")
        assert risk["created_at"] is None and risk["promoted_at"] is None
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/console/login").text)
        assert csrf is not None  # the console's password is DP_API_KEY here
        client.post("/console/login", data={"csrf": csrf.group(1), "password": "k"})
        page = client.get("/console/models", follow_redirects=False)
        assert page.status_code == 200 and platform.models.versions["risk"] in page.text
    monkeypatch.setattr(models_commands, "get_settings", lambda: settings)
    result = CliRunner().invoke(cli.app, ["models", "list"], terminal_width=200)
    assert result.exit_code == 0 and "│ risk " in result.output and "│ ?" in result.output, result.output


def test_the_same_artifact_registered_twice_in_one_second_is_one_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two retrains at once (cron on two hosts, an operator's second run) whose candidate is the same
    baseline write the same files in the same second: the same version. The second rename met the first's
    directory and the retrain ended in a traceback after all its work (or an IntegrityError on the row)."""
    from datetime import UTC, datetime

    import decision_platform.models.registry as registry_module
    from decision_platform.storage.database import migrate

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
            return datetime(2026, 12, 8, 1, 2, 3, tzinfo=UTC)

    monkeypatch.setattr(registry_module, "datetime", Frozen)
    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    migrate(engine)
    registry = ModelRegistry(Repository(engine), tmp_path / "models")

    def write(directory: Path) -> None:
        (directory / "policy.json").write_text('{"kind": "thresholds"}')

    first = registry.register("policy", write, {}, {})
    assert registry.register("policy", write, {}, {}, status="champion") == first
    assert [m["version"] for m in registry.repository.list_models()] == [first]
    assert _status(registry, first) == "champion"
    assert [p.name for p in (tmp_path / "models" / "policy").iterdir()] == [first]  # no staging left

    def other(directory: Path) -> None:
        (directory / "policy.json").write_text('{"kind": "bayes"}')

    assert registry.register("policy", other, {}, {}) != first  # other files: another version


def test_a_retrained_risk_and_policy_are_promoted_together_or_not_at_all(tmp_path: Path) -> None:
    """retrain promotes its risk model and its policy (the policy's state holds the risk): one promotion
    after the other, a registry poll in between or an outage before the second left a running server on
    the new risk model under the old policy, the pair never judged together."""
    import sqlalchemy as sa

    from decision_platform.storage.database import migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    migrate(engine)
    registry = ModelRegistry(Repository(engine), tmp_path / "models")

    def artifact(text: str) -> Callable[[Path], None]:
        return lambda directory: (directory / "model.json").write_text(text)

    old = {
        kind: registry.register(kind, artifact(f"old {kind}"), {}, {}, "champion")
        for kind in ("risk", "policy")
    }
    risk = registry.register("risk", artifact("new risk"), {}, {})
    policy = registry.register("policy", artifact("new policy"), {}, {})
    with engine.begin() as connection:  # the database fails the second promotion's update
        connection.execute(
            sa.text(
                f"CREATE TRIGGER refuse AFTER UPDATE OF status ON models WHEN NEW.version = '{policy}' "
                "BEGIN SELECT RAISE(ABORT, 'the database went away'); END"
            )
        )
    with pytest.raises(sa.exc.DatabaseError):
        registry.promote(risk, policy)
    assert (_status(registry, old["risk"]), _status(registry, risk)) == ("champion", "challenger")
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TRIGGER refuse"))
    registry.promote(risk, policy)
    assert {kind: registry.champion(kind)["version"] for kind in ("risk", "policy")} == {
        "risk": risk,
        "policy": policy,
    }
