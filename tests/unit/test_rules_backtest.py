"""Rule what-if (learning/backtest.py) and its CLI, ``decision-platform rules backtest``.

Rows are built by hand so every expected number follows from the rules written here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from decision_platform.config import Settings
from decision_platform.core.rewards import RewardTable
from decision_platform.learning.backtest import ServingChoice, backtest, counterfactual_reward
from decision_platform.rules.ruleset import RulesError, RuleSet
from decision_platform.storage.database import make_engine
from decision_platform.storage.repository import Repository
from tests.conftest import CONFIG_DIR, decision_row
from tests.unit.test_console import make_id

REWARDS = RewardTable.load(CONFIG_DIR / "rewards.yaml")
NAMES = ["count_1m", "count_5m", "amount"]
NOW = datetime.now(UTC)
WINDOW = (NOW - timedelta(hours=1), NOW + timedelta(minutes=1))

LIVE = """
rules:
  - name: burst
    tier: block
    when: count_1m >= 20
"""


class Rows:
    """A stand-in for the repository: the rows, newest first, as storage.review yields them."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = sorted(rows, key=lambda r: r["id"], reverse=True)

    def backtest_rows(self, since: datetime, until: datetime, limit: int | None = None) -> list[dict]:
        return self.rows[:limit] if limit is not None else self.rows


def row(i: int, count_1m: float, action: int, mask: list[bool], fired: list[str], **extra: object) -> dict:
    return {
        "id": make_id(NOW - timedelta(minutes=30) + timedelta(seconds=i), i),
        "entity_id": f"e{i}",
        "features": {"count_1m": count_1m, "count_5m": count_1m, "amount": 50.0},
        "amount": 50.0,
        "anomaly": 0.4,
        "risk": 0.1,
        "probabilities": [0.7, 0.2, 0.1],
        "action_mask": mask,
        "action": action,
        "rules_fired": [{"name": n, "tier": "block"} for n in fired],
        "event_type": "payment",
        "attributes": {"device_id": "d-1"},
        "outcome": None,
        "reward": None,
        **extra,
    }


def logged() -> list[dict]:
    """Six decisions made under LIVE: two bursts blocked, four allowed (one of them a labelled success,
    one a labelled fraud)."""
    return [
        row(0, 25, 2, [False, False, True], ["burst"]),
        row(1, 22, 2, [False, False, True], ["burst"], outcome="fraud", reward=1.0),
        row(2, 12, 0, [True, True, True], [], outcome="success", reward=REWARDS.reward("success", 0, 50.0)),
        row(3, 11, 0, [True, True, True], [], outcome="fraud", reward=REWARDS.reward("fraud", 0, 50.0)),
        row(4, 3, 0, [True, True, True], []),
        row(5, 1, 0, [True, True, True], []),
    ]


def test_the_live_rules_change_nothing() -> None:
    result = backtest(Rows(logged()), RuleSet.from_text(LIVE, NAMES), REWARDS, *WINDOW)
    assert result.decisions == 6 and result.changed == 0
    assert result.transitions == [[4, 0, 0], [0, 0, 0], [0, 0, 2]]
    assert {r.name: (r.hits, r.logged_hits, r.changed) for r in result.rules} == {"burst": (2, 2, 0)}


def test_a_stricter_rule_blocks_more_and_prices_the_labelled_ones() -> None:
    stricter = LIVE.replace("count_1m >= 20", "count_1m >= 10")
    result = backtest(Rows(logged()), RuleSet.from_text(stricter, NAMES), REWARDS, *WINDOW)
    assert result.changed == 2  # rows 2 and 3: allow -> block
    assert result.transitions == [[2, 0, 2], [0, 0, 0], [0, 0, 2]]
    assert result.actions_before == [4, 0, 2] and result.actions_after == [2, 0, 4]
    assert result.labelled_changed == 2 and result.unlabelled_changed == 0 and result.not_estimable == 0
    # row 2: success after allow (1 + 0.02 * 50 = 2) becomes a false positive block (-20);
    # row 3: fraud after allow (-15 - 50 = -65) becomes stopped fraud (+1).
    assert result.reward_before == pytest.approx(2.0 - 65.0)
    assert result.reward_after == pytest.approx(-20.0 + 1.0)
    assert result.reward_change == pytest.approx(44.0)
    (burst,) = result.rules
    assert (burst.hits, burst.changed, burst.reward_change) == (4, 2, pytest.approx(44.0))
    assert {s.decision_id for s in result.samples} == {logged()[2]["id"], logged()[3]["id"]}


