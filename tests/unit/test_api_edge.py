"""The API's edge (issue 11): what the stores cannot hold is a 422 naming the field, out-of-range values are
422s not 500s, and the OpenAPI schema documents the answers the app really gives."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from decision_platform.api.app import create_app
from decision_platform.api.schemas import ValidationErrorBody
from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.data.csv_import import load_csv
from decision_platform.serving.platform import Platform
from decision_platform.storage.tables import decisions
from tests.live_server import serving

KEY = "edge-key"
AUTH = {"X-API-Key": KEY}
JSON = {"content-type": "application/json"}
INT64_MAX = 2**63 - 1


def _post_raw(client: TestClient, path: str, text: str) -> httpx.Response:
    # Raw JSON text: \u escapes reach the server as written (json= would encode the characters).
    return client.post(path, content=text.encode(), headers=JSON)


def _fields(response: httpx.Response) -> list[str]:
    assert response.status_code == 422, response.text
    body = ValidationErrorBody.model_validate(response.json())  # the documented shape
    return [e.field for e in body.errors]


UNSTORABLE_EVENTS = [
    ('"event_type": "pay\\u0000ment"', "event.event_type", "NUL"),
    ('"event_type": "pay\\ud800"', "event.event_type", "surrogate"),
    ('"attributes": {"k": "a\\u0000b"}', "event.attributes.k", "NUL"),
    ('"attributes": {"k": "a\\udfffb"}', "event.attributes.k", "surrogate"),
    ('"attributes": {"k\\u0000": 1}', "event.attributes.k\\x00.[key]", "NUL"),
    # pydantic-core reports such a key with replacement characters: printable, and valid JSON.
    ('"attributes": {"k\\ud800": 1}', "event.attributes.k\ufffd\ufffd\ufffd.[key]", "surrogate"),
    ('"attributes": {"n": 1180591620717411303424}', "event.attributes.n", "64-bit"),
    ('"attributes": {"n": 9223372036854775808}', "event.attributes.n", "64-bit"),
    ('"attributes": {"n": -9223372036854775809}', "event.attributes.n", "64-bit"),
    ('"attributes": {"x": 1e400}', "event.attributes.x", "finite"),
]


@pytest.mark.parametrize(("fragment", "field", "word"), UNSTORABLE_EVENTS)
def test_what_the_database_cannot_store_is_422_naming_the_field(
    client: TestClient, fragment: str, field: str, word: str
) -> None:
    response = _post_raw(
        client, "/decide", f'{{"entity_id": "p1", "event": {{"event_id": "n1", {fragment}}}}}'
    )
    assert _fields(response) == [field]
    assert word in response.json()["detail"]
    # The poison never reached the write path: the next decision is stored and readable (issue 11, #1).
    decision = client.post("/decide", json={"entity_id": "p1"}).json()
    assert client.get(f"/decisions/{decision['decision_id']}").status_code == 200


def test_unstorable_events_posted_to_events_are_422_too(client: TestClient) -> None:
    response = _post_raw(client, "/events", '{"event_id": "e1", "entity_id": "p2", "event_type": "a\\u0000"}')
    assert "Event.event_type" in _fields(response)  # the body is one event or a batch: both are reported
    batch = '{"events": [{"event_id": "e2", "entity_id": "p2", "attributes": {"k": "\\ud800"}}]}'
    assert "EventBatch.events.0.attributes.k" in _fields(_post_raw(client, "/events", batch))


def test_a_bad_event_posted_to_events_is_answered_with_its_own_error_only(client: TestClient) -> None:
    """The body is one event or a batch; as a plain union a bad event was answered with both members'
    errors: "Event.timestamp: ...; EventBatch.events: Field required; EventBatch.event_id: Extra inputs
    are not permitted; ..." (a batch's error behind "Event.event_id: Field required", and so on)."""
    one = {"event_id": "u1", "entity_id": "p2", "timestamp": "1970-01-01T00:00:00Z"}
    answer = client.post("/events", json=one).json()
    assert answer["detail"] == "Event.timestamp: Value error, timestamp out of range (years 2000-2100)"
    batch = {"events": [{"event_id": "u2", "entity_id": "p2"}, {**one, "amount": -1}]}
    answer = client.post("/events", json=batch).json()
    fields = ["EventBatch.events.1.timestamp", "EventBatch.events.1.amount"]
    assert [e["field"] for e in answer["errors"]] == fields
    assert [e["field"] for e in client.post("/events", json=[one]).json()["errors"]] == ["Event"]
    assert client.post("/events", json=batch["events"][0]).status_code == 200


