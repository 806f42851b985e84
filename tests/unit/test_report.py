"""`decision-platform report`: a static HTML page of a time range, built from the decisions table."""

from __future__ import annotations

import base64
import io
import re
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from decision_platform.cli.report import report
from decision_platform.config import get_settings
from decision_platform.reporting import parse_time, write_report

IMAGE = re.compile(r"<img alt='([^']+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def corrupt_features(client: TestClient, entity_id: str) -> None:
    """A key of the wrong type where the entity's windows live: the feature store cannot read its windows."""
    store = client.app.state.platform.store
    store.client.set(store.keys(entity_id)[0], b"not a sorted set")


def decide(client: TestClient, entity: str, event_id: str | None = None, **event: object) -> dict:
    body: dict = {"entity_id": entity}
    if event_id:
        body["event"] = {"event_id": event_id, "amount": 20.0, **event}
    response = client.post("/decide", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def row(html: str, label: str) -> str:
    match = re.search(rf"<tr><th>{re.escape(label)}</th><td class='n'>([^<]*)</td></tr>", html)
    assert match, f"no {label!r} row"
    return match.group(1)


def test_report_shows_the_range_decisions_charts_and_outcomes(client: TestClient, tmp_path: Path) -> None:
    decide(client, "early", "e-early")  # before the range
    time.sleep(0.05)
    since = datetime.now(UTC)
    corrupt_features(client, "broken")
    made = [
        decide(client, "r1", "e1"),
        decide(client, "r2", "e2", amount=9000.0),  # large_amount_step_up fires
        decide(client, "r3", "e3", attributes={"device_id": "dev-known-stolen-0001"}),  # denylist: block
        decide(client, "broken", "e4"),  # fallback
        decide(client, "r5"),
    ]
    outcome = client.post("/outcome", json={"decision_id": made[0]["decision_id"], "outcome": "success"})
    assert outcome.status_code == 201
    out = tmp_path / "report.html"

    data = write_report(
        client.app.state.platform.repository.engine, since, datetime.now(UTC) + timedelta(seconds=1), out
    )

    assert data.count == len(made)
    assert Counter(data.actions.tolist()) == Counter(d["action"] for d in made)
    assert data.fallbacks == {"entity_windows_unreadable": 1}
    assert data.rule_hits == Counter(rule["name"] for d in made for rule in d["rules"])
    assert {"large_amount_step_up", "denylisted_device"} <= set(data.rule_hits)
    html = out.read_text("utf-8")
    assert row(html, "decisions") == "5"
    assert row(html, "block").startswith(str(sum(d["action"] == 2 for d in made)))
    assert row(html, "fallbacks") == "1 (20.0%)"
    assert row(html, "success") == f"1, mean reward {outcome.json()['reward']:+.2f}"
    images = IMAGE.findall(html)
    assert [title for title, _ in images] == [
        "Actions over time",
        "Latency percentiles",
        "Risk histogram",
        "Rule hits",
        "Fallbacks",
    ]
    for title, encoded in images:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
            assert image.format == "PNG", title
            assert image.width > 400 and image.height > 100, title


def test_a_range_without_decisions_says_so(client: TestClient, tmp_path: Path) -> None:
    decide(client, "r1", "e1")
    later = datetime.now(UTC) + timedelta(hours=1)
    data = write_report(
        client.app.state.platform.repository.engine, later, later + timedelta(hours=1), tmp_path / "r.html"
    )
    assert data.count == 0
    html = (tmp_path / "r.html").read_text("utf-8")
    assert "No decisions in this range." in html
    assert not IMAGE.search(html)


def test_a_range_back_to_the_first_years_or_on_to_9999_is_charted_at_once(
    client: TestClient, tmp_path: Path
) -> None:
    """``report --since 1970-01-01`` (everything there is) drew one bar per week since 1970 and ``--until
    9999-12-31`` one per week to then (417,000: minutes of CPU, no page); ``--since 0001-01-01`` was a
    ValueError traceback (its first week began in year 0). The buckets widen with the range now."""
    decide(client, "w1", "w-e1")
    engine = client.app.state.platform.repository.engine
    for since, until in (
        (datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        (datetime(1, 1, 1, tzinfo=UTC), datetime.now(UTC)),
    ):
        started = time.monotonic()
        data = write_report(engine, since, until, tmp_path / "r.html")
        assert data.count == 1 and time.monotonic() - started < 20
        assert len(IMAGE.findall((tmp_path / "r.html").read_text("utf-8"))) >= 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("90m", NOW - timedelta(minutes=90)),
        ("7d", NOW - timedelta(days=7)),
        ("2026-11-01T00:00:00Z", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T02:00:00+02:00", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01 00:00", datetime(2026, 11, 1, tzinfo=UTC)),  # no offset: UTC
        # as the API reads event times (they were "expected ... an ISO 8601 time": a 422 in the console)
        ("2016-12-31T23:59:60Z", datetime(2017, 1, 1, tzinfo=UTC)),  # a leap second: the next second
        ("2026-11-01t00:00:00z", datetime(2026, 11, 1, tzinfo=UTC)),
    ],
)
def test_time_arguments(text: str, expected: datetime) -> None:
    assert parse_time(text, NOW) == expected


def test_report_command_writes_the_page(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decide(client, "c1", "c-e1")
    settings = client.app.state.platform.settings
    monkeypatch.setenv("DP_DATABASE_URL", settings.database_url)
    app = typer.Typer()
    app.command()(report)
    get_settings.cache_clear()
    try:
        out = tmp_path / "page.html"
        result = CliRunner().invoke(app, ["--since", "1h", "--out", str(out)])
        bad = CliRunner().invoke(app, ["--since", "yesterday"])
        # A directory, or a place nothing can be written, was an IsADirectoryError / OSError traceback.
        unwritable = [CliRunner().invoke(app, ["--out", str(where)]) for where in (tmp_path, "/proc/x.html")]
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "1 decisions from" in result.output and out.exists()
    assert bad.exit_code == 2 and "an age like 6h" in bad.output
    for refused, why in zip(unwritable, ("Is a directory", "No such file or directory"), strict=True):
        unboxed = " ".join(refused.output.replace("\u2502", " ").split())  # typer boxes it at 80 columns
        assert refused.exit_code == 2 and f"cannot write the report: {why}" in unboxed, refused.output


def test_latency_chart_shows_what_each_decision_took(client: TestClient, tmp_path: Path) -> None:
    since = datetime.now(UTC)
    for i in range(3):
        decide(client, f"l{i}", f"l-e{i}")
    data = write_report(
        client.app.state.platform.repository.engine,
        since,
        datetime.now(UTC) + timedelta(seconds=1),
        tmp_path / "r.html",
    )
    assert data.count == 3
    assert (data.latency_ms > 0).all()
