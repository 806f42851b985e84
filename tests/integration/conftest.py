"""Fixtures of the integration tests: private corners of the machine's PostgreSQL and Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis

from tests.conftest import PG_URL, REDIS_URL, service_unavailable


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


def query(schema: str, sql: str) -> list[tuple]:
    with psycopg.connect(PG_URL, options=f"-csearch_path={schema}") as connection:
        return connection.execute(sql).fetchall()