def test_the_64_bit_and_text_limits_themselves_are_accepted(client: TestClient) -> None:
    attributes = {"max": INT64_MAX, "min": -(2**63), "text": "é ü 日本 🙂", "flag": True, "x": 1.5e308}
    body = {
        "entity_id": "p3",
        "event": {"event_id": "ok-1", "event_type": "paymént", "attributes": attributes},
    }
    decision = client.post("/decide", json=body)
    assert decision.status_code == 200, decision.text
    stored = client.get(f"/decisions/{decision.json()['decision_id']}").json()
    assert stored["attributes"] == attributes and stored["event_type"] == "paymént"


@pytest.mark.parametrize(
    ("raw", "word"),
    [
        (b'{"event_id": "k1", "entity_id": "e", "event_type": "a\\u0000"}', "NUL"),
        (b'{"event_id": "k1", "entity_id": "e", "attributes": {"k\\u0000": 1}}', "NUL"),
        (b'{"event_id": "k1", "entity_id": "e", "attributes": {"k": "\\ud800"}}', "surrogate"),
        (b'{"event_id": "k1", "entity_id": "e", "event_type": "\\udfff"}', "surrogate"),
        (b'{"event_id": "k1", "entity_id": "e", "attributes": {"n": 1180591620717411303424}}', "64-bit"),
    ],
)
def test_kafka_messages_with_unstorable_values_are_refused(raw: bytes, word: str) -> None:
    # The stream worker parses messages with model_validate_json (pydantic-core's JSON parser, not Python's).
    with pytest.raises(ValidationError) as refused:
        Event.model_validate_json(raw)
    text = str(refused.value)
    assert word in text or (word == "surrogate" and "json_invalid" in text), text


def test_kafka_messages_at_the_limits_are_accepted() -> None:
    event = Event.model_validate_json(
        b'{"event_id": "k2", "entity_id": "e", "attributes": {"n": 9223372036854775807, "s": "\\u00e9"}}'
    )
    assert event.attributes == {"n": INT64_MAX, "s": "é"}


# --- bodies that are not the JSON asked for: the answer names the problem


def test_malformed_json_is_422_saying_what_and_where(client: TestClient) -> None:
    response = _post_raw(client, "/decide", '{"entity_id": "a"')
    assert _fields(response) == ["body"]  # not "17", the character offset
    assert response.json()["detail"] == "body: invalid JSON at character 17: Expecting ',' delimiter"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_json_body_sent_without_the_json_content_type_is_told_so(
    client: TestClient, content_type: str | None
) -> None:
    # curl -d sends application/x-www-form-urlencoded: the answer said "Input should be a valid dictionary".
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/decide", "/events", "/outcome"):
        response = client.post(path, content=b'{"entity_id": "a"}', headers=headers)
        assert _fields(response) == ["body"], path
        assert "Content-Type: application/json" in response.json()["detail"]
        assert (repr(content_type) if content_type else "no Content-Type") in response.json()["detail"]


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b'{"entity_id": "a\xff"}', "the body is not UTF-8 text (byte 0xff at position 16)"),
        (b'{"entity_id": "a", "event": ' + b"[" * 5000 + b"]" * 5000 + b"}", "the JSON is nested too deeply"),
    ],
)
def test_a_body_that_cannot_be_parsed_is_400_saying_why(client: TestClient, raw: bytes, detail: str) -> None:
    response = client.post("/decide", content=raw, headers=JSON)
    assert response.status_code == 400 and response.json() == {
        "detail": detail
    }  # was "There was an error..."


