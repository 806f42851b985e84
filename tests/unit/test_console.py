"""The analyst console on the embedded backends (TestClient): access, CSRF, the queue's filters and keyset
pages, the decision page (escaped attributes), labelling through POST /outcome's rules, the what-if, models.

The browser tests on PostgreSQL are tests/e2e/test_console_browser.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from decision_platform.api.app import create_app
from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.core.ids import EPOCH_MS, NODE_BITS, SEQUENCE_BITS
from decision_platform.core.rewards import RewardTable
from decision_platform.serving.platform import Platform
from tests.conftest import CONFIG_DIR, decision_row

REWARDS = RewardTable.load(CONFIG_DIR / "rewards.yaml")
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def make_id(moment: datetime, sequence: int) -> int:
    """A decision id of ``moment`` (the layout of core/ids.py)."""
    ms = int(moment.timestamp() * 1000) - EPOCH_MS
    return (ms << (NODE_BITS + SEQUENCE_BITS)) | sequence


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the page has no CSRF field"
    return match.group(1)


def ids_on(page: str) -> list[int]:
    return [int(i) for i in re.findall(r'href="/console/decisions/(\d+)">\1<', page)]


@pytest.fixture
def console(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> Iterator[tuple[TestClient, Platform, list[dict]]]:
    """An open console over 12 stored decisions of the last hour, newest last in ``rows``."""
    yield from _console(make_settings(), start_platform)


def _console(settings: Settings, start_platform: Callable[[Settings], Platform]) -> Iterator:
    platform = start_platform(settings)
    now = datetime.now(UTC)
    rows = []
    for i in range(12):
        at = now - timedelta(minutes=60 - 5 * i)
        action = (1, 2, 0)[i % 3]
        fired = (
            [{"name": "velocity_step_up", "tier": "floor", "description": "", "inputs": []}]
            if i % 3 == 0
            else []
        )
        rows.append(
            decision_row(
                make_id(at, i),
                created_at=at,
                entity_id=f"ent-{i % 4}",
                action=action,
                action_mask=[i % 3 != 0, True, True],
                risk=round(0.05 * i, 2),
                amount=10.0 * (i + 1),
                rules_fired=fired,
                attributes={"note": HOSTILE, "country": "FR"},
                event_type="payment",
                features={"amount": 10.0 * (i + 1), "count_1m": float(i), "count_5m": float(i)},
            )
        )
    platform.repository.insert_decisions(rows)
    with TestClient(create_app(settings, platform)) as client:
        yield client, platform, rows


def test_open_console_says_so_on_every_page_and_sends_a_strict_csp(console) -> None:
    client, _, rows = console
    for path in (
        "/console/queue",
        f"/console/decisions/{rows[0]['id']}",
        "/console/whatif",
        "/console/models",
    ):
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.text[:300])
        assert 'id="open-banner"' in answer.text, path
        assert "script-src 'self'" in answer.headers["content-security-policy"]
        assert answer.headers["x-frame-options"] == "DENY"


def test_queue_is_newest_first_keyset_paged_without_offset(console) -> None:
    client, platform, rows = console
    statements: list[tuple[str, tuple]] = []

    def capture(_conn, _cursor, statement, parameters, *_args) -> None:  # type: ignore[no-untyped-def]
        statements.append((statement, tuple(parameters)))

    sa.event.listen(platform.repository.engine, "before_cursor_execute", capture)
    try:
        seen, url = [], "/console/queue?limit=3"
        while url:
            page = client.get(url).text
            seen += ids_on(page)
            found = re.search(r'href="([^"]+)" id="older"', page)
            url = found.group(1).replace("&amp;", "&") if found else None
    finally:
        sa.event.remove(platform.repository.engine, "before_cursor_execute", capture)
    review = sorted((r["id"] for r in rows if r["action"] in (1, 2)), reverse=True)
    assert seen == review  # every throttle and block once, newest first, across pages
    queue_sql = [(s, p) for s, p in statements if "ORDER BY decisions.id DESC" in s]
    assert len(queue_sql) == 3  # 8 decisions to review, 3 a page
    # SQLite's compiler always writes "LIMIT ? OFFSET ?": the offset must be 0 on every page.
    assert all(p[-1] == 0 for s, p in queue_sql if "OFFSET" in s)
    assert sum("decisions.id < ?" in s for s, _ in queue_sql) == 2  # pages 2 and 3: the keyset cursor


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("action=block", lambda r: r["action"] == 2),
        ("action=any&entity=ent-1", lambda r: r["entity_id"] == "ent-1"),
        ("action=any&rule=velocity_step_up", lambda r: bool(r["rules_fired"])),
        ("action=any&risk_min=0.2&risk_max=0.4", lambda r: 0.2 <= r["risk"] <= 0.4),
        ("action=any&since=31m", lambda r: r["created_at"] >= datetime.now(UTC) - timedelta(minutes=31)),
        ("action=any&until=0001-01-02", lambda r: False),
        ("action=any&since=9999-12-30&until=9999-12-31", lambda r: False),
    ],
)
def test_queue_filters(console, query: str, expected: Callable[[dict], bool]) -> None:
    client, _, rows = console
    page = client.get(f"/console/queue?{query}&limit=200")
    assert page.status_code == 200
    assert ids_on(page.text) == sorted((r["id"] for r in rows if expected(r)), reverse=True)


def test_queue_refuses_bad_filters_naming_the_field(console) -> None:
    client, _, _ = console
    for query, field in [
        ("risk_min=2", "risk_min"),
        ("since=yesterday-ish", "since"),
        ("action=maybe", "action"),
        ("rule=DROP%20TABLE", "rule"),
        ("before=-5", "before"),
        ("before=\u00b2", "before"),  # str.isdigit() says yes, int() says no: was a 500
        ("limit=\u00b2", "limit"),
        ("limit=\uff11", "limit"),
        (f"before={'9' * 5000}", "before"),  # beyond int()'s digit limit: was a 500
    ]:
        answer = client.get(f"/console/queue?{query}")
        assert answer.status_code == 422, query
        assert f"{field}:" in answer.text, query


def test_decision_page_shows_hostile_attributes_as_text(console) -> None:
    client, _, rows = console
    page = client.get(f"/console/decisions/{rows[3]['id']}").text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "velocity_step_up" in page  # rules fired
    assert "ent-3" in page and 'class="timeline"' in page
    assert client.get("/console/decisions/12345").status_code == 404
    assert client.get("/console/decisions/0").status_code == 422


def test_labelling_goes_through_the_outcome_rules(console) -> None:
    client, platform, rows = console
    row = rows[1]  # a block, amount 20
    page = client.get(f"/console/decisions/{row['id']}").text
    token = csrf_of(page)
    assert 'value="success"' not in page  # success cannot follow a block: no button for it
    url = f"/console/decisions/{row['id']}/outcome"
    assert client.post(url, data={"outcome": "fraud"}).status_code == 403  # no CSRF token
    assert client.post(url, data={"outcome": "fraud", "csrf": "forged"}).status_code == 403
    assert client.post(url, data={"outcome": "success", "csrf": token}).status_code == 422
    answer = client.post(url, data={"outcome": "fraud", "csrf": token}, follow_redirects=False)
    assert answer.status_code == 303
    stored = platform.repository.get_outcome(row["id"])
    assert stored is not None and stored.outcome == "fraud"
    assert stored.reward == REWARDS.reward("fraud", 2, row["amount"])
    assert client.post(url, data={"outcome": "false_positive", "csrf": token}).status_code == 409
    repeat = client.post(url, data={"outcome": "fraud", "csrf": token}, follow_redirects=False)
    assert repeat.status_code == 303  # the same outcome again: idempotent
    missing = client.post("/console/decisions/999/outcome", data={"outcome": "fraud", "csrf": token})
    assert missing.status_code == 404
    cross = client.post(
        url, data={"outcome": "fraud", "csrf": token}, headers={"origin": "https://evil.example"}
    )
    assert cross.status_code == 403
    labelled = client.get("/console/queue?unlabelled=1&limit=200").text
    assert row["id"] not in ids_on(labelled) and rows[0]["id"] in ids_on(labelled)


def test_no_outcome_yet_counts_an_imputed_placeholder_as_none_and_a_label_replaces_it(console) -> None:
    client, platform, rows = console
    reported, imputed = rows[1], rows[4]  # two blocks, amounts 20 and 50
    platform.repository.record_outcome(reported["id"], "fraud", REWARDS.reward("fraud", 2, 20.0))
    placeholder = {
        "decision_id": imputed["id"],
        "outcome": "false_positive",  # what learning/outcomes.py imputes for a low-risk block
        "reward": REWARDS.reward("false_positive", 2, 50.0),
        "received_at": datetime.now(UTC),
        "imputed": True,
    }
    platform.repository.insert_imputed_outcomes([placeholder])
    blocks = sorted((r["id"] for r in rows if r["action"] == 2), reverse=True)
    unlabelled = ids_on(client.get("/console/queue?action=block&unlabelled=1&limit=200").text)
    assert unlabelled == [i for i in blocks if i != reported["id"]]  # the imputed one is still to review
    assert ids_on(client.get("/console/queue?action=block&limit=200").text) == blocks
    page = client.get(f"/console/decisions/{imputed['id']}").text
    assert 'id="imputed"' in page and 'id="outcome"' not in page and 'data-outcome="fraud"' in page
    answer = client.post(
        f"/console/decisions/{imputed['id']}/outcome",
        data={"outcome": "fraud", "csrf": csrf_of(page)},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    stored = platform.repository.get_outcome(imputed["id"])
    assert stored is not None and (stored.outcome, stored.imputed) == ("fraud", False)
    assert stored.reward == REWARDS.reward("fraud", 2, 50.0)  # the reward of POST /outcome
    assert imputed["id"] not in ids_on(client.get("/console/queue?action=block&unlabelled=1").text)
    done = client.get(f"/console/decisions/{reported['id']}").text
    assert 'id="outcome"' in done and "data-outcome=" not in done  # reported: final, no buttons


def test_every_post_form_carries_the_csrf_token_and_every_post_refuses_without_it(console) -> None:
    client, _, rows = console
    for path in ("/console/login", f"/console/decisions/{rows[0]['id']}", "/console/whatif"):
        page = client.get(path).text
        forms = re.findall(r'<form method="post".*?</form>', page, re.S)
        assert forms and all('name="csrf" value="' in form for form in forms), path
    posts = {
        "/console/login": {"password": "x", "next": "/console/queue"},
        "/console/logout": {},
        f"/console/decisions/{rows[0]['id']}/outcome": {"outcome": "fraud"},
        "/console/whatif": {"rules_text": "rules: []", "since": "2h"},
        "/console/models/promote": {"version": "v1", "admin_key": "x"},
        "/console/models/rollback": {"kind": "risk", "admin_key": "x"},
    }
    for path, data in posts.items():
        for token in ({}, {"csrf": "forged"}):
            answer = client.post(path, data=data | token, follow_redirects=False)
            assert answer.status_code == 403 and "CSRF" in answer.text, (path, token, answer.text[:200])


def test_event_text_in_any_field_is_shown_as_text(console) -> None:
    client, platform, _ = console
    at = datetime.now(UTC) - timedelta(minutes=1)
    fired = {
        "name": "velocity_step_up",
        "tier": "floor",
        "description": "Unusually many events in five minutes.",
        "inputs": [{"feature": "count_5m", "value": 9.0, "display": "9", "typical": {"low": 1, "high": 4}}],
    }
    row = decision_row(
        make_id(at, 99),
        created_at=at,
        entity_id=HOSTILE,
        event_id=HOSTILE,
        event_type=HOSTILE[:32],
        action=1,
        rules_fired=[fired],
        attributes={HOSTILE: HOSTILE},
    )
    platform.repository.insert_decisions([row])
    pages = [
        client.get(f"/console/decisions/{row['id']}").text,
        client.get("/console/queue", params={"action": "any", "entity": HOSTILE}).text,
    ]
    for page in pages:
        assert "<script>alert" not in page and "<img src=x" not in page
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert row["id"] in ids_on(pages[1])  # the entity filter found it
    assert "count_5m = 9 (typical 1 to 4)" in pages[0]  # the rule with the input it tested


def test_whatif_counts_the_decisions_a_new_rule_changes(console) -> None:
    client, platform, rows = console
    # rows[11]: allowed, amount 120, a good customer: success after allow is worth 1 + 0.02 * 120.
    platform.repository.record_outcome(rows[11]["id"], "success", REWARDS.reward("success", 0, 120.0))
    token = csrf_of(client.get("/console/whatif").text)
    # One rule only: big_amounts blocks amount >= 95 (rows 9, 10, 11), and velocity_step_up (the floor that
    # fired on rows 0, 3, 6, 9) is gone. Rows 0, 3, 6: throttle -> allow (the policy's most likely action);
    # row 9: throttle -> block; row 10 was blocked already; row 11: allow -> block.
    rules = "rules:\n  - name: big_amounts\n    tier: block\n    when: amount >= 95.0\n"
    answer = client.post("/console/whatif", data={"csrf": token, "rules_text": rules, "since": "2h"})
    assert answer.status_code == 200, answer.text[:500]
    page = answer.text
    assert re.search(r'id="changed-count">(\d+)<', page).group(1) == "5"
    assert re.search(r'id="replayed-count">(\d+)<', page).group(1) == "12"
    impacts = dict(re.findall(r'data-rule="(\w+)">.*?class="num changed-by">(\d+)<', page, re.S))
    assert impacts == {"big_amounts": "2", "velocity_step_up": "4"}
    # The labelled changed decision: success after a block is a false_positive (-20), was 3.4.
    assert "-23.40" in page and "4 changed decisions have no outcome" in page
    bad = "rules:\n  - name: broken_rule\n    tier: block\n    when: amount >= \n"
    refused = client.post("/console/whatif", data={"csrf": token, "rules_text": bad, "since": "2h"})
    assert refused.status_code == 422 and "broken_rule" in refused.text
    assert platform.engine.rules.rules[0].name == "denylisted_device"  # the live rules are untouched


def test_login_when_a_password_is_set(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> None:
    settings = make_settings(console_password="s3cret")
    with TestClient(create_app(settings, start_platform(settings))) as client:
        answer = client.get("/console/queue?action=block", follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/console/login?next=")
        form = client.get(answer.headers["location"]).text
        assert 'id="open-banner"' not in form
        token = csrf_of(form)
        wrong = client.post(
            "/console/login", data={"csrf": token, "password": "nope", "next": "/console/queue"}
        )
        assert wrong.status_code == 401
        right = client.post(
            "/console/login",
            data={"csrf": token, "password": "s3cret", "next": "https://evil.example/"},
            follow_redirects=False,
        )
        assert right.status_code == 303 and right.headers["location"] == "/console/queue"  # no open redirect
        assert client.get("/console/queue").status_code == 200
        client.cookies.set("dp_console_session", "9999999999.00.forged", path="/console")
        assert client.get("/console/queue", follow_redirects=False).status_code == 303


def test_models_page_is_read_only_without_the_admin_key(console) -> None:
    client, _, _ = console
    page = client.get("/console/models")
    assert page.status_code == 200 and "champion" in page.text
    assert "Read-only" in page.text and "/console/models/promote" not in page.text
    token = csrf_of(client.get("/console/whatif").text)  # a valid token: refused all the same
    refused = client.post("/console/models/promote", data={"csrf": token, "version": "v1", "admin_key": "x"})
    assert refused.status_code == 403 and "DP_API_KEY" in refused.text


@pytest.fixture
def admin_console(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> Iterator[tuple[TestClient, Platform]]:
    """DP_API_KEY set and no console password: the API key is the console's password too; logged in."""
    for client, platform, _ in _console(make_settings(api_key="admin-key"), start_platform):
        form = client.get("/console/login").text
        client.post("/console/login", data={"csrf": csrf_of(form), "password": "admin-key"})
        yield client, platform


