"""Unexpected errors are a logged 500 that keeps the connection; outages are a 503 with Retry-After.

A small app with the platform's error handling (api.app.add_error_handling) and routes that fail on purpose.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
import sqlalchemy.exc
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient

from decision_platform.api.app import add_error_handling
from decision_platform.storage.errors import DatabaseUnavailable
from tests.live_server import serving

FAILURES: dict[str, Callable[[], BaseException]] = {
    "bug": lambda: RuntimeError("a bug with a secret in it"),
    "down": lambda: DatabaseUnavailable("spooling: connection refused", retry_after_s=2.5),
    "known-down": lambda: DatabaseUnavailable("database unavailable (OperationalError)", retry_after_s=0.2),
    "psycopg": lambda: psycopg.OperationalError("connection refused"),
    "sqlalchemy": lambda: sqlalchemy.exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("gone")),
    "timeout": lambda: TimeoutError("statement timeout"),
    "redis": lambda: redis.ConnectionError("Connection refused"),
    "redis-timeout": lambda: redis.TimeoutError("Timeout reading from socket"),
    "broker": lambda: HTTPException(503, "the broker did not acknowledge the events; retry"),
}


def _app() -> FastAPI:
    app = FastAPI()
    add_error_handling(app, max_body_bytes=1024)

    @app.get("/fail/{kind}")
    def fail(kind: str) -> dict[str, str]:
        raise FAILURES[kind]()

    @app.get("/ok")
    def ok() -> dict[str, str]:
        return {"status": "ok"}

    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(_app(), raise_server_exceptions=False) as test_client:
        yield test_client


def test_an_unexpected_error_is_a_500_logged_once_with_nothing_leaked(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        response = client.get("/fail/bug")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error; it has been logged"}
    assert "secret" not in response.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None and "/fail/bug" in errors[0].getMessage()


@pytest.mark.parametrize(
    ("kind", "retry_after", "what"),
    [
        ("down", "3", "database unavailable (spooling: connection refused)"),
        ("known-down", "1", "database unavailable (OperationalError)"),  # said once, not twice
        ("psycopg", "1", "database unavailable (OperationalError)"),
        ("sqlalchemy", "1", "database unavailable (OperationalError)"),
        ("timeout", "1", "database unavailable (TimeoutError)"),
        ("redis", "1", "feature store unavailable (ConnectionError)"),
        ("redis-timeout", "1", "feature store unavailable (TimeoutError)"),
    ],
)
def test_an_outage_is_a_503_with_retry_after_and_one_warning_line(
    client: TestClient, caplog: pytest.LogCaptureFixture, kind: str, retry_after: str, what: str
) -> None:
    with caplog.at_level(logging.WARNING):
        response = client.get(f"/fail/{kind}")
    assert response.status_code == 503
    assert response.headers["retry-after"] == retry_after
    assert response.json() == {"detail": f"{what}; retry"}
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.WARNING and caplog.records[0].exc_info is None


def test_every_503_says_when_to_retry(client: TestClient) -> None:
    response = client.get("/fail/broker")  # a route's own 503 (HTTPException)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json() == {"detail": "the broker did not acknowledge the events; retry"}


def _exchange(sock: socket.socket, path: str) -> tuple[int, bytes]:
    """One HTTP/1.1 request on an open connection; the status and the body of its answer."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection answering {path}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection answering {path}"
        body += chunk
    return int(head.split(b" ")[1]), body


def test_the_keep_alive_connection_survives_a_500_and_a_503() -> None:
    with serving(_app()) as url:
        address = urlsplit(url)
        with socket.create_connection((address.hostname, address.port), timeout=5.0) as sock:
            assert _exchange(sock, "/fail/bug")[0] == 500
            assert _exchange(sock, "/ok") == (200, b'{"status":"ok"}')
            assert _exchange(sock, "/fail/down")[0] == 503
            assert _exchange(sock, "/ok")[0] == 200