def test_true_is_neither_an_amount_nor_a_decision_id(client: TestClient) -> None:
    # Lax parsing read them as 1.0 and 1: a payment of 1, the outcome of some other decision.
    decide = {"entity_id": "b1", "event": {"event_id": "b1", "amount": True}}
    assert _fields(client.post("/decide", json=decide)) == ["event.amount"]
    assert "Event.amount" in _fields(client.post("/events", json={**decide["event"], "entity_id": "b1"}))
    assert _fields(client.post("/outcome", json={"decision_id": True, "outcome": "success"})) == [
        "decision_id"
    ]
    with pytest.raises(ValidationError, match="not true or false"):  # the stream worker's parser too
        Event.model_validate_json(b'{"event_id": "k3", "entity_id": "e", "amount": false}')
    stored = client.post("/decide", json={"entity_id": "b1", "event": {"event_id": "b2", "amount": "12.5"}})
    assert stored.status_code == 200  # a number as text still reads as the number
    assert client.get(f"/decisions/{stored.json()['decision_id']}").json()["amount"] == 12.5


def test_rfc3339_times_with_lower_case_t_and_z_are_accepted(client: TestClient) -> None:
    # RFC 3339 5.6: "T" and "Z" may be lower case; they were a 422 "must be RFC 3339 text".
    for k, text in enumerate(["2024-03-01t10:00:00z", "2024-03-01T10:00:00.5z", "2024-03-01t11:00:00+01:00"]):
        body = {"entity_id": "t1", "event": {"event_id": f"lower-{k}", "timestamp": text}}
        assert client.post("/decide", json=body).status_code == 200, text
        assert Event(event_id="e", entity_id="t1", timestamp=text).timestamp in (1709287200.0, 1709287200.5)
    naive = {"entity_id": "t1", "event": {"event_id": "naive", "timestamp": "2024-03-01t10:00:00"}}
    assert "time zone offset" in client.post("/decide", json=naive).json()["detail"]


def test_epoch_seconds_as_text_are_plain_ascii_numbers(client: TestClient) -> None:
    """float() read "1_700_000_000", " 1700000000" and fullwidth digits as times; they are a 422 now, while
    plain epoch text (a fraction, an exponent, a sign) still reads as the number."""
    for k, text in enumerate(["1700000000", "1.7e9", "+1700000000.5"]):
        body = {"entity_id": "t2", "event": {"event_id": f"epoch-{k}", "timestamp": text}}
        assert client.post("/decide", json=body).status_code == 200, text
    for k, text in enumerate(
        ["1_700_000_000", " 1700000000", "\uff11\uff17\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10"]
    ):
        body = {"entity_id": "t2", "event": {"event_id": f"lenient-{k}", "timestamp": text}}
        answer = client.post("/decide", json=body)
        assert answer.status_code == 422, text
        assert answer.json()["errors"][0]["field"] == "event.timestamp"
        assert "RFC 3339 text or epoch seconds" in answer.json()["errors"][0]["message"]


