"""The /decide lane (api/decide_lane.py) answers exactly what the FastAPI route answers.

The same bytes are sent twice to one app: as ``application/json`` (the lane answers a body that validates)
and as ``application/vnd.test+json`` (the lane hands every such request to FastAPI, which parses ``+json``
as JSON: the route answers). The decider is a stand-in that echoes the request it was given, or fails the
way the write path can; so any difference in parsing, validation, errors or answers shows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decision_platform.api.app import add_error_handling
from decision_platform.api.deps import get_platform
from decision_platform.api.routes import router
from decision_platform.core.records import STORED
from decision_platform.serving.engine import Decision, DecisionRequest

LANE = {"content-type": "application/json"}
ROUTE = {"content-type": "application/vnd.test+json"}


class EchoDecider:
    """Answers with what it was asked (the event's default timestamp left out: it is the arrival time)."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None
        self.requests: list[DecisionRequest] = []

    async def decide(self, request: DecisionRequest) -> Decision:
        self.requests.append(request)
        if self.failure is not None:
            raise self.failure
        event = request.event.model_dump() if request.event is not None else None
        if event is not None and abs(event["timestamp"] - time.time()) < 60:
            del event["timestamp"]
        return Decision(None, {"entity_id": request.entity_id, "event": event}, STORED)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[TestClient, EchoDecider, list[int]]]:
    app = FastAPI()
    add_error_handling(app, max_body_bytes=4096)
    app.include_router(router)
    decider = EchoDecider()
    settings = SimpleNamespace(max_event_ahead_s=86_400.0)
    app.state.platform = SimpleNamespace(batcher=decider, narrator=None, settings=settings)
    route_calls: list[int] = []

    async def counted_platform() -> Any:  # only the FastAPI route resolves it; the lane does not
        route_calls.append(1)
        return app.state.platform

    app.dependency_overrides[get_platform] = counted_platform
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, decider, route_calls


def _both(client: TestClient, body: bytes) -> tuple[Any, Any]:
    lane = client.post("/decide", content=body, headers=LANE)
    route = client.post("/decide", content=body, headers=ROUTE)
    return lane, route


def _same(lane: Any, route: Any) -> None:
    assert (lane.status_code, lane.content) == (route.status_code, route.content)
    for header in ("content-type", "retry-after"):
        assert lane.headers.get(header) == route.headers.get(header)


EVENT = {"event_id": "e-1", "timestamp": 1_760_000_000, "event_type": "payment", "amount": 42.5}


def test_a_well_formed_request_is_answered_by_the_lane_as_the_route_would(served: Any) -> None:
    client, decider, route_calls = served
    body = json.dumps(
        {"entity_id": "user-1", "event": {**EVENT, "attributes": {"device_id": "d-1"}}}
    ).encode()
    before = len(route_calls)
    lane = client.post("/decide", content=body, headers=LANE)
    assert len(route_calls) == before, "FastAPI's route was not needed"
    route = client.post("/decide", content=body, headers=ROUTE)
    assert len(route_calls) == before + 1
    _same(lane, route)
    assert lane.status_code == 200
    assert lane.json()["event"]["entity_id"] == "user-1"  # inherited from the request, as the schema says
    assert decider.requests[-1] == decider.requests[-2]


@pytest.mark.parametrize(
    "body",
    [
        b'{"entity_id": "u"',  # truncated
        b'{"event": {"event_id": "e"}}',  # no entity
        b'{"entity_id": "u", "event": {"event_id": "e", "amount": NaN}}',  # json.loads reads NaN
        b'\xef\xbb\xbf{"entity_id": "u"}',  # a UTF-8 BOM: json.loads accepts it, pydantic does not
        b'{"entity_id": "u\\ud800"}',  # a lone surrogate: no store can hold it
        b'{"entity_id": "u", "unknown": 1}',
        b'{"entity_id": "u", "event": {"event_id": "e", "entity_id": "other"}}',
        b'{"entity_id": "u", "event": {"event_id": "e", "timestamp": "yesterday"}}',
        b"[]",
        b"",
    ],
)
def test_what_the_lane_refuses_is_answered_by_the_route(served: Any, body: bytes) -> None:
    client, _, route_calls = served
    before = len(route_calls)
    lane = client.post("/decide", content=body, headers=LANE)
    route = client.post("/decide", content=body, headers=ROUTE)
    _same(lane, route)
    if lane.status_code == 200:  # the BOM: the route accepts it, so it must have answered both
        assert len(route_calls) == before + 2


def test_other_content_types_go_to_the_route(served: Any) -> None:
    client, _, route_calls = served
    before = len(route_calls)
    answer = client.post("/decide", content=b'{"entity_id": "u"}', headers={"content-type": "text/plain"})
    assert len(route_calls) == before + 1
    assert answer.status_code == 422  # FastAPI: a JSON body is expected


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (TimeoutError(), 503),  # not durable in time
        (OSError("disk full"), 503),  # neither the database nor the spool took it
        (redis.ConnectionError("refused"), 503),  # an outage: the app's handler
        (RuntimeError("a bug"), 500),  # logged, answered 500, connection kept
    ],
)
def test_failures_get_the_routes_answers(served: Any, failure: BaseException, status: int) -> None:
    client, decider, _ = served
    decider.failure = failure
    try:
        lane, route = _both(client, json.dumps({"entity_id": "u"}).encode())
    finally:
        decider.failure = None
    _same(lane, route)
    assert lane.status_code == status
    if status == 503:
        assert lane.headers["retry-after"]


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_keys = st.text(alphabet="abcdefgh_-.", min_size=1, max_size=6) | st.sampled_from(
    ["", "k\x00", "\u00e9t\u00e9"]
)
_attribute_values = st.one_of(_scalars, st.text(max_size=20))
_events = st.fixed_dictionaries(
    {"event_id": st.text(alphabet="abcdef0123456789-", min_size=1, max_size=8)},
    optional={
        "timestamp": st.floats(min_value=9e8, max_value=4.2e9)
        | st.sampled_from(
            ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00+02:00", "1760000000", "2099-01-01T00:00:00Z"]
        ),
        "event_type": st.sampled_from(["payment", "login", ""]),
        "amount": st.floats(min_value=0, max_value=1e13) | st.sampled_from([None, -1.0, math.nan, math.inf]),
        "attributes": st.dictionaries(_keys, _attribute_values, max_size=4),
        "entity_id": st.sampled_from(["u-1", "u-1", "u-1", "other"]),
    },
)


@st.composite
def _bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed requests, some with one field swapped for any JSON value (NaN, 2**70, lists...)."""
    body: dict[str, Any] = {"entity_id": draw(st.sampled_from(["u-1"] * 6 + ["u 2", "", "u\x00"]))}
    if draw(st.booleans()):
        body["event"] = draw(_events)
    if draw(st.integers(0, 3)) == 3:  # hypothesis leans to small draws: the likely branch is "keep"
        target = body["event"] if "event" in body and draw(st.booleans()) else body
        target[draw(st.sampled_from([*target, "unknown"]))] = draw(_values)
    return body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies(), mangle=st.sampled_from(["", "", "", "bom", "cut"]))
def test_the_lane_and_the_route_answer_alike(served: Any, body: dict[str, Any], mangle: str) -> None:
    raw = json.dumps(body).encode()  # NaN and Infinity as bare tokens, as json.dumps writes them
    if mangle == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif mangle == "cut":
        raw = raw[: len(raw) // 2]
    client = served[0]
    _same(*_both(client, raw))
