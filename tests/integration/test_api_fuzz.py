"""Fuzzing red team (s27): random bodies, paths and query strings against every route of the app
(API, admin, console), on the embedded backends and on PostgreSQL + Redis.

schemathesis (test_openapi_fuzz.py) generates from the schema; this mutates valid requests towards what the
schema cannot express: raw JSON text with lone surrogates, NUL, numbers beyond float64 / int64 / 4300
digits, NaN and Infinity, duplicate keys, deep nesting, big maps and arrays, BOMs and non-UTF-8 bytes, odd
content types; ids and query values of every shape. Held: no 5xx, every 4xx a JSON body whose ``detail``
says what (the console's pages: HTML), nothing logged as an error, and every accepted decision stored with
what was sent. Seeded: the same requests every run, a few seconds a backend.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decision_platform.api.app import create_app
from decision_platform.api.schemas import DecideRequest
from decision_platform.config import Settings
from decision_platform.serving.platform import Platform
from tests.conftest import PG_URL

KEY = "fuzz-key"
#: Another or a longer run than the suite's: DP_FUZZ_SEED=1 DP_FUZZ_ROUNDS=10 pytest tests/integration/...
SEED = int(os.environ.get("DP_FUZZ_SEED", "27"))
ROUNDS = int(os.environ.get("DP_FUZZ_ROUNDS", "1"))


class Raw:
    """JSON text written as is (lone surrogates, NaN, numbers json.dumps would not write)."""

    def __init__(self, text: str) -> None:
        self.text = text


class Pairs:
    """An object written with these key / value pairs: keys may repeat."""

    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self.pairs = pairs


def dumps(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        value = Pairs(list(value.items()))
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{dumps(k)}:{dumps(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


STRINGS: list[Any] = [
    *("", " ", "a", "x" * 64, "x" * 65, "y" * 128, "y" * 129, "z" * 256, "z" * 257, "a" * 20_000),
    *("\u00e9 \u00fc \u65e5\u672c \U0001f642", "\u202e", "\ufeff", "\uffff", "\x7f", "\n\r\t", "%00", "{}"),
    *("1700000000", "2024-01-01T00:00:00Z", "2024-01-01T00:00:00", "2099-01-01T00:00:00Z", "nan", "inf"),
    *("-1", "1e400", "true", "null", "<script>alert(1)</script>", "' OR 1=1 --", "a:b@c.d-e_f", "__proto__"),
    *("\uff11\uff17\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10", "2016-12-31T23:59:60Z", "e" * 5000),
    Raw('"\\u0000"'),
    Raw('"a\\u0000b"'),
    Raw('"a\\ud800"'),
    Raw('"\\udfff"'),
    Raw('"\\ud83d\\ude00"'),
]
NUMBERS: list[Any] = [
    *(0, 1, -1, 0.5, -0.0, 1e12, 1e12 + 1, 1e308, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63)),
    *(-(2**63) - 1, 2**64, 10**30, 1700000000, 1700000000.5, 946684799, 4102444801, 5e-324),
    *(Raw("1e400"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1E5"), Raw("-0")),
    *(Raw("1" * 4400), Raw("1." + "1" * 5000), Raw("1e-400"), Raw("0.0000000000000000000001")),
]


def atom(r: random.Random) -> Any:
    k = r.random()
    if k < 0.35:
        return r.choice(STRINGS)
    if k < 0.7:
        return r.choice(NUMBERS)
    if k < 0.8:
        return r.choice([None, True, False])
    if k < 0.9:
        return r.choice([[], {}, [1, 2], {"a": 1}, ["x"] * 2000, {f"k{i}": i for i in range(500)}])
    depth = r.choice([3, 50, 300, 3000])
    return Raw("[" * depth + "]" * depth) if r.random() < 0.5 else Raw('{"a":' * depth + "1" + "}" * depth)


def event(r: random.Random, event_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": event_id,
        "entity_id": f"ent-{r.randint(0, 5)}",
        "amount": r.choice([0, 1, 50.5, 999, 1e12, "12.5"]),
        "event_type": r.choice(["payment", "login", "p\u00e4yment"]),
        "timestamp": r.choice([None, "now", "2024-03-01T10:00:00Z", "2024-03-01t10:00:00.5z"]),
        "attributes": {
            "country": r.choice(["FR", "\u65e5\u672c", ""]),
            "n": r.choice([3, 2**63 - 1, -(2**63)]),
            "f": r.choice([1.5, 1e16, 1e308, -0.0, 5e-324]),
            "b": True,
        },
    }
    if body["timestamp"] is None:
        del body["timestamp"]
    elif body["timestamp"] == "now":
        body["timestamp"] = "2026-01-01T00:00:00Z"
    for key in list(body):
        if key not in ("event_id", "entity_id") and r.random() < 0.2:
            del body[key]
    return body


def mutate(r: random.Random, value: Any) -> Any:
    if isinstance(value, dict):
        value, keys = dict(value), list(value)
        op = r.random()
        if keys and op < 0.45:
            key = r.choice(keys)
            value[key] = mutate(r, value[key]) if r.random() < 0.5 else atom(r)
        elif keys and op < 0.55:
            del value[r.choice(keys)]
        elif op < 0.65:
            extra = r.choice(["extra", "", "entity_id", "attributes", Raw('"k\\u0000"'), Raw('"\\ud800"')])
            value[extra] = atom(r)
        elif keys and op < 0.75:
            return Pairs([*value.items(), (r.choice(keys), atom(r))])  # a repeated key
        elif op < 0.85 and "attributes" in value:
            n = r.choice([31, 32, 33, 1000])
            value["attributes"] = {f"a{j}": atom(r) if r.random() < 0.1 else j for j in range(n)}
        else:
            value[r.choice(keys) if keys else "x"] = atom(r)
        return value
    if isinstance(value, list) and value and r.random() < 0.7:
        value = list(value)
        at = r.randrange(len(value))
        value[at] = mutate(r, value[at])
        return value
    return atom(r)


def body_for(r: random.Random, path: str, i: int, ids: list[int]) -> Any:
    if path == "/decide":
        body: Any = {"entity_id": f"ent-{r.randint(0, 5)}"}
        if r.random() < 0.8:
            body["event"] = event(r, f"fz-d{i}")
            del body["event"]["entity_id"]
    elif path == "/events":
        batch = [event(r, f"fz-e{i}-{j}") for j in range(r.randint(1, 4))]
        body = batch[0] if r.random() < 0.5 else {"events": batch}
    else:
        outcome = r.choice(["success", "fraud", "chargeback", "complaint", "false_positive"])
        body = {"decision_id": r.choice(ids) if ids else 1, "outcome": outcome}
    for _ in range(r.choice([0, 0, 1, 1, 2, 3])):
        body = mutate(r, body)
    return body


CONTENT_TYPES = [
    *(["application/json"] * 8),
    "application/json; charset=utf-8",
    "application/vnd.fuzz+json",
    "text/plain",
    None,
    "application/json; charset=latin-1",
    "multipart/form-data",
]


def assert_no_errors(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]


GENERIC = {"There was an error parsing the body", "Internal Server Error"}


def assert_answer(response: httpx.Response, what: str) -> None:
    """No 5xx; a 4xx says what in JSON (or, for the console's own pages, in HTML)."""
    assert response.status_code < 500, (what, response.status_code, response.text[:500])
    if response.status_code >= 400:
        if response.headers.get("content-type", "").startswith("text/html"):
            assert "<!doctype html>" in response.text[:100].lower(), what
            return
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail.strip(), (what, response.text[:300])
        assert detail not in GENERIC, (what, detail)  # FastAPI's own words name nothing


def expected_event(raw: bytes) -> dict[str, Any] | None:
    """What a /decide body's event should be stored as: the body read as the route reads it."""
    request = DecideRequest.model_validate(json.loads(raw))
    return None if request.event is None else request.event.model_dump()


def same_value(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


@pytest.fixture(params=["embedded", pytest.param("postgresql+redis", marks=pytest.mark.integration)])
def fuzzed(
    request: pytest.FixtureRequest,
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
) -> Iterator[tuple[str, TestClient]]:
    overrides: dict[str, object] = {"api_key": KEY, "console_password": "pw", "model_refresh_s": 0}
    if request.param == "postgresql+redis":
        overrides.update(
            database_url=PG_URL,
            database_schema=request.getfixturevalue("pg_schema"),
            feature_store_url=request.getfixturevalue("redis_db"),
        )
    settings = make_settings(**overrides)
    with TestClient(create_app(settings, start_platform(settings))) as client:
        yield request.param, client


def test_random_bodies_are_4xx_saying_what_and_accepted_ones_are_stored(
    fuzzed: tuple[str, TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    backend, client = fuzzed
    r = random.Random(SEED)
    ids: list[int] = []
    seen: set[str] = set()  # ids of the events decided
    statuses: dict[tuple[str, int], int] = {}
    with caplog.at_level(logging.ERROR):
        for i in range(240 * ROUNDS):
            path = r.choice(["/decide", "/decide", "/events", "/outcome"])
            body = body_for(r, path, i, ids)
            raw = dumps(body).encode("utf-8", "surrogatepass")
            if r.random() < 0.05:
                raw = b"\xef\xbb\xbf" + raw
            if r.random() < 0.03:
                raw = raw.replace(b"e", b"\xe9", 1)
            if r.random() < 0.02:
                raw = b""
            content_type = r.choice(CONTENT_TYPES)
            headers = {"content-type": content_type} if content_type else {}
            response = client.post(path, content=raw, headers=headers)
            what = f"{backend} POST {path} {content_type}: {raw[:300]!r}"
            statuses[path, response.status_code] = statuses.get((path, response.status_code), 0) + 1
            assert_answer(response, what)
            if response.status_code != 200 or path == "/outcome":
                if path == "/outcome" and response.status_code == 201:  # a repeat is the same outcome
                    again = client.post(path, content=raw, headers=headers)
                    assert again.status_code == 200 and again.json()["created"] is False, what
                continue
            answer = response.json()
            decided = [answer["decision_id"]] if path == "/decide" else answer["decision_ids"]
            if path == "/events":
                posted = json.loads(raw)
                seen.update(e["event_id"] for e in posted.get("events", [posted]))
            for decision_id in decided:
                if decision_id is None:
                    continue
                ids.append(decision_id)
                stored = client.get(f"/decisions/{decision_id}")
                assert stored.status_code == 200, (what, stored.text[:300])
                sent = expected_event(raw) if path == "/decide" else None
                if sent is not None and sent["event_id"] in seen:
                    continue  # a mutation made it another event's id: answered as that event's retry
                if sent is not None:  # what was accepted is what is stored, types included
                    seen.add(sent["event_id"])
                    record = stored.json()
                    assert record["event_type"] == sent["event_type"], what
                    assert record["amount"] == sent["amount"], what  # None (null) when it had none
                    assert record["attributes"].keys() == sent["attributes"].keys(), what
                    for key, value in sent["attributes"].items():
                        assert same_value(record["attributes"][key], value), (what, key, value)
    assert_no_errors(caplog)
    accepted = sum(n for (path, status), n in statuses.items() if status < 300)
    assert accepted >= 40 * ROUNDS, statuses  # the mutations leave enough valid requests to check storage


ID_TEXTS = [
    *("1", "0", "-1", "+5", "1e3", "9223372036854775807", "9223372036854775808", "9" * 30, "9" * 5000),
    *("abc", "%00", "%ED%A0%80", "%EF%BC%95", "1%20", "0x10", "1.0", "%20", "null", "..%2f..%2fetc"),
]
QUERY_VALUES = [
    *("", "0", "1", "-1", "true", "maybe", "nan", "inf", "-inf", "1e400", "9" * 30, "9" * 5000),
    *(
        "%00",
        "%ED%A0%80",
        "%FF",
        "%EF%BC%91",
        "a" * 3000,
        "2024-01-01T00:00:00Z",
        "0001-01-01T00:00:00%2B01:00",
    ),
    *("9999-12-31T23:59:59-01:00", "7d", "-5d", "1e400d", "now", "review", "block", "velocity_step_up"),
    *("risk", "policy", "x%26y%3Dz", "%3Cscript%3E", "0.5", "1.5"),
]


QUERY_NAMES = [
    *("wait", "timeout", "kind", "limit", "since", "version", "x", "%00", "action", "until", "rule"),
    *("risk_min", "risk_max", "entity", "unlabelled", "before", "next"),
]


def get_urls(r: random.Random, ids: list[int]) -> Iterator[str]:
    known = [str(i) for i in ids] or ["1"]
    for _ in range(160 * ROUNDS):
        ident = r.choice(ID_TEXTS + known)
        query = "&".join(f"{r.choice(QUERY_NAMES)}={r.choice(QUERY_VALUES)}" for _ in range(r.randint(0, 3)))
        base = r.choice(
            [
                f"/decisions/{ident}",
                f"/decisions/{ident}/explanation",
                "/health",
                "/ready",
                "/admin/models",
                "/admin/models/compare",
                "/console/queue",
                f"/console/decisions/{ident}",
                "/console/whatif",
                "/console/models",
                "/console/login",
                f"/console/reports/{ident}",
                f"/console/static/{ident}",
            ]
        )
        yield f"{base}?{query}" if query else base


def decisions_and_a_session(client: TestClient, prefix: str) -> tuple[list[int], str]:
    """Three decisions to point ids at, and a logged-in console session on ``client`` (with its CSRF
    token)."""
    ids = [client.post("/decide", json={"entity_id": f"{prefix}{k}"}).json()["decision_id"] for k in range(3)]
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/console/login").text)
    assert csrf is not None
    logged_in = client.post(
        "/console/login", data={"csrf": csrf.group(1), "password": "pw"}, follow_redirects=False
    )
    assert logged_in.status_code == 303
    return ids, csrf.group(1)


def test_random_paths_and_query_strings_are_4xx_saying_what(
    fuzzed: tuple[str, TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    backend, client = fuzzed
    r = random.Random(SEED * 101)
    ids, _ = decisions_and_a_session(client, "q")
    with caplog.at_level(logging.ERROR):
        for url in get_urls(r, ids):
            headers = (
                {"X-API-Key": KEY} if r.random() < 0.8 else {"X-API-Key": r.choice(["", "k", "x" * 500])}
            )
            response = client.get(url, headers=headers, follow_redirects=False)
            assert_answer(response, f"{backend} GET {url[:300]}")
    assert_no_errors(caplog)


FORM_VALUES = [
    *(
        "",
        "x",
        "\u00e9",
        "\x00",
        "a" * 5000,
        "success",
        "fraud",
        "all",
        "risk",
        "policy",
        "nope",
        "7d",
        "now",
    ),
    *(
        "1e400d",
        "2024-01-01T00:00:00Z",
        "a: [" * 1000,
        "rules: 5",
        "rules:\n- {name: x, tier: block, when: 'true'}",
    ),
    *("\ud800", "0" * 70, "anomaly-20240101-abc", "- 1", "{"),
]


FORM_FIELDS = ["outcome", "rules_text", "since", "until", "version", "kind", "admin_key", "password", "next"]


def test_random_console_forms_are_4xx_saying_what(
    fuzzed: tuple[str, TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    backend, client = fuzzed
    r = random.Random(SEED * 10101)
    ids, token = decisions_and_a_session(client, "f")
    with caplog.at_level(logging.ERROR):
        for _ in range(150 * ROUNDS):
            target = r.choice([*ids, 1, 2**63 - 1])
            path = r.choice(
                [
                    "/console/login",
                    "/console/logout",
                    f"/console/decisions/{target}/outcome",
                    "/console/whatif",
                    "/console/models/promote",
                    "/console/models/rollback",
                ]
            )
            data = {name: r.choice(FORM_VALUES) for name in r.sample(FORM_FIELDS, r.randint(0, 4))}
            data["csrf"] = token if r.random() < 0.7 else r.choice(FORM_VALUES)
            pairs = [f"{k}={quote_plus(v.encode('utf-8', 'surrogatepass'))}" for k, v in data.items()]
            encoded = "&".join(pairs)
            headers = {"content-type": "application/x-www-form-urlencoded"}
            response = client.post(path, content=encoded.encode(), headers=headers, follow_redirects=False)
            assert_answer(response, f"{backend} POST {path} {encoded[:300]}")
    assert_no_errors(caplog)


# --- property-based: an event's attributes are refused naming the field, or stored exactly

NO_NUL = st.characters(exclude_characters="\x00")
#: Values every store can hold, at their limits too.
STORABLE = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(NO_NUL, max_size=256),
    st.sampled_from([2**63 - 1, -(2**63), 1e16, 2.0**53 + 2, -0.0, 5e-324, 1.7976931348623157e308, "\uffff"]),
)
#: What no store can hold, or the contract refuses.
UNSTORABLE = st.one_of(
    st.sampled_from(["\x00", "a\x00", 2**63, -(2**63) - 1, 2**70, math.nan, math.inf, -math.inf]),
    st.text(NO_NUL, min_size=257, max_size=300),
)
KEYS = st.text(NO_NUL, min_size=1, max_size=64)


@st.composite
def attribute_maps(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly storable maps of up to 32 entries; sometimes one value, key or size the contract refuses."""
    attributes = draw(st.dictionaries(KEYS, STORABLE, max_size=32))
    spoil = draw(st.sampled_from(["none", "none", "none", "value", "key", "size"]))
    if spoil == "value":
        attributes[draw(KEYS)] = draw(UNSTORABLE)
    elif spoil == "key":
        attributes[draw(st.sampled_from(["", "k\x00", "x" * 65]))] = 1
    elif spoil == "size":
        attributes.update({f"extra-{k}": k for k in range(33 - len(attributes))})
    return attributes


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    attributes=attribute_maps(),
    event_type=st.one_of(
        *[st.text(NO_NUL, min_size=1, max_size=64)] * 4, st.sampled_from(["", "a\x00", "x" * 65])
    ),
    amount=st.one_of(
        *[st.none(), st.floats(min_value=0, max_value=1e12)] * 2,
        st.sampled_from([-1, 1e13, True, "12.5", math.nan, 2**70]),
    ),
)
def test_attributes_are_refused_naming_the_field_or_stored_exactly(
    fuzzed: tuple[str, TestClient], attributes: dict[str, Any], event_type: str, amount: Any
) -> None:
    backend, client = fuzzed
    event = {"event_id": f"h-{uuid.uuid4().hex}", "event_type": event_type, "attributes": attributes}
    if amount is not None:
        event["amount"] = amount
    raw = json.dumps({"entity_id": "hyp", "event": event}, allow_nan=True).encode()  # NaN as NaN
    response = client.post("/decide", content=raw, headers={"content-type": "application/json"})
    what = f"{backend}: {raw[:300]!r}"
    assert_answer(response, what)
    if response.status_code == 422:
        fields = [e["field"] for e in response.json()["errors"]]
        assert all(f.startswith("event.") for f in fields), (what, fields)
        return
    assert response.status_code == 200, what
    stored = client.get(f"/decisions/{response.json()['decision_id']}").json()
    assert stored["event_type"] == event_type, what
    assert stored["attributes"].keys() == attributes.keys(), what
    for key, value in attributes.items():
        assert same_value(stored["attributes"][key], value), (what, key, value, stored["attributes"][key])


def test_an_event_id_reused_by_the_same_entity_for_other_content_is_409_and_a_retry_is_not(
    fuzzed: tuple[str, TestClient],
) -> None:
    """Found fuzzing: an event id the entity had used, sent again with another amount, type or attributes,
    was answered 200 with the first event's decision -- the second event neither decided nor counted:
    accepted and lost. A retry (the same content, as stored: 1e16, int64 bounds, -0.0) still gets the first
    decision; the time is not compared (a client that leaves it out gets its arrival time)."""
    backend, client = fuzzed
    attributes = {"k": "a", "f": 1e16, "n": 2**63 - 1, "m": -(2**63), "z": -0.0, "b": True}
    event = {"event_id": "reuse-1", "amount": 5, "event_type": "payment", "attributes": attributes}
    first = client.post("/decide", json={"entity_id": "ru", "event": event})
    assert first.status_code == 200, first.text
    retry = client.post("/decide", json={"entity_id": "ru", "event": {**event, "timestamp": time.time() - 5}})
    assert retry.status_code == 200 and retry.json()["decision_id"] == first.json()["decision_id"], backend
    for other in ({"amount": 900}, {"event_type": "refund"}, {"attributes": {**attributes, "k": "b"}}):
        answer = client.post("/decide", json={"entity_id": "ru", "event": {**event, **other}})
        assert answer.status_code == 409, (backend, other, answer.text)
        assert "already the id of another event of this entity" in answer.json()["detail"]
        posted = client.post("/events", json={**event, **other, "entity_id": "ru"})
        assert posted.status_code == 200 and posted.json()["decision_ids"] == [None], (backend, posted.text)
    again = client.post("/events", json={**event, "entity_id": "ru"})
    assert again.json()["decision_ids"] == [first.json()["decision_id"]], backend
    after = client.post("/decide", json={"entity_id": "ru", "event": {"event_id": "reuse-2", "amount": 1}})
    features = client.get(f"/decisions/{after.json()['decision_id']}").json()["features"]
    assert features["count_1h"] == 2 and features["sum_1h"] == 6, features  # the refused ones not counted