def test_promote_from_the_console_needs_the_admin_key(admin_console) -> None:
    client, platform = admin_console
    page = client.get("/console/models").text
    token = csrf_of(page)
    champion = next(m for m in platform.registry.repository.list_models("risk") if m["status"] == "champion")
    data = {"csrf": token, "version": champion["version"], "admin_key": "wrong"}
    wrong = client.post("/console/models/promote", data=data)
    assert wrong.status_code == 401 and "wrong X-API-Key" in wrong.text
    data["version"] = "risk-does-not-exist"
    data["admin_key"] = "admin-key"
    missing = client.post("/console/models/promote", data=data)
    assert missing.status_code == 404  # the registry's answer, through the admin API's code
    data["version"] = champion["version"]
    again = client.post("/console/models/promote", data=data)  # already champion: a no-op
    assert again.status_code == 200 and f"promoted {champion['version']}" in again.text
    # Rolling back with no earlier version: the console answers what the admin API answers.
    api = client.post("/admin/models/rollback?kind=risk", headers={"X-API-Key": "admin-key"})
    rollback = {"csrf": token, "kind": "risk", "admin_key": "admin-key"}
    console_answer = client.post("/console/models/rollback", data=rollback)
    assert 400 <= api.status_code < 500 and console_answer.status_code == api.status_code
    assert api.json()["detail"] in console_answer.text.replace("&#39;", "'")


