"""Fixtures of the integration tests: private corners of the machine's PostgreSQL and Redis, and a
Redis Cluster of our own (3 masters from the machine's redis-server, once per session)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis

from decision_platform.devtools.redis_cluster import LocalRedisCluster, start_cluster
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from tests.conftest import CONFIG_DIR, PG_URL, REDIS_URL, copy_registry, service_unavailable


@pytest.fixture
def pg_schema() -> Iterator[str]:
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.OperationalError:
        service_unavailable(f"PostgreSQL at {PG_URL}")
    schema = f"dp_test_{uuid.uuid4().hex[:10]}"
    yield schema
    with psycopg.connect(PG_URL, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def redis_db() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        service_unavailable(f"Redis at {REDIS_URL}")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A 3-master Redis Cluster on free 127.0.0.1 ports, shared by the session (it forms in ~2 s).

    Tests keep to key prefixes of their own; the cluster and its directory go away at the end.
    """
    try:
        cluster = start_cluster(masters=3, timeout_s=30)
    except FileNotFoundError as exc:
        service_unavailable(f"a local Redis Cluster ({exc})")
    try:
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def schema_with_models(trained: tuple[str, Path], prefix: str, redis_url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema, migrated and holding the session's trained models, and an empty Redis
    database, for a server started in another process; both cleared afterwards."""
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
        redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()
    except (psycopg.OperationalError, redis.ConnectionError) as exc:
        service_unavailable(f"PostgreSQL / Redis ({exc})")
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    engine = make_engine(PG_URL, schema)
    migrate(engine, schema)
    copy_registry(trained[0], Repository(engine))
    engine.dispose()
    redis.Redis.from_url(redis_url).flushdb()
    try:
        yield schema
    finally:
        redis.Redis.from_url(redis_url).flushdb()
        with psycopg.connect(PG_URL, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def process_env(schema: str, model_dir: Path, redis_url: str, spool_dir: Path) -> dict[str, str]:
    """The environment of a platform process started by a test: this machine's environment without any
    DP_, STACK_ or PROMETHEUS_ setting, then the schema, the Redis database and the session's models."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DP_", "STACK_", "PROMETHEUS_"))}
    env.update(
        DP_DATABASE_URL=PG_URL,
        DP_DATABASE_SCHEMA=schema,
        DP_FEATURE_STORE_URL=redis_url,
        DP_MODEL_DIR=str(model_dir),
        DP_CONFIG_DIR=str(CONFIG_DIR),
        DP_SPOOL_DIR=str(spool_dir),
    )
    return env


def query(schema: str, sql: str) -> list[tuple]:
    with psycopg.connect(PG_URL, options=f"-csearch_path={schema}") as connection:
        return connection.execute(sql).fetchall()