def test_an_event_time_far_ahead_of_the_clock_is_422_and_the_windows_stay_whole(client: TestClient) -> None:
    """One event dated 2099 (in range: years 2000-2100) became its entity's newest stored time: every later
    real event was "too late" for the windows, count_1h 0 from then on -- a burst invisible to the rules."""
    ahead = {"entity_id": "fut", "event": {"event_id": "fut-0", "timestamp": "2099-01-01T00:00:00Z"}}
    answer = client.post("/decide", json=ahead)
    assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "event.timestamp"
    assert "ahead of this server's clock" in answer.json()["detail"]
    now = time.time()
    for k in range(1, 4):
        body = {"entity_id": "fut", "event": {"event_id": f"fut-{k}", "timestamp": now - 10 + k}}
        decided = client.post("/decide", json=body).json()
    assert client.get(f"/decisions/{decided['decision_id']}").json()["features"]["count_1h"] == 3
    soon = {"entity_id": "fut", "event": {"event_id": "fut-4", "timestamp": now + 600}}  # clock skew: taken
    assert client.post("/decide", json=soon).status_code == 200
    batch = {"events": [{"event_id": "fut-5", "entity_id": "fut"}, {**ahead["event"], "entity_id": "fut"}]}
    answer = client.post("/events", json=batch)
    assert (
        answer.status_code == 422 and answer.json()["errors"][0]["field"] == "EventBatch.events.1.timestamp"
    )


def test_an_event_id_of_another_entitys_event_is_409_not_that_entitys_decision(client: TestClient) -> None:
    """Producers that number events per account reuse ids across accounts: B's event "1" was answered 200
    with A's decision (A's action, A's entity id) -- the answer of a retry, for a different event. Then it
    was a 409 but still counted in B's windows (B's next decision saw two events and 1,000 spent)."""
    first = client.post("/decide", json={"entity_id": "acct-a", "event": {"event_id": "n-1", "amount": 5}})
    other = client.post("/decide", json={"entity_id": "acct-b", "event": {"event_id": "n-1", "amount": 900}})
    assert other.status_code == 409, other.text
    assert "already the id of another entity's event" in other.json()["detail"]
    retry = client.post("/decide", json={"entity_id": "acct-a", "event": {"event_id": "n-1", "amount": 5}})
    assert retry.status_code == 200 and retry.json()["decision_id"] == first.json()["decision_id"]
    again = client.post("/decide", json={"entity_id": "acct-b", "event": {"event_id": "n-1", "amount": 900}})
    assert again.status_code == 409, again.text  # withdrawn from B's windows, refused again
    b_next = client.post("/decide", json={"entity_id": "acct-b", "event": {"event_id": "b-2", "amount": 100}})
    features = client.get(f"/decisions/{b_next.json()['decision_id']}").json()["features"]
    assert features["count_1h"] == 1 and features["sum_1h"] == 100


def test_a_leap_second_is_read_as_the_next_second(client: TestClient, tmp_path: Path) -> None:
    """``23:59:60Z`` (RFC 3339 5.7) was a 422 "must be RFC 3339 text" (Python's datetime has no second 60):
    the API and the CSV import now both read it as POSIX time does, the next second."""
    midnight = 1483228800.0  # 2017-01-01T00:00:00Z
    texts = ["2016-12-31T23:59:60Z", "2016-12-31t23:59:60.5z", "2016-12-31T15:59:60-08:00"]
    for k, text in enumerate(texts):
        body = {"entity_id": "t2", "event": {"event_id": f"leap-{k}", "timestamp": text}}
        assert client.post("/decide", json=body).status_code == 200, text
        assert Event(event_id="e", entity_id="t2", timestamp=text).timestamp == midnight + (k == 1) * 0.5
    for bad in ["2016-12-31T23:59:61Z", "2016-12-31T23:60:00Z"]:
        body = {"entity_id": "t2", "event": {"event_id": "leap-bad", "timestamp": bad}}
        assert "RFC 3339" in client.post("/decide", json=body).json()["detail"], bad
    csv_path, mapping = tmp_path / "leap.csv", tmp_path / "leap.yaml"
    csv_path.write_text("id,ts,bad\nu1,2016-12-31T23:59:60Z,0\nu1,2016-12-31T23:59:59.5Z,1\n")
    mapping.write_text("entity: {column: id}\ntime: {column: ts, unit: rfc3339}\nlabel: {column: bad}\n")
    assert load_csv(csv_path, mapping).events.timestamps.tolist() == [midnight - 0.5, midnight]


