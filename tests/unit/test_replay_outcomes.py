"""`decision-platform replay --to http --outcomes`: the learning loop from the command line.

The real API runs under uvicorn in a thread on a free local port, so that the replay goes through
HTTP exactly as it does against `decision-platform serve`; the checks read the platform's database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from decision_platform.api.app import create_app
from decision_platform.cli import main as cli
from decision_platform.config import PROJECT_ROOT, Settings
from decision_platform.core.rewards import RewardTable
from decision_platform.data import generate
from decision_platform.learning import replay as replaying
from decision_platform.serving.platform import Platform
from decision_platform.storage.tables import decisions, outcomes
from tests.live_server import serving

REWARDS = RewardTable.load(PROJECT_ROOT / "config" / "rewards.yaml")
DELAY_S = 0.2
HTTP_TIMEOUT_S = 5.0

#: What the true label (0 good, 1 fraud) and the action (0 allow, 1 throttle, 2 block) can lead to.
POSSIBLE_OUTCOMES = {
    (0, 0): {"success"},
    (0, 1): {"success", "abandoned"},
    (0, 2): {"false_positive"},
    (1, 0): {"chargeback"},
    (1, 1): {"fraud", "chargeback"},
    (1, 2): {"fraud"},
}


@dataclass
class LiveApi:
    url: str
    platform: Platform
    settings: Settings


@pytest.fixture
def live_api(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> Iterator[LiveApi]:
    """The API served by uvicorn on 127.0.0.1."""
    settings = make_settings()
    platform = start_platform(settings)
    with serving(create_app(settings, platform)) as url:
        yield LiveApi(url, platform, settings)


def _as_seconds(value: datetime) -> float:
    # SQLite gives naive datetimes back (stored as UTC); PostgreSQL aware ones.
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _table(output: str, title: str) -> dict[str, str]:
    """A one-row rich table of the CLI's output, as {column: cell}."""
    lines = output[output.index(title) :].splitlines()
    header, row = (line for line in lines if line.startswith(("┃", "│")))
    cells = [[c.strip() for c in line.strip("┃│").split(sep)] for line, sep in ((header, "┃"), (row, "│"))]
    return dict(zip(*cells, strict=True))