def test_a_challenger_is_promoted_and_rolled_back_from_the_console(admin_console) -> None:
    from tests.model_helpers import register_policy

    client, platform = admin_console
    champion = platform.registry.champion("policy")["version"]  # type: ignore[index]
    challenger = register_policy(platform.registry, 2)
    page = client.get("/console/models").text
    assert f'name="version" value="{challenger}"' in page  # a promote form for the challenger
    data = {"csrf": csrf_of(page), "version": challenger, "admin_key": "admin-key"}
    promoted = client.post("/console/models/promote", data=data)
    assert promoted.status_code == 200 and f"promoted {challenger}" in promoted.text
    assert platform.registry.champion("policy")["version"] == challenger  # type: ignore[index]
    assert platform.serving().versions["policy"] == challenger  # reloaded, as the admin API does
    rollback = {"csrf": data["csrf"], "kind": "policy", "admin_key": "admin-key"}
    rolled = client.post("/console/models/rollback", data=rollback)
    assert rolled.status_code == 200 and "rolled back policy" in rolled.text
    assert platform.registry.champion("policy")["version"] == champion  # type: ignore[index]
    assert platform.serving().versions["policy"] == champion


def test_models_page_shows_retrain_reports_and_serves_only_their_files(console) -> None:
    client, platform, _ = console
    reports = platform.settings.reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    name = "retrain-20261130T101500"
    gate = {"passed": False, "checks": [{"name": "dr_lower_bound", "passed": False, "detail": "-0.02 < 0.0"}]}
    (reports / f"{name}.json").write_text(
        json.dumps({"started_at": "2026-11-30", "promoted": False, "gate": gate})
    )
    (reports / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    try:
        page = client.get("/console/models").text
        assert f"{name}.json" in page and "dr_lower_bound: -0.02 &lt; 0.0" in page
        assert f'src="/console/reports/{name}.png"' in page
        assert client.get(f"/console/reports/{name}.png").content.startswith(b"\x89PNG")
        for bad in ("..%2F..%2Fetc%2Fpasswd", "retrain-x.png", "other.png"):
            assert client.get(f"/console/reports/{bad}").status_code == 404, bad
    finally:
        for suffix in (".json", ".png"):
            (reports / f"{name}{suffix}").unlink()


@pytest.mark.parametrize(
    "report",
    [[], "text", {"gate": "passed"}, {"gate": {"checks": "all"}}, {"gate": {"checks": [1, {"passed": 1}]}}],
    ids=["list", "string", "gate-string", "checks-string", "check-of-another-shape"],
)
def test_a_retrain_report_of_another_shape_never_fails_the_models_page(console, report: object) -> None:
    """A report a hand edit or an older version left answered 500 for as long as it was among the newest."""
    client, platform, _ = console
    reports = platform.settings.reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / "retrain-20261201T101500.json"
    path.write_text(json.dumps(report))
    try:
        page = client.get("/console/models")
        assert page.status_code == 200 and path.name in page.text
    finally:
        path.unlink()


def test_a_pending_narrative_is_shown_as_pending(console, monkeypatch: pytest.MonkeyPatch) -> None:
    from decision_platform.explain.narrator import PENDING, Explanation

    client, platform, rows = console
    pending = Explanation(rows[0]["id"], PENDING, "Template meanwhile.", "template", "pending", {})
    monkeypatch.setattr(platform.narrator, "explanation", lambda *_args, **_kw: pending)
    page = client.get(f"/console/decisions/{rows[0]['id']}").text
    assert 'data-status="pending"' in page and "pending: the LLM is writing it" in page
    assert client.get("/console/static/console.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/console/static/../access.py").status_code == 404


def test_models_page_shows_the_shadow_agreement(console) -> None:
    from decision_platform.learning.compare import compare_logged
    from tests.model_helpers import register_policy

    client, platform, _ = console
    assert "No shadowed decisions logged" in client.get("/console/models").text
    version = register_policy(platform.registry, 0)  # a policy that always proposes allow
    platform.registry.shadow(version)
    platform.reload_models()
    for i in range(6):
        event = {"event_id": f"shadowed-{i}", "amount": 5.0 + i, "event_type": "payment"}
        assert client.post("/decide", json={"entity_id": f"s{i}", "event": event}).status_code == 200
    settings = platform.settings
    expected = compare_logged(platform.repository, settings.exploration_floor, settings.explore_actions)
    page = client.get("/console/models").text
    assert expected.decisions == 6 and expected.agreement is not None
    assert f"Shadow <strong>{version}</strong> on the newest 6 shadowed decisions" in page
    assert f"{100 * expected.agreement:.1f}%" in page
    assert '<span class="pill shadow">shadow</span>' in page


def test_an_open_console_shares_its_csrf_key_between_processes(tmp_path) -> None:
    from decision_platform.console.access import ConsoleAccess

    first = ConsoleAccess(None, key_file=tmp_path / "console.key")
    second = ConsoleAccess(None, key_file=tmp_path / "console.key")  # another uvicorn worker
    nonce = first.new_nonce()
    assert second.valid_csrf(nonce, first.csrf_token(nonce))
    assert (tmp_path / "console.key").stat().st_mode & 0o777 == 0o600
    other = ConsoleAccess(None, key_file=tmp_path / "elsewhere.key")
    assert not other.valid_csrf(nonce, first.csrf_token(nonce))
    with_password = ConsoleAccess("pw")
    assert with_password.valid_session(with_password.new_session())
    assert not with_password.valid_session(with_password.new_session(now=0.0))  # expired
    assert not ConsoleAccess("other").valid_session(with_password.new_session())


def test_a_damaged_row_never_fails_the_queue_or_another_decisions_page(console) -> None:
    """Rows a hand edit or an older version left: fired rules as a list of strings, an earlier snapshot
    that is not a dict. The queue (also filtered by rule: SQLite's json_extract raised
    "malformed JSON", taken for a database outage) and the entity's later decision pages answered 500."""
    client, platform, rows = console
    newest, oldest = rows[-1], rows[0]
    with platform.repository.engine.begin() as connection:
        update = "UPDATE decisions SET rules_fired = :fired WHERE id = :id"
        connection.execute(sa.text(update), {"fired": '["velocity_step_up"]', "id": newest["id"]})
        update = "UPDATE decisions SET features = '5' WHERE id = :id"
        connection.execute(sa.text(update), {"id": oldest["id"]})
    page = client.get("/console/queue?action=any")
    assert page.status_code == 200 and newest["id"] in ids_on(page.text)
    assert "velocity_step_up" in page.text
    filtered = client.get("/console/queue?action=any&rule=velocity_step_up")
    assert filtered.status_code == 200 and oldest["id"] in ids_on(filtered.text)
    assert client.get("/ready").status_code == 200  # the database was not taken for down
    # A later decision of that entity, with reasons: its explanation compares them with the entity's history.
    event = Event(event_id="later-1", entity_id=oldest["entity_id"], amount=900.0)
    later = platform.engine.decide(oldest["entity_id"], event).record
    assert later.reasons
    assert client.get(f"/console/decisions/{later.id}").status_code == 200
    assert client.get(f"/decisions/{later.id}/explanation").status_code == 200