def test_stored_times_are_answered_with_their_utc_offset(client: TestClient) -> None:
    """SQLite keeps no zone: a time read back was answered without an offset ("2026-12-07T04:03:18"), which
    clients read as their own local time -- a repeated POST /outcome's received_at and GET /decisions'
    created_at, while the first POST /outcome said "+00:00"."""
    decided = client.post("/decide", json={"entity_id": "tz1", "event": {"event_id": "tz1"}}).json()
    body = {"decision_id": decided["decision_id"], "outcome": "success"}
    first, again = (client.post("/outcome", json=body).json() for _ in range(2))
    assert again["received_at"] == first["received_at"] and first["received_at"].endswith("+00:00")
    created = client.get(f"/decisions/{decided['decision_id']}").json()["created_at"]
    assert datetime.fromisoformat(created).utcoffset() == timedelta(0)


def test_an_event_without_an_amount_is_stored_without_one(client: TestClient) -> None:
    """It was stored with amount 0.0 -- the windows' value, not what the client sent: the console showed a
    payment of 0.00. Its windows and rules still read 0, and its outcome's reward is the amount-free one."""
    sent = {"entity_id": "na1", "event": {"event_id": "na1-1", "event_type": "login"}}
    decided = client.post("/decide", json=sent).json()
    stored = client.get(f"/decisions/{decided['decision_id']}").json()
    assert stored["amount"] is None
    assert stored["features"]["count_1h"] == 1 and stored["features"]["sum_1h"] == 0.0
    for amount in ({}, {"amount": 0}):  # retries: no amount and 0 are the same content (the windows' 0)
        again = {"entity_id": "na1", "event": {**sent["event"], **amount}}
        retried = client.post("/decide", json=again)
        assert retried.status_code == 200 and retried.json()["decision_id"] == decided["decision_id"]
    other = {"entity_id": "na1", "event": {**sent["event"], "amount": 5}}
    assert client.post("/decide", json=other).status_code == 409  # another event under the same id
    outcome = client.post("/outcome", json={"decision_id": decided["decision_id"], "outcome": "fraud"})
    assert outcome.status_code == 201 and outcome.json()["reward"] == pytest.approx(
        {0: -15.0, 1: 1.0, 2: 1.0}[decided["action"]]  # rewards.yaml's fraud row at amount 0
    )


# --- out-of-range values: 422, never a 500 from the database driver


@pytest.mark.parametrize(
    "path",
    [
        "/decisions/9223372036854775808",
        f"/decisions/{2**70}",
        "/decisions/0",
        "/decisions/-1",
        "/decisions/9223372036854775808/explanation",
        f"/decisions/{2**70}/explanation",
    ],
)
def test_decision_ids_outside_bigint_are_422(client: TestClient, path: str) -> None:
    assert _fields(client.get(path)) == ["path.decision_id"]


def test_the_largest_bigint_id_is_a_plain_404(client: TestClient) -> None:
    assert client.get(f"/decisions/{INT64_MAX}").status_code == 404


def test_an_outcome_for_an_id_outside_bigint_is_422(client: TestClient) -> None:
    response = client.post("/outcome", json={"decision_id": INT64_MAX + 1, "outcome": "success"})
    assert _fields(response) == ["decision_id"]
    response = _post_raw(client, "/outcome", '{"decision_id": 1, "outcome": "succ\\u0000ess"}')
    assert _fields(response) == ["outcome"]


