"""The analyst console in a real browser: Debian's chromium, headless, driven by Playwright (never a
browser download), against ``decision-platform serve`` in a subprocess on the real PostgreSQL.

Real decisions come from ``POST /decide`` (a card-testing burst the rules block, a velocity step-up, quiet
customers); seeded ones with known amounts make the what-if's answer known in advance, and one carries
HTML in its attributes. An analyst opens the queue, filters it, opens a decision, labels it (the outcome
row is in PostgreSQL with its reward), runs a what-if that changes a known number of decisions, and sees
the hostile attribute as text. ``CONSOLE_SCREENSHOTS=docs`` also writes the README's screenshots.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from decision_platform.config import PROJECT_ROOT, Settings
from decision_platform.core.rewards import RewardTable
from decision_platform.storage.database import make_engine
from decision_platform.storage.repository import Repository
from tests.conftest import CONFIG_DIR, PG_URL, decision_row
from tests.e2e.conftest import ApiServer
from tests.integration.conftest import pg_schema, query
from tests.unit.test_console import make_id

__all__ = ["pg_schema"]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REWARDS = RewardTable.load(CONFIG_DIR / "rewards.yaml")
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
#: Seeded decisions: (amount, action). The what-if adds a block rule for seeded amounts >= 100.
SEEDED = [(40.0, 1), (120.0, 1), (150.0, 0), (300.0, 2), (90.0, 1), (210.0, 1)]
WHATIF_RULE = """
  - name: review_seeded_large
    tier: block
    when: entity_id.startsWith("seed-") && amount >= 100.0
    description: Seeded large amounts are blocked in the what-if.
"""
ACTION_TIMEOUT_MS = 15_000


@pytest.fixture
def server(
    pg_schema: str, make_settings: Callable[..., Settings], trained: tuple[str, Path], tmp_path: Path
) -> Iterator[ApiServer]:
    with console_server(pg_schema, make_settings, trained, tmp_path) as api:
        yield api


@contextlib.contextmanager
def console_server(
    schema: str, make_settings: Callable[..., Settings], trained: tuple[str, Path], tmp_path: Path, **env: str
) -> Iterator[ApiServer]:
    """``decision-platform serve`` on the test's schema (migrated, with the champions), no LLM."""
    make_settings(database_url=PG_URL, database_schema=schema)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DP_")}
    environment |= {
        "DP_DATABASE_URL": PG_URL,
        "DP_DATABASE_SCHEMA": schema,
        "DP_FEATURE_STORE_URL": "memory://",
        "DP_MODEL_DIR": str(trained[1]),
        "DP_SPOOL_DIR": str(tmp_path / "spool"),
        "DP_CONFIG_DIR": str(CONFIG_DIR),
        "DP_POLICY_SEED": "0",
        "DP_LLM_URL": "none",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    api = ApiServer(environment, tmp_path, "console")
    try:
        yield api.start()
    finally:
        with contextlib.suppress(Exception):
            api.stop()
        api.kill()
        print(f"--- {api.log_path} (last lines) ---\n{api.tail()}")


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test installs it: scripts/install-chromium.sh)")
        pytest.skip("chromium is not installed (sh scripts/install-chromium.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile for every test
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()


def make_traffic(base_url: str) -> list[dict]:
    """Real decisions: a card-testing burst (blocked by rule), a velocity run (throttled), quiet customers."""
    answers = []
    with httpx.Client(base_url=base_url, timeout=10.0) as client:
        for i in range(24):
            event = {"event_id": f"burst-{i}", "amount": 1.0 + i % 3, "event_type": "payment"}
            answers.append(client.post("/decide", json={"entity_id": "card-tester", "event": event}))
        for entity in range(8):
            for i in range(3):
                event = {
                    "event_id": f"quiet-{entity}-{i}",
                    "amount": 20.0 + 7 * entity + i,
                    "event_type": "payment",
                    "attributes": {"country": "FR", "device_id": f"d-{entity}"},
                }
                answers.append(client.post("/decide", json={"entity_id": f"cust-{entity}", "event": event}))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    return [a.json() for a in answers]


def seed(schema: str) -> list[dict]:
    """Decisions with known amounts and actions under the live rules (none fires on them)."""
    now = datetime.now(UTC)
    rows = []
    for i, (amount, action) in enumerate(SEEDED):
        at = now - timedelta(minutes=20 - i)
        rows.append(
            decision_row(
                make_id(at, 4000 + i),
                created_at=at,
                entity_id=f"seed-{i}",
                event_id=f"seed-event-{i}",
                amount=amount,
                action=action,
                features={"amount": amount, "count_1m": 1.0, "count_5m": 1.0},
                event_type="payment",
                attributes={"note": HOSTILE, "channel": "web"},
                explanation="Seeded for the console test.",
            )
        )
    engine = make_engine(PG_URL, schema)
    Repository(engine).insert_decisions(rows)
    engine.dispose()
    return rows


def shoot(page: object, name: str) -> None:
    target = os.environ.get("CONSOLE_SCREENSHOTS")
    if target:
        directory = PROJECT_ROOT / target
        directory.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(directory / f"console-{name}.png"), full_page=True)  # type: ignore[attr-defined]