def test_cli_replay_posts_ground_truth_outcomes_after_the_delay(
    live_api: LiveApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "get_settings", lambda: live_api.settings)
    args = ["--entities", "40", "--days", "1", "--seed", "4"]
    result = CliRunner().invoke(
        cli.app,
        [
            "replay",
            "--to",
            "http",
            "--url",
            live_api.url,
            "--outcomes",
            "--outcome-delay",
            str(DELAY_S),
            "--limit",
            "60",
            "--rate",
            "0",
            "--concurrency",
            "2",
            *args,
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "outcomes (0.2 s after each decision)" in result.output

    data = generate(n_entities=40, days=1, seed=4)
    labels = {e.event_id: int(label) for e, label in zip(data.events[:60], data.labels[:60], strict=True)}
    assert 0 < sum(labels.values()) < 60  # both frauds and good events in the slice
    query = sa.select(
        decisions.c.event_id,
        decisions.c.action,
        decisions.c.amount,
        decisions.c.created_at,
        outcomes.c.outcome,
        outcomes.c.reward,
        outcomes.c.received_at,
    ).select_from(decisions.outerjoin(outcomes, outcomes.c.decision_id == decisions.c.id))
    with live_api.platform.repository.engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    assert {r["event_id"] for r in rows} == set(labels)  # one decision per event, nothing else
    simulation = REWARDS.simulation
    seen: dict[str, int] = {}
    for row in rows:
        label, action = labels[row["event_id"]], row["action"]
        assert row["outcome"] is not None, f"no outcome for {row['event_id']}"
        assert row["outcome"] in POSSIBLE_OUTCOMES[label, action], (label, action, row["outcome"])
        # Reproducible: the same seed and event give the same draw.
        expected = replaying.ground_truth_outcome(row["event_id"], label, action, 4, simulation)
        assert row["outcome"] == expected
        assert row["reward"] == pytest.approx(REWARDS.reward(row["outcome"], action, row["amount"]))
        lag = _as_seconds(row["received_at"]) - _as_seconds(row["created_at"])
        assert lag >= DELAY_S - 1e-3, (row["event_id"], lag)
        assert lag < DELAY_S + 10.0, (row["event_id"], lag)  # not held back until the end
        seen[row["outcome"]] = seen.get(row["outcome"], 0) + 1
    # The final table counts the same outcomes.
    table = _table(result.output, "outcomes (0.2 s after each decision)")
    assert table == {"posted": "60", "conflicts (409)": "0", "failed": "0"} | {
        name: str(count) for name, count in seen.items()
    }


def test_repeated_events_conflicts_and_unlabelled_events_are_counted_not_fatal(live_api: LiveApi) -> None:
    data = generate(n_entities=20, days=1, seed=3)
    first, second, unlabelled = replaying.shift_to_now(data.events[:3])
    labels = {first.event_id: int(data.labels[0]), second.event_id: int(data.labels[1])}
    # `first` was decided before, and an outcome the true label cannot lead to was recorded for it:
    # the replay's own outcome for it must then come back 409, counted as a conflict.
    with httpx.Client(base_url=live_api.url, timeout=HTTP_TIMEOUT_S) as client:
        body = {"entity_id": first.entity_id, "event": first.model_dump(mode="json")}
        decided = client.post("/decide", json=body).json()
        wrong = "chargeback" if labels[first.event_id] == 0 else "success"
        assert (
            client.post(
                "/outcome", json={"decision_id": decided["decision_id"], "outcome": wrong}
            ).status_code
            == 201
        )

    reporter = replaying.OutcomeReporter(
        live_api.url, labels, REWARDS.simulation, delay_s=DELAY_S, seed=1, timeout_s=HTTP_TIMEOUT_S
    )
    send = replaying.http_sender(live_api.url, timeout_s=HTTP_TIMEOUT_S, outcomes=reporter)
    started = time.monotonic()
    try:
        # `second` twice: the repeat is the same decision (a 200 from /decide); its outcome is posted
        # again, and the same outcome again is a 200 from /outcome: fine.
        events = [first, second, second, unlabelled]
        summary = replaying.replay(events, send, rate=0, chunk=1, outcomes=reporter)
    finally:
        reporter.close()
    assert time.monotonic() - started >= DELAY_S  # replay() waited for the outcomes
    assert (summary.acknowledged, summary.errors) == (4, 0)
    assert summary.outcomes_posted == 2
    assert summary.outcomes_conflicts == 1
    assert summary.outcomes_failed == 1
    assert "no label for event" in (summary.first_outcome_error or "")
    assert sum(summary.outcomes.values()) == 2 and len(summary.outcomes) == 1
    repository = live_api.platform.repository
    kept = repository.get_outcome(decided["decision_id"])
    assert kept is not None and kept.outcome == wrong  # outcomes are final
    repeated = repository.get_decision_by_event(second.event_id)
    assert repeated is not None
    posted = repository.get_outcome(repeated.id)
    assert posted is not None and posted.outcome in summary.outcomes
    assert repository.get_decision_by_event(unlabelled.event_id) is not None


def test_outcomes_need_http() -> None:
    result = CliRunner().invoke(cli.app, ["replay", "--to", "kafka", "--outcomes"], terminal_width=200)
    assert result.exit_code == 2
    assert "--outcomes needs --to http" in result.output


def test_a_replay_over_stored_damaged_decisions_counts_them_and_goes_on(live_api: LiveApi) -> None:
    """Events replayed again whose first decisions a hand edit damaged: each is a 409 naming the damage,
    counted as the replay's error; the others are answered with their decisions and get their outcomes,
    and nothing is decided twice. (Before, an action of 3 was a 500 with a traceback, and an action of -1
    came back 200 as a block, whose outcome the replay then priced and posted.)"""
    data = generate(n_entities=20, days=1, seed=4)
    events = replaying.shift_to_now(data.events[:4])
    labels = {e.event_id: int(label) for e, label in zip(events, data.labels[:4], strict=True)}
    with httpx.Client(base_url=live_api.url, timeout=HTTP_TIMEOUT_S) as client:
        for event in events:
            client.post(
                "/decide", json={"entity_id": event.entity_id, "event": event.model_dump(mode="json")}
            )
    engine = live_api.platform.repository.engine
    with engine.begin() as connection:
        for event, damage in zip(events, ("action = 3", "action = -1"), strict=False):
            connection.exec_driver_sql(f"UPDATE decisions SET {damage} WHERE event_id = ?", (event.event_id,))
    reporter = replaying.OutcomeReporter(
        live_api.url, labels, REWARDS.simulation, delay_s=0.0, seed=1, timeout_s=HTTP_TIMEOUT_S
    )
    send = replaying.http_sender(live_api.url, timeout_s=HTTP_TIMEOUT_S, outcomes=reporter)
    try:
        summary = replaying.replay(events, send, rate=0, chunk=1, outcomes=reporter)
    finally:
        reporter.close()
    assert (summary.acknowledged, summary.errors) == (2, 2)
    assert (
        "HTTP 409" in (summary.first_error or "") and "is stored damaged: action holds" in summary.first_error
    )
    assert summary.outcomes_posted + summary.outcomes_conflicts == 2 and summary.outcomes_failed == 0
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(decisions)).scalar() == 4