def test_removing_the_rule_lets_the_policy_decide() -> None:
    result = backtest(Rows(logged()), RuleSet.from_text("rules: []", NAMES), REWARDS, *WINDOW)
    # The two blocks go to the policy's most likely action (allow, 0.7); row 1 was a stopped fraud.
    assert result.changed == 2 and result.transitions[2] == [2, 0, 0]
    assert result.labelled_changed == 1 and result.unlabelled_changed == 1
    assert result.reward_change == pytest.approx(REWARDS.reward("fraud", 0, 50.0) - 1.0)
    (removed,) = result.rules
    assert (removed.name, removed.tier, removed.logged_hits, removed.changed) == ("burst", None, 2, 2)


def test_fallback_decisions_take_the_safe_action_and_limits_truncate() -> None:
    fallback = row(9, 30, 1, [True, True, True], [], probabilities=None, anomaly=None, risk=None)
    result = backtest(Rows([fallback]), RuleSet.from_text(LIVE, NAMES), REWARDS, *WINDOW, ServingChoice())
    assert result.transitions[1] == [0, 0, 1]  # burst blocks it: the safe throttle moves to block
    limited = backtest(Rows(logged()), RuleSet.from_text(LIVE, NAMES), REWARDS, *WINDOW, limit=4)
    assert limited.decisions == 4 and limited.truncated


def test_an_outcome_with_no_counterpart_is_not_estimated() -> None:
    assert counterfactual_reward(REWARDS, "success", 2, 10.0) == REWARDS.reward("false_positive", 2, 10.0)
    assert counterfactual_reward(REWARDS, "chargeback", 0, 10.0) == REWARDS.reward("chargeback", 0, 10.0)
    tiny = RewardTable.model_validate(
        {"outcomes": {"won": {"allow": {"base": 1}}, "lost": {"throttle": {}, "block": {}}}}
    )
    assert counterfactual_reward(tiny, "won", 2, 1.0) is None


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("rules:\n  - name: half_written\n    tier: block\n    when: count_1m >=\n", "half_written"),
        ("rules:\n  - name: unknown_input\n    tier: floor\n    when: nope > 1\n", "unknown_input"),
        ("rules:\n  - name: bad_tier\n    tier: stop\n    when: count_1m > 1\n", "bad_tier"),
        ("rules: [\n", "line 2"),
    ],
)
def test_invalid_rules_name_the_rule(text: str, named: str) -> None:
    with pytest.raises(RulesError, match=named):
        RuleSet.from_text(text, NAMES)


def test_cli_backtest(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from decision_platform import config
    from decision_platform.cli import main as cli

    settings = make_settings()
    repository = Repository(make_engine(settings.database_url))
    rows = [
        decision_row(r["id"], **{k: v for k, v in r.items() if k not in ("outcome", "reward")})
        for r in logged()
    ]
    repository.insert_decisions(rows)
    repository.record_outcome(rows[2]["id"], "success", REWARDS.reward("success", 0, 50.0))
    monkeypatch.setattr(config, "get_settings", lambda: settings)
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(LIVE.replace("count_1m >= 20", "count_1m >= 10"))
    runner = CliRunner()
    result = runner.invoke(cli.app, ["rules", "backtest", str(stricter), "--since", "2h"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "2 of 6 decisions would change" in result.output
    assert "estimated reward change -22.00 over 1 labelled" in result.output  # 2 -> -20
    assert "1 changed decisions have no outcome" in result.output
    as_json = runner.invoke(cli.app, ["rules", "backtest", str(stricter), "--since", "2h", "--json"])
    assert json.loads(as_json.stdout)["changed"] == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules:\n  - name: half_written\n    tier: block\n    when: count_1m >=\n")
    failed = runner.invoke(cli.app, ["rules", "backtest", str(broken)], terminal_width=200)
    assert failed.exit_code == 2 and "half_written" in failed.output
    assert "[red]" not in failed.output  # markup was printed as text
    window = runner.invoke(cli.app, ["rules", "backtest", str(stricter), "--since", "now", "--until", "1h"])
    assert window.exit_code == 2 and "must be before" in window.output
    # Bad input is exit 2 with the reason, never a traceback (these were UnicodeDecodeError, OverflowError).
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe")
    for args, reason in [
        ([str(binary)], "not UTF-8"),
        ([str(stricter), "--since", "0001-01-01T00:00:00+01:00"], "out of the range of dates"),
        ([str(stricter), "--since", "99999999999w"], "out of the range of dates"),
        ([str(stricter), "--limit", "99999999999999999999"], "9223372036854775806"),  # was OverflowError
    ]:
        refused = runner.invoke(cli.app, ["rules", "backtest", *args], terminal_width=200)
        # Typer boxes a usage error at 80 columns whatever the terminal: the reason may wrap (with the path).
        unboxed = " ".join(refused.output.replace("│", " ").split())
        assert refused.exit_code == 2 and reason in unboxed, refused.output
    too_big = runner.invoke(cli.app, ["explain", str(2**63)], terminal_width=200)
    assert too_big.exit_code == 2 and "9223372036854775807" in too_big.output, too_big.output
