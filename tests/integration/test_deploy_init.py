"""deploy/init.sh, the compose init job, run for real (no Docker needed): topics on a Kafka-protocol
broker, migrations on PostgreSQL, training only when no champion is registered."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from decision_platform.devtools.tansu import start_broker
from decision_platform.observability.local_prometheus import DEPLOY_DIR
from decision_platform.storage.database import make_engine
from decision_platform.storage.repository import Repository
from tests.conftest import CONFIG_DIR, PG_URL, copy_registry, service_unavailable

pytestmark = pytest.mark.integration


@pytest.fixture
def schema() -> Iterator[str]:
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.OperationalError:
        service_unavailable(f"PostgreSQL at {PG_URL}")
    name = f"dp_init_{uuid.uuid4().hex[:8]}"
    yield name
    with psycopg.connect(PG_URL, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def test_init_job_creates_topics_migrates_and_trains_only_without_champions(
    schema: str, trained: tuple[str, Path], tmp_path: Path
) -> None:
    broker, bootstrap = start_broker()
    # A stand-in `decision-platform` first on PATH records whether the job asks for training (the real
    # training takes a minute and is tested elsewhere); `python` is this environment's.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "decision-platform").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "decision-platform").chmod(0o755)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DP_")},
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DP_DATABASE_URL": PG_URL,
        "DP_DATABASE_SCHEMA": schema,
        "DP_MODEL_DIR": str(trained[1]),
        "DP_CONFIG_DIR": str(CONFIG_DIR),
        "DP_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
    }

    def init(**overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(DEPLOY_DIR / "init.sh")],
            env={**env, **overrides},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def succeeds() -> str:
        result = init()
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    try:
        # A failing step fails the job; it is not taken for "no models" (no training started).
        down = init(DP_DATABASE_URL="postgresql://postgres@127.0.0.1:1/test", DP_KAFKA_BOOTSTRAP_SERVERS="")
        assert down.returncode != 0 and "OperationalError" in down.stderr
        assert not calls.exists()

        first = succeeds()
        assert "database migrated" in first and "training" in first
        assert calls.read_text() == "train\n"
        topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
        assert {"events", "decisions", "events.dlq"} <= set(topics)
        assert len(topics["events"].partitions) == 4

        engine = make_engine(PG_URL, schema)
        copy_registry(trained[0], Repository(engine))  # as if that training had registered models
        engine.dispose()
        second = succeeds()  # idempotent: topics exist, migrations applied, champions registered
        assert "nothing to train" in second
        assert calls.read_text() == "train\n"
    finally:
        broker.kill()
        broker.wait()
