"""Shared fixtures: tiny trained models (once per session) and platforms on embedded or real backends."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from decision_platform.api.app import create_app
from decision_platform.config import PROJECT_ROOT, Settings
from decision_platform.core.records import DecisionRecord
from decision_platform.core.rewards import RewardTable
from decision_platform.data import generate
from decision_platform.models.registry import ModelRegistry
from decision_platform.models.risk import RiskConfig
from decision_platform.serving.platform import Platform
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.training.train import TrainConfig, train_all

CONFIG_DIR = PROJECT_ROOT / "config"
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14")


def service_unavailable(what: str) -> None:
    """Skip locally, fail in CI: CI machines always have PostgreSQL and Redis running."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not reachable, and CI must run the integration tests")
    pytest.skip(f"{what} is not reachable")


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """Tiny but real models (a few seconds to train), registered in a SQLite registry."""
    root = tmp_path_factory.mktemp("trained")
    db_url = f"sqlite:///{root / 'registry.db'}"
    engine = make_engine(db_url)
    migrate(engine)
    registry = ModelRegistry(Repository(engine), root / "models")
    train_all(
        generate(n_entities=400, days=4, seed=1),
        CONFIG_DIR / "features.yaml",
        RewardTable.load(CONFIG_DIR / "rewards.yaml"),
        registry,
        TrainConfig(anomaly_trees=50, risk=RiskConfig(epochs=4), ppo_timesteps=2048, seed=1),
    )
    engine.dispose()
    return db_url, root / "models"


def copy_registry(source_url: str, target: Repository) -> None:
    """Register the session's trained models in another database (same artifact files)."""
    source = Repository(make_engine(source_url))
    for row in reversed(source.list_models()):
        if target.get_model(row["version"]) is None:
            target.insert_model(row)
    source.engine.dispose()


@pytest.fixture
def make_settings(trained: tuple[str, Path], tmp_path: Path) -> Callable[..., Settings]:
    """Settings for one test: a fresh SQLite database holding the trained models, a private in-memory
    feature store; any field can be overridden."""

    def build(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "database_url": f"sqlite:///{tmp_path / f'dp-{uuid.uuid4().hex[:6]}.db'}",
            "feature_store_url": f"memory://{uuid.uuid4().hex}",
            "model_dir": trained[1],
            "spool_dir": tmp_path / "spool",
            "config_dir": CONFIG_DIR,
            "policy_seed": 0,
        }
        values.update(overrides)
        settings = Settings(**values)  # type: ignore[arg-type]
        engine = make_engine(settings.database_url, settings.database_schema)
        migrate(engine, settings.database_schema)
        copy_registry(trained[0], Repository(engine))
        engine.dispose()
        return settings

    return build


@pytest.fixture
def start_platform() -> Iterator[Callable[[Settings], Platform]]:
    started: list[Platform] = []

    def start(settings: Settings) -> Platform:
        platform = Platform.start(settings)
        started.append(platform)
        return platform

    yield start
    for platform in started:
        platform.close()


@pytest.fixture
def client(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> Iterator[TestClient]:
    """The API on embedded backends with trained models."""
    settings = make_settings()
    with TestClient(create_app(settings, start_platform(settings))) as test_client:
        yield test_client


def decision_row(decision_id: int, **overrides: object) -> dict:
    """A complete, valid decision row (the table's columns) for storage tests."""
    return {**_base_row(decision_id), **overrides}


def decision_record(decision_id: int, **overrides: object) -> DecisionRecord:
    """A complete, valid decision record: what the engine hands the writer."""
    return DecisionRecord.from_row(decision_row(decision_id, **overrides))


def _base_row(decision_id: int) -> dict:
    return {
        "id": decision_id,
        "entity_id": "e",
        "event_id": None,
        "created_at": datetime.now(UTC),
        "features": {"amount": 1.0},
        "amount": 1.0,
        "anomaly": 0.5,
        "risk": 0.1,
        "probabilities": [0.8, 0.1, 0.1],
        "proposed_action": 0,
        "action_mask": [True, True, True],
        "action": 0,
        "propensity": 0.8,
        "decided_by": "policy",
        "rules_fired": [],
        "fallback": None,
        "model_versions": {},
        "reasons": [],
        "explanation": "Allowed.",
        "explanation_source": "template",
        "latency_ms": 1.0,
        "event_type": None,
        "attributes": None,
        "shadow": None,
    }


class HangingSpoolDisk:
    """Makes the fsync of spool segments hang until ``release()`` (a disk that hangs, not one that fails);
    ``failures`` of them then raise EIO (the disk answered with an error). Other fsyncs are untouched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.released = threading.Event()
        self.hanging = threading.Event()  # set once an fsync hangs
        self.failures = 0
        real = os.fsync

        def fsync(fd: int) -> None:
            if "segment-" in os.readlink(f"/proc/self/fd/{fd}"):
                self.hanging.set()
                self.released.wait(60)
                if self.failures:
                    self.failures -= 1
                    raise OSError(5, "Input/output error")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def release(self) -> None:
        self.released.set()
