"""Readers of many stored decisions skip a damaged row and go on: ``retrain``'s logged decisions, the shadow
comparison, the rules backtest and the report. A row a hand edit or an older version left (a JSON string
where a list goes, a mask of two, an action of 3, an infinite amount) stopped each of them with a traceback.

Readers of one stored decision refuse it by name (409 on the API, a dead letter on the stream) or show it
as stored (the console): its record, its explanation, its console page, a retry of its event.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from markupsafe import escape
from prometheus_client import REGISTRY

from decision_platform.api.app import create_app
from decision_platform.config import Settings
from decision_platform.core.rewards import RewardTable
from decision_platform.events.messages import RawMessage
from decision_platform.learning.backtest import backtest
from decision_platform.learning.compare import compare_shadow
from decision_platform.learning.logged import load_logged
from decision_platform.reporting.data import load
from decision_platform.rules.ruleset import RuleSet
from decision_platform.serving.platform import Platform
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.decisions import damaged
from decision_platform.storage.errors import DamagedRowError, is_data_error
from decision_platform.storage.repository import Repository
from tests.conftest import CONFIG_DIR, decision_row
from tests.unit.test_console import csrf_of, ids_on, make_id

NOW = datetime.now(UTC)
SHADOW = {"version": "policy-shadow", "action": 0, "probabilities": [0.8, 0.1, 0.1]}
#: (column, value): each makes one row damaged; the columns the readers take for granted.
DAMAGE = [
    ("features", 5),
    ("features", {"amount": "high"}),
    ("amount", math.inf),
    ("probabilities", [0.5, 0.5]),
    ("probabilities", "allow"),
    ("action_mask", [True, True]),
    ("action", 3),
    ("action", -1),
    ("rules_fired", ["velocity_step_up"]),
    ("rules_fired", {"name": "velocity_step_up"}),
    ("rules_fired", [{"name": "velocity_step_up"}]),
    ("attributes", ["device"]),
    ("model_versions", "policy-1"),
    ("shadow", {"version": "policy-shadow"}),
    ("shadow", {**SHADOW, "action": "allow"}),
    ("reasons", [{"feature": "amount", "value": 2, "direction": "raises_risk", "weight": 1, "typical": 7}]),
    ("rules_fired", [{"name": "big", "tier": "floor", "inputs": [{"feature": "amount", "typical": "low"}]}]),
]
#: Damage beneath what storage checks, which the API's record schema refuses: a fired rule without its
#: description, a model version that is not text.
SCHEMA_DAMAGE = [
    ("rules_fired", [{"name": "velocity_step_up", "tier": "floor"}]),
    ("model_versions", {"risk": 5}),
]


def stored(tmp_path: Path) -> Repository:
    """Eight intact decisions (with a shadow's choice and an outcome each) and one damaged row per case."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    repository = Repository(engine)
    at = NOW - timedelta(minutes=30)
    intact = [
        decision_row(
            make_id(at + timedelta(seconds=i), i),
            entity_id=f"e{i % 3}",
            created_at=at + timedelta(seconds=i),
            features={"amount": 20.0 + i, "count_1m": 1.0},
            rules_fired=[{"name": "large_amount_step_up", "tier": "floor"}],
            shadow=SHADOW,
        )
        for i in range(8)
    ]
    broken = [
        decision_row(
            make_id(at + timedelta(seconds=100 + k), 100 + k),
            created_at=at + timedelta(seconds=100 + k),
            **{"shadow": SHADOW, column: value},
        )
        for k, (column, value) in enumerate(DAMAGE)
    ]
    assert [damaged(r) for r in intact] == [None] * 8
    assert all(damaged(r) for r in broken)
    repository.insert_decisions(intact + broken)
    for row in intact:
        repository.record_outcome(row["id"], "legit", 1.0, NOW)
    return repository


def said(decision_id: int, column: str, value: object) -> str:
    """How a damaged decision is named (the start of it: a long value is cut)."""
    return f"decision {decision_id} is stored damaged: {column} holds {repr(value)[:60]}"


def skipped(reader: str) -> float:
    return REGISTRY.get_sample_value("dp_damaged_rows_total", {"reader": reader}) or 0.0


#: The columns of DAMAGE each reader reads: a row damaged elsewhere is no harm to it, and it keeps the row.
READS = {
    "logged decisions": {
        "features",
        "amount",
        "probabilities",
        "action_mask",
        "action",
        "model_versions",
        "shadow",
    },
    "shadow comparison": {"features", "probabilities", "action_mask", "action", "model_versions", "shadow"},
    "rules backtest": {
        "features",
        "amount",
        "probabilities",
        "action_mask",
        "action",
        "rules_fired",
        "attributes",
    },
    "report": {"action", "rules_fired"},
}


def test_retrain_compare_backtest_and_report_skip_the_damaged_rows(tmp_path: Path) -> None:
    repository = stored(tmp_path)
    before = {reader: skipped(reader) for reader in READS}
    kept = {
        reader: 8 + sum(column not in columns for column, _ in DAMAGE) for reader, columns in READS.items()
    }

    logged = load_logged(repository, ["amount", "count_1m"])
    assert len(logged) == kept["logged decisions"]

    comparison = compare_shadow(repository.shadow_decisions(), 0.01, (0, 1))
    assert comparison.decisions == kept["shadow comparison"] and comparison.with_outcome == 8

    rules = RuleSet.from_text(
        "rules:\n  - {name: burst, tier: block, when: count_1m >= 20}\n", ["amount", "count_1m"]
    )
    rewards = RewardTable.load(CONFIG_DIR / "rewards.yaml")
    replayed = backtest(repository, rules, rewards, NOW - timedelta(hours=1), NOW + timedelta(minutes=1))
    assert replayed.decisions == kept["rules backtest"]

    report = load(repository.engine, NOW - timedelta(hours=1), NOW + timedelta(minutes=1))
    assert report.count == kept["report"] and report.rule_hits == {"large_amount_step_up": 8}

    moved = {reader: skipped(reader) - n for reader, n in before.items()}
    assert moved == {reader: 8 + len(DAMAGE) - kept[reader] for reader in READS}, moved


@pytest.mark.parametrize(("column", "value"), DAMAGE, ids=[f"{c}={v!r}" for c, v in DAMAGE])
def test_damaged_names_the_decision_and_the_column(column: str, value: object) -> None:
    problem = damaged(decision_row(7, **{column: value}))
    assert problem is not None and str(problem).startswith(said(7, column, value))


@pytest.fixture
def one_each(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> Iterator[tuple[TestClient, Platform, list[dict]]]:
    """The API over one stored decision per case of DAMAGE then SCHEMA_DAMAGE, each of its own entity and
    event, and last an intact one."""
    settings = make_settings()
    platform = start_platform(settings)
    cases = [*DAMAGE, *SCHEMA_DAMAGE, ("shadow", SHADOW)]
    rows = [
        decision_row(
            make_id(NOW - timedelta(seconds=len(cases) - k), k),
            **{
                "entity_id": f"d{k}",
                "event_id": f"stored-{k}",
                "event_type": "payment",
                "amount": 25.0,
                "created_at": NOW - timedelta(seconds=len(cases) - k),
                "shadow": SHADOW,
                column: value,
            },
        )
        for k, (column, value) in enumerate(cases)
    ]
    platform.repository.insert_decisions(rows)
    with TestClient(create_app(settings, platform)) as client:
        yield client, platform, rows


def test_a_damaged_decisions_record_is_a_409_naming_the_column(one_each) -> None:
    """``GET /decisions/{id}`` answered 500 for most damage (the answer's own validation) and 200 with what
    the platform never decided for the rest (an action of 3, a shadow without its action)."""
    client, _, rows = one_each
    before = skipped("decision record")
    for (column, value), row in zip([*DAMAGE, *SCHEMA_DAMAGE], rows, strict=False):
        answer = client.get(f"/decisions/{row['id']}")
        assert answer.status_code == 409, (column, value, answer.text)
        assert answer.json()["detail"].startswith(said(row["id"], column, value))
    assert skipped("decision record") - before == len(DAMAGE) + len(SCHEMA_DAMAGE)
    assert client.get(f"/decisions/{rows[-1]['id']}").json()["shadow"] == SHADOW


def test_a_damaged_decisions_explanation_is_a_409_naming_it(one_each) -> None:
    """Its facts failed to build (action 3: IndexError, fired rules as strings: AttributeError): 500."""
    client, _, rows = one_each
    before = skipped("explanation")
    for (column, value), row in zip(DAMAGE, rows, strict=False):
        answer = client.get(f"/decisions/{row['id']}/explanation")
        assert answer.status_code == 409, (column, value, answer.text)
        assert answer.json()["detail"].startswith(said(row["id"], column, value))
    assert skipped("explanation") - before == len(DAMAGE)
    for row in rows[len(DAMAGE) :]:  # beneath storage's check: facts are built from what is there
        assert client.get(f"/decisions/{row['id']}/explanation").status_code == 200


def stored_narratives(one_each) -> list[tuple[str, object, int]]:
    """One intact decision per kind of damage of its stored narrative: (column, value, decision id)."""
    client, platform, rows = one_each
    facts = client.get(f"/decisions/{rows[-1]['id']}/explanation").json()["facts"]
    good = {
        "narrative": "Allowed.",
        "source": "llm",
        "model": "m",
        "prompt_version": "narrative-v2",
        "latency_ms": 1.0,
        "grounding": {"passed": True},
        "facts": facts,
        "created_at": NOW,
    }
    cases = [
        ("facts", 5),
        ("facts", {"decision_id": 1}),
        ("facts", {**facts, "risk_typical": 5}),
        ("grounding", []),
        ("grounding", {"reason": 5}),
        ("latency_ms", "fast"),
    ]
    made = []
    for k, (column, value) in enumerate(cases):
        decision = decision_row(make_id(NOW, 100 + k), entity_id=f"n{k}", created_at=NOW)
        platform.repository.insert_decisions([decision])
        platform.repository.insert_explanation({**good, "decision_id": decision["id"]})
        stored = json.dumps(value) if isinstance(value, dict | list) else value
        with platform.repository.engine.begin() as connection:  # as a hand edit would: past the types
            update = f"UPDATE explanations SET {column} = ? WHERE decision_id = ?"
            connection.exec_driver_sql(update, (stored, decision["id"]))
        made.append((column, value, decision["id"]))
    platform.repository.insert_explanation({**good, "decision_id": rows[-1]["id"]})
    return made


def test_a_stored_narrative_of_another_shape_gives_the_template_not_a_500(one_each) -> None:
    """A narrative row a hand edit left (facts that are no decision's facts, grounding that is no object)
    answered 500 on the API and on the console's decision page."""
    client, _, rows = one_each
    made = stored_narratives(one_each)
    before = skipped("stored explanation")
    for column, value, decision_id in made:
        answer = client.get(f"/decisions/{decision_id}/explanation")
        assert answer.status_code == 200, (column, value, answer.text)
        assert answer.json()["source"] == "template" and answer.json()["reason"] == "stored_damaged"
        page = client.get(f"/console/decisions/{decision_id}")
        assert page.status_code == 200 and "template (stored_damaged)" in page.text, (column, value)
    assert skipped("stored explanation") - before == 2 * len(made)
    assert client.get(f"/decisions/{rows[-1]['id']}/explanation").json()["source"] == "llm"


def test_cli_explain_names_a_damaged_decision_and_serves_the_template_for_a_damaged_narrative(
    one_each, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer
    from typer.testing import CliRunner

    from decision_platform.cli.explain import explain

    _, platform, rows = one_each
    made = stored_narratives(one_each)
    monkeypatch.setattr("decision_platform.cli.explain.get_settings", lambda: platform.settings)
    app = typer.Typer()
    app.command("explain")(explain)
    app.command("noop")(lambda: None)  # two commands: typer then expects the command name
    for (column, value), row in zip(DAMAGE, rows, strict=False):
        result = CliRunner().invoke(app, ["explain", str(row["id"])], terminal_width=400)
        printed = " ".join(result.output.split())  # rich wraps at its own width
        assert result.exit_code == 1 and said(row["id"], column, value)[:70] in printed, result.output
    for column, value, decision_id in made:
        result = CliRunner().invoke(app, ["explain", str(decision_id)], terminal_width=400)
        assert result.exit_code == 0, (column, value, result.output)
        assert "source: template (stored_damaged)" in result.output


def test_the_console_shows_a_damaged_decision_as_stored_under_a_notice(one_each) -> None:
    """Its page answered 500 (the template formatting probabilities "allow", naming action 3); so did the
    page of any decision of the same entity, whose timeline named the damaged one's action."""
    client, platform, rows = one_each
    before = skipped("console decision")
    for (column, value), row in zip(DAMAGE, rows, strict=False):
        page = client.get(f"/console/decisions/{row['id']}")
        assert page.status_code == 200, (column, value, page.text[-500:])
        assert f"<strong>damaged: {column}</strong>" in page.text
        assert f"<th>{column}</th><td><code>{escape(json.dumps(value))}</code>" in page.text
    assert skipped("console decision") - before == len(DAMAGE)
    for row in rows[len(DAMAGE) :]:  # beneath storage's check: the page as usual
        page = client.get(f"/console/decisions/{row['id']}")
        assert page.status_code == 200 and 'id="damaged"' not in page.text

    # An intact decision of the entity whose decision holds action 3: that one is left out of its timeline.
    neighbour = rows[DAMAGE.index(("action", 3))]
    later = decision_row(make_id(NOW, 200), entity_id=neighbour["entity_id"], created_at=NOW)
    platform.repository.insert_decisions([later])
    before = skipped("console timeline")
    page = client.get(f"/console/decisions/{later['id']}")
    assert page.status_code == 200 and f"/console/decisions/{neighbour['id']}" not in page.text
    assert skipped("console timeline") - before == 1

    # Labelling it from the console: the outcome rules' refusal, on its page.
    label = {"outcome": "fraud", "csrf": csrf_of(page.text)}
    answer = client.post(f"/console/decisions/{neighbour['id']}/outcome", data=label)
    assert answer.status_code == 409 and said(neighbour["id"], "action", 3) in answer.text


def test_a_retry_of_an_event_whose_decision_is_stored_damaged_is_refused_not_decided_again(one_each) -> None:
    """``/decide`` answered a retry with the damaged row as it was (500 for an action of 3, "block" for -1,
    200 with fired rules as strings), and the stream worker published it for a redelivered event."""
    client, platform, rows = one_each
    before, stored = skipped("retried event"), platform.repository.count_decisions()
    events = [
        {"event_id": row["event_id"], "entity_id": row["entity_id"], "amount": 25.0, "event_type": "payment"}
        for row in rows
    ]
    for (column, value), row, event in zip(DAMAGE, rows, events, strict=False):
        answer = client.post("/decide", json={"entity_id": row["entity_id"], "event": event})
        assert answer.status_code == 409, (column, value, answer.text)
        detail = answer.json()["detail"]
        assert detail.startswith(f"event_id {row['event_id']!r} was decided before, but decision {row['id']}")
        assert said(row["id"], column, value) in detail
        assert detail.endswith(": the event is not decided again")
    worker = platform.inline_worker
    assert worker is not None
    redelivered = [RawMessage(json.dumps(event).encode()) for event in events[: len(DAMAGE)]]
    summary = worker.process(redelivered)
    assert summary.dead_lettered == len(DAMAGE) and summary.decided == 0
    letters = worker.sink.dead_letters[-len(DAMAGE) :]
    assert [message for message, _ in letters] == redelivered
    assert all(" was decided before, but decision " in error for _, error in letters)
    assert platform.repository.count_decisions() == stored  # no event decided twice
    assert skipped("retried event") - before == 2 * len(DAMAGE)
    retried = client.post("/decide", json={"entity_id": rows[-1]["entity_id"], "event": events[-1]})
    assert retried.status_code == 200 and retried.json()["decision_id"] == rows[-1]["id"]


def test_a_retry_whose_first_decision_only_the_answers_schema_refuses_is_refused_too(one_each) -> None:
    """A fired rule without its description, a model version that is not text: storage's check lets them
    by, and ``/decide`` answered the retry 200 with them, against its own schema."""
    client, _, rows = one_each
    before = skipped("retried event")
    schema_rows = rows[len(DAMAGE) : len(DAMAGE) + len(SCHEMA_DAMAGE)]
    for (column, value), row in zip(SCHEMA_DAMAGE, schema_rows, strict=True):
        event = {"event_id": row["event_id"], "entity_id": row["entity_id"], "amount": 25.0}
        answer = client.post(
            "/decide", json={"entity_id": row["entity_id"], "event": {**event, "event_type": "payment"}}
        )
        assert answer.status_code == 409, (column, value, answer.text)
        detail = answer.json()["detail"]
        assert detail.startswith(f"event_id {row['event_id']!r} was decided before, but decision {row['id']}")
        assert said(row["id"], column, value) in detail
    assert skipped("retried event") - before == len(SCHEMA_DAMAGE)


def _wrapped(error: Exception) -> sa.exc.DBAPIError:
    """``error`` as SQLAlchemy raises it from a statement."""
    return sa.exc.DBAPIError.instance("SELECT ...", {}, error, Exception)  # type: ignore[arg-type]


#: (driver error, whether it is a statement refused for its data): SQLite tells them apart by words only.
REFUSALS = [
    (sqlite3.OperationalError("malformed JSON"), True),
    (psycopg.errors.InvalidParameterValue("cannot extract elements from a scalar"), True),
    (psycopg.errors.NumericValueOutOfRange("integer out of range"), True),
    (sqlite3.OperationalError("no such table: decisions"), False),
    (sqlite3.OperationalError("database is locked"), False),
    (psycopg.OperationalError("connection refused"), False),
    (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), False),
]


@pytest.mark.parametrize(("error", "data"), REFUSALS, ids=[str(e) for e, _ in REFUSALS])
def test_a_statement_refused_for_its_data_is_told_from_an_outage(error: Exception, data: bool) -> None:
    assert is_data_error(_wrapped(error)) is data and is_data_error(error) is data
    assert not is_data_error(TimeoutError())


def test_a_read_the_database_refuses_for_a_rows_data_is_a_409_not_an_outage(one_each) -> None:
    """SQLite's "malformed JSON" from a read (a JSON function on a row a hand edit left) was taken for an
    outage: the database marked down, /ready 503, decisions spooled, the request 503."""
    client, platform, _ = one_each
    row = decision_row(make_id(NOW, 300), entity_id="raw", created_at=NOW)
    platform.repository.insert_decisions([row])
    with platform.repository.engine.begin() as connection:  # text that is not JSON: only SQLite holds it
        update = "UPDATE decisions SET rules_fired = 'velocity_step_up' WHERE id = ?"
        connection.exec_driver_sql(update, (row["id"],))

    def first_rules() -> list:
        with platform.repository.engine.connect() as connection:
            read = "SELECT json_extract(rules_fired, '$[0].name') FROM decisions"
            return list(connection.exec_driver_sql(read))

    before = skipped("database read")
    with pytest.raises(
        DamagedRowError, match=r"cannot read what it holds for this request \(malformed JSON\)"
    ):
        platform.writer.query(first_rules)
    assert skipped("database read") - before == 1
    assert platform.writer.database_up
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    answer = client.post("/decide", json={"entity_id": "after"})
    assert answer.status_code == 200 and platform.writer.status().pending == 0  # stored, not spooled


#: Text that is not JSON at all in a JSON column: SQLite keeps what a hand edit writes (jsonb refuses it).
NOT_JSON = [
    ("features", "high"),
    ("probabilities", "allow"),
    ("rules_fired", "velocity_step_up"),
    ("shadow", "policy-shadow"),
]


def test_text_that_is_not_json_is_read_as_a_damaged_column_not_a_failed_read(one_each) -> None:
    """Every read of such a row raised the JSON parser's error (the row's pages, every queue page holding
    it, retrain: 500s and tracebacks), and SQLite's JSON functions failed the rule filter and the shadow
    comparison with "malformed JSON"."""
    client, platform, _ = one_each
    rows = [
        decision_row(make_id(NOW, 400 + k), entity_id=f"t{k}", action=1, created_at=NOW, shadow=SHADOW)
        for k in range(len(NOT_JSON))
    ]
    platform.repository.insert_decisions(rows)
    with platform.repository.engine.begin() as connection:
        for (column, text), row in zip(NOT_JSON, rows, strict=True):
            connection.exec_driver_sql(f"UPDATE decisions SET {column} = ? WHERE id = ?", (text, row["id"]))
    for (column, text), row in zip(NOT_JSON, rows, strict=True):
        answer = client.get(f"/decisions/{row['id']}")
        assert answer.status_code == 409 and answer.json()["detail"] == said(row["id"], column, text)
        assert f"<strong>damaged: {column}</strong>" in client.get(f"/console/decisions/{row['id']}").text
    queue = client.get("/console/queue?action=any&limit=200")
    assert queue.status_code == 200 and {r["id"] for r in rows} <= set(ids_on(queue.text))
    filtered = client.get("/console/queue?action=any&rule=velocity_step_up")  # "malformed JSON": a 409
    assert filtered.status_code == 200 and rows[2]["id"] not in ids_on(filtered.text)
    shadowed = {r["id"] for r in platform.repository.shadow_decisions()}
    assert {r["id"] for r in rows[:3]} <= shadowed and rows[3]["id"] not in shadowed
    load_logged(platform.repository, ["amount", "count_1m"])  # raised JSONDecodeError
    assert client.get("/ready").status_code == 200


def test_a_row_the_driver_cannot_convert_is_that_requests_409_not_an_outage(one_each) -> None:
    """A created_at holding text that is no time (SQLite keeps what a hand edit writes): SQLAlchemy's own
    conversion of the row raises ValueError, which ``writer.query`` took for a database outage -- the
    database marked down, every decision spooled, /ready 503 -- because one row could not be read."""
    client, platform, _ = one_each
    row = decision_row(make_id(NOW, 500), entity_id="when", created_at=NOW)
    platform.repository.insert_decisions([row])
    with platform.repository.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE decisions SET created_at = 'yesterday' WHERE id = ?", (row["id"],))
    before = skipped("database read")
    answer = client.get(f"/decisions/{row['id']}")
    assert answer.status_code == 409 and "cannot read what it holds" in answer.json()["detail"]
    assert skipped("database read") - before == 1
    assert platform.writer.database_up
    assert client.get("/ready").status_code == 200
    answer = client.post("/decide", json={"entity_id": "after"})
    assert answer.status_code == 200 and platform.writer.status().pending == 0  # stored, not spooled
