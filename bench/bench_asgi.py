"""CPU per request of the HTTP application itself: middleware, routing, body parsing, answer.

The real app (api.app.create_app) is called in-process as an ASGI callable -- no sockets, no uvicorn --
with a stand-in decider that answers at once, so what is timed is only what the web framework and our
middleware cost per request: ``GET /health``, ``POST /decide`` answered by the lane (api/decide_lane.py)
and the same body answered by FastAPI's route (sent as ``application/vnd.bench+json``, which the lane
hands over). One process, interleaved rounds, CPU time (``time.process_time``); ratios within the run.

    .venv/bin/python bench/bench_asgi.py --requests 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace
from typing import Any

import orjson
import uvloop
from rich.console import Console
from rich.table import Table

from decision_platform.api.app import create_app
from decision_platform.config import Settings
from decision_platform.core.records import STORED
from decision_platform.serving.engine import Decision, DecisionRequest

BODY = orjson.dumps(
    {
        "entity_id": "user-1",
        "event": {
            "event_id": "e-1",
            "timestamp": 1_760_000_000,
            "event_type": "payment",
            "amount": 42.5,
            "attributes": {"device_id": "dev-1", "country": "FR", "merchant": "m-12"},
        },
    }
)
ANSWER = {"decision_id": 1, "action": "allow", "probabilities": [0.9, 0.05, 0.05], "reasons": []}


class InstantDecider:
    async def decide(self, request: DecisionRequest) -> Decision:
        return Decision(None, ANSWER, STORED)  # type: ignore[arg-type]


def _scope(method: str, path: str, content_type: bytes, body: bytes) -> dict[str, Any]:
    headers = [(b"host", b"bench"), (b"content-length", str(len(body)).encode())]
    if content_type:
        headers.append((b"content-type", content_type))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


SCENARIOS = {
    "GET /health": ("GET", "/health", b"", b""),
    "POST /decide (lane)": ("POST", "/decide", b"application/json", BODY),
    "POST /decide (FastAPI route)": ("POST", "/decide", b"application/vnd.bench+json", BODY),
}


async def _cpu_per_request(app: Any, scenario: tuple[str, str, bytes, bytes], n: int) -> float:
    method, path, content_type, body = scenario
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    started = time.process_time()
    for _ in range(n):
        await app(_scope(method, path, content_type, body), receive, send)
    elapsed = time.process_time() - started
    if set(status) != {200}:
        raise SystemExit(f"{method} {path} answered {sorted(set(status))}")
    return elapsed / n


async def _run(requests: int, rounds: int) -> dict[str, float]:
    app = create_app(Settings(), platform=object())  # type: ignore[arg-type]
    settings = SimpleNamespace(max_event_ahead_s=86_400.0)
    app.state.platform = SimpleNamespace(batcher=InstantDecider(), narrator=None, settings=settings)
    best: dict[str, float] = {}
    for scenario in SCENARIOS.values():  # warm-up: imports, caches, the middleware stack
        await _cpu_per_request(app, scenario, 200)
    for _ in range(rounds):  # interleaved, fastest round kept: the least disturbed
        for name, scenario in SCENARIOS.items():
            cost = await _cpu_per_request(app, scenario, requests)
            best[name] = min(best.get(name, cost), cost)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=5000, help="requests per scenario and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    best = uvloop.run(_run(args.requests, args.rounds))
    table = Table(title="HTTP application CPU per request (in-process ASGI, instant decider)")
    table.add_column("scenario")
    table.add_column("µs CPU / request", justify="right")
    table.add_column("vs /health", justify="right")
    health = best["GET /health"]
    for name, cost in best.items():
        table.add_row(name, f"{cost * 1e6:.1f}", f"{cost / health:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