def test_an_analyst_reviews_labels_and_tries_a_rule(server: ApiServer, browser_page, pg_schema: str) -> None:
    page = browser_page
    decided = make_traffic(server.base_url)
    seeded = seed(pg_schema)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    # The queue: throttles and blocks, newest first; the open console says so.
    page.goto(f"{server.base_url}/console/queue")
    assert page.locator("#open-banner").is_visible()
    review = [d for d in decided if d["action"] in (1, 2)] + [r for r in seeded if r["action"] in (1, 2)]
    assert len(review) >= 5
    shown = page.locator("#queue tbody tr td:first-child a").all_inner_texts()
    assert [int(i) for i in shown] == sorted(
        (d.get("decision_id") or d.get("id") for d in review), reverse=True
    )
    shoot(page, "queue")

    # Filter: blocks only, then the rule that blocked the card tester.
    page.select_option("select[name=action]", "block")
    page.select_option("select[name=rule]", "card_testing_burst")
    page.click("#filters button[type=submit]")
    page.wait_for_url("**/console/queue?*rule=card_testing_burst*")
    burst = [
        d for d in decided if any(r["name"] == "card_testing_burst" for r in d["rules"]) and d["action"] == 2
    ]
    assert burst, "the burst should have tripped card_testing_burst"
    pills = page.locator("#queue tbody tr .pill").all_inner_texts()
    assert pills == ["block"] * len(burst)

    # Open a blocked decision and label it as fraud: the outcome row is in PostgreSQL with its reward.
    target = burst[0]
    page.click(f"#queue a[href='/console/decisions/{target['decision_id']}']")
    page.wait_for_selector("#decision-id")
    assert page.inner_text("#action") == "block"
    assert page.inner_text("#decided-by").startswith("rule")
    assert page.locator("svg.bars rect").count() >= 1 and page.locator("svg.timeline circle").count() >= 2
    shoot(page, "decision")
    page.click("button[data-outcome=fraud]")
    page.wait_for_selector("#outcome")
    assert "fraud" in page.inner_text("#outcome")
    ((outcome, reward),) = query(
        pg_schema, f"SELECT outcome, reward FROM outcomes WHERE decision_id = {target['decision_id']}"
    )
    assert outcome == "fraud" and reward == REWARDS.reward("fraud", 2, 1.0)

    # The hostile attribute is text on the page and never ran.
    page.goto(f"{server.base_url}/console/decisions/{seeded[0]['id']}")
    assert HOSTILE in page.inner_text("#attributes")
    assert page.evaluate("window.__pwned") is None and not dialogs

    # What-if: the live rules plus one block rule for seeded amounts >= 100; nothing else may change.
    page.goto(f"{server.base_url}/console/whatif")
    live = page.input_value("#rules-text")
    page.fill("#rules-text", live.rstrip() + "\n" + WHATIF_RULE)
    page.fill("input[name=since]", "2h")
    page.click("#run-whatif")
    page.wait_for_selector("#whatif-result")
    expected = sum(1 for amount, action in SEEDED if amount >= 100.0 and action != 2)
    assert page.inner_text("#changed-count") == str(expected)
    row = page.locator("#rule-impacts tr[data-rule=review_seeded_large] td.changed-by")
    assert row.inner_text() == str(expected)
    shoot(page, "whatif")

    # Invalid CEL: a clear error naming the rule, nothing run.
    page.fill(
        "#rules-text", live.rstrip() + "\n  - name: half_written\n    tier: block\n    when: amount >=\n"
    )
    page.click("#run-whatif")
    page.wait_for_selector("#whatif-error")
    assert "half_written" in page.inner_text("#whatif-error")

    page.goto(f"{server.base_url}/console/models")
    assert "champion" in page.inner_text("main")
    shoot(page, "models")


def test_login_is_required_when_a_password_is_set(
    pg_schema: str,
    make_settings: Callable[..., Settings],
    trained: tuple[str, Path],
    tmp_path: Path,
    browser_page,
) -> None:
    with console_server(
        pg_schema, make_settings, trained, tmp_path, DP_CONSOLE_PASSWORD="correct horse"
    ) as api:
        page = browser_page
        page.goto(f"{api.base_url}/console/whatif")
        page.wait_for_url("**/console/login?next=*")
        assert page.locator("#open-banner").count() == 0
        page.fill("input[name=password]", "wrong")
        page.click("form.login button")
        assert "wrong password" in page.inner_text("main")
        page.fill("input[name=password]", "correct horse")
        page.click("form.login button")
        page.wait_for_url("**/console/whatif")
        assert page.locator("#rules-text").is_visible()