@pytest.fixture
def admin(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> Iterator[TestClient]:
    platform = start_platform(make_settings(api_key=KEY, model_refresh_s=0))
    with TestClient(create_app(platform.settings, platform)) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "url", "field"),
    [
        ("GET", "/admin/models?kind=a%00", "query.kind"),
        ("GET", "/admin/models?kind=riskk", "query.kind"),
        ("POST", "/admin/models/rollback?kind=a%00", "query.kind"),
        ("GET", "/admin/models/compare?limit=99999999999999999999", "query.limit"),
        ("GET", "/admin/models/compare?limit=0", "query.limit"),
        ("GET", "/admin/models/compare?since=0001-01-01T00:00:00%2B01:00", "query.since"),
        ("GET", "/admin/models/compare?since=9999-12-31T23:59:59-01:00", "query.since"),
        ("GET", "/admin/models/compare?version=a%00", "query.version"),
        ("POST", "/admin/models/a%00/promote", "path.version"),
        ("POST", f"/admin/models/{'v' * 65}/shadow", "path.version"),
    ],
)
def test_admin_parameters_are_bounded(admin: TestClient, method: str, url: str, field: str) -> None:
    assert _fields(admin.request(method, url, headers=AUTH)) == [field]


def test_admin_accepts_every_known_kind(admin: TestClient) -> None:
    for kind in ("anomaly", "risk", "policy"):
        response = admin.get(f"/admin/models?kind={kind}", headers=AUTH)
        assert response.status_code == 200
        assert {m["kind"] for m in response.json()["models"]} == {kind}


# --- body size: chunked bodies too (no content-length to refuse them by)


def _chunks(size: int, chunk: int = 16 * 1024) -> Iterator[bytes]:
    yield b'{"entity_id": "c1", "event": {"event_id": "c1", "event_type": "x'
    for _ in range(size // chunk):
        yield b"a" * chunk
    yield b'"}}'


def test_a_chunked_body_over_the_limit_is_413_and_one_under_it_is_parsed(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> None:
    settings = make_settings()
    with serving(create_app(settings, start_platform(settings))) as url, httpx.Client(timeout=10.0) as http:
        big = http.post(f"{url}/decide", content=_chunks(1024 * 1024), headers=JSON)
        assert big.request.headers.get("transfer-encoding") == "chunked"
        assert big.status_code == 413 and "larger than" in big.json()["detail"]
        small = http.post(f"{url}/decide", content=_chunks(0), headers=JSON)
        assert small.request.headers.get("transfer-encoding") == "chunked"
        assert small.status_code == 200, small.text


# --- the OpenAPI schema tells the truth


def _operations(client: TestClient) -> Iterator[tuple[str, str, dict]]:
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        for method, operation in operations.items():
            yield method.upper(), path, operation


def _schema_ref(response: dict) -> str:
    return response["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]


def test_every_documented_error_has_the_apps_real_body(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for method, path, operation in _operations(client):
        for code, response in operation["responses"].items():
            if code == "422":
                assert _schema_ref(response) == "ValidationErrorBody", (method, path)
            elif code[0] in "45" and path != "/ready":
                assert _schema_ref(response) == "ErrorBody", (method, path, code)
            if code == "503":
                assert response["headers"]["Retry-After"]["schema"] == {"type": "integer"}, (method, path)


def test_each_route_documents_the_codes_it_answers(client: TestClient) -> None:
    operations = {(m, p): op for m, p, op in _operations(client)}
    codes = {key: set(op["responses"]) for key, op in operations.items()}
    for method, path in codes:
        if "requestBody" in operations[method, path]:
            assert {"413", "422"} <= codes[method, path], path
        if path.startswith("/admin"):
            assert {"401", "403"} <= codes[method, path], path
    assert {"404", "409", "503"} <= codes["POST", "/outcome"]
    assert {"404", "422", "503"} <= codes["GET", "/decisions/{decision_id}"]
    assert "503" in codes["POST", "/decide"] and "503" in codes["POST", "/events"]


def test_the_decision_record_is_typed_with_the_tables_columns(client: TestClient) -> None:
    documented = client.get("/openapi.json").json()["components"]["schemas"]["StoredDecision"]
    decision = client.post("/decide", json={"entity_id": "t1"}).json()
    stored = client.get(f"/decisions/{decision['decision_id']}").json()
    assert set(stored) == set(documented["properties"]) == set(decisions.columns.keys())
    assert isinstance(stored["created_at"], str)
