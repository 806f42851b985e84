"""What each console page shows, computed from the platform: routes.py only parses and renders.

Every input of a page is checked here and refused with :class:`ConsoleInputError`, whose message names
the field (the route answers 422 with it, on the page); nothing an analyst types reaches SQL but as a
bound parameter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from decision_platform.core.actions import ACTION_NAMES, is_action
from decision_platform.core.events import INT64_MAX
from decision_platform.core.ids import id_timestamp
from decision_platform.learning.backtest import BacktestResult, ServingChoice, backtest
from decision_platform.learning.compare import compare_logged
from decision_platform.models.registry import KINDS
from decision_platform.reporting import parse_time
from decision_platform.rules.ruleset import RuleSet
from decision_platform.serving.platform import Platform
from decision_platform.storage.decisions import counted, damaged, intact_rows
from decision_platform.storage.errors import DatabaseUnavailable
from decision_platform.storage.review import QueueFilter

#: The queue's action filter: name -> actions shown.
ACTION_FILTERS = {
    "review": (1, 2),
    "throttle": (1,),
    "block": (2,),
    "allow": (0,),
    "any": (0, 1, 2),
}
#: The queue's query-string fields besides the cursor and the page size.
QUEUE_FIELDS = ("action", "since", "until", "rule", "risk_min", "risk_max", "entity", "unlabelled")
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
_RULE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_DIGITS = re.compile(r"[0-9]{1,20}")
_REPORT_NAME = re.compile(r"^retrain-[0-9T]{15}\.(png|json)$")


class ConsoleInputError(ValueError):
    """Input a page cannot use; the message names the field (answered 422)."""


def _time(field: str, text: str, now: datetime) -> datetime | None:
    if not text.strip():
        return None
    try:
        return parse_time(text, now)
    except (ValueError, OverflowError) as exc:
        raise ConsoleInputError(f"{field}: {exc}") from None


def _fraction(field: str, text: str) -> float | None:
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConsoleInputError(f"{field}: {text[:40]!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ConsoleInputError(f"{field}: must be between 0 and 1")
    return value


def _positive_int(field: str, text: str, top: int) -> int | None:
    text = text.strip()
    if not text:
        return None
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses (that was a 500), and a
    # number of thousands of digits is over int()'s limit before it is over `top`.
    if not _DIGITS.fullmatch(text) or not 0 < int(text) <= top:
        raise ConsoleInputError(f"{field}: expected a whole number from 1 to {top}")
    return int(text)


@dataclass(frozen=True)
class QueueQuery:
    """The queue's parsed query string: the filter, the keyset cursor, the page size."""

    where: QueueFilter
    action: str
    before: int | None
    limit: int
    raw: dict[str, str]


def parse_queue(params: Mapping[str, str], now: datetime | None = None) -> QueueQuery:
    """The queue's filters from its query string (empty fields are unset)."""
    now = now or datetime.now(UTC)
    raw = {
        k: str(params.get(k, ""))
        for k in ("action", "since", "until", "rule", "risk_min", "risk_max", "entity", "unlabelled")
    }
    action = raw["action"] or "review"
    if action not in ACTION_FILTERS:
        raise ConsoleInputError(f"action: expected one of {list(ACTION_FILTERS)}")
    rule = raw["rule"].strip() or None
    if rule is not None and not _RULE_NAME.match(rule):
        raise ConsoleInputError("rule: a rule name is lower case letters, digits and _")
    entity = raw["entity"].strip() or None
    if entity is not None and (len(entity) > 128 or not entity.isprintable()):
        raise ConsoleInputError("entity: at most 128 printable characters")
    since, until = _time("since", raw["since"], now), _time("until", raw["until"], now)
    if since is not None and until is not None and since >= until:
        raise ConsoleInputError("since: must be before until")
    risk_min, risk_max = _fraction("risk_min", raw["risk_min"]), _fraction("risk_max", raw["risk_max"])
    if risk_min is not None and risk_max is not None and risk_min > risk_max:
        raise ConsoleInputError("risk_min: must not be above risk_max")
    where = QueueFilter(
        actions=ACTION_FILTERS[action],
        since=since,
        until=until,
        rule=rule,
        risk_min=risk_min,
        risk_max=risk_max,
        entity_id=entity,
        unlabelled=raw["unlabelled"] in ("1", "on", "true"),
    )
    before = _positive_int("before", str(params.get("before", "")), INT64_MAX)
    limit = _positive_int("limit", str(params.get("limit", "")), MAX_PAGE_SIZE) or PAGE_SIZE
    return QueueQuery(where, action, before, limit, raw)


def queue_page(platform: Platform, query: QueueQuery) -> dict[str, Any]:
    """One page of the queue and the cursor of the next (None on the last page)."""
    rows = platform.writer.query(
        lambda: platform.repository.review_queue(query.where, query.before, query.limit + 1)
    )
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    for row in rows:  # a row a hand edit damaged is listed as it is, never fails the page
        action, fired = row["action"], row["rules_fired"]
        row["action_name"] = ACTION_NAMES[action] if is_action(action) else f"action {action}"
        fired = fired if isinstance(fired, list) else [fired] if fired else []
        row["rule_names"] = [str(r.get("name", "?")) if isinstance(r, dict) else str(r) for r in fired]
    return {"rows": rows, "next_before": rows[-1]["id"] if more and rows else None}


def _bars(reasons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reasons as bars: width in percent of the largest |weight|, the sign as the direction; the label
    and kind a reason stored before they were kept lacks (storage's check ensures the rest)."""
    largest = max((abs(float(r["weight"])) for r in reasons), default=0.0) or 1.0
    return [
        {
            "label": str(r.get("text") or r.get("description") or r["feature"]),
            "weight": r["weight"],
            "kind": r.get("kind") or "risk",
            "width": round(100.0 * abs(float(r["weight"])) / largest, 1),
            "raises": r["direction"].startswith("raises"),
        }
        for r in reasons
    ]


#: ``dp_damaged_rows_total{reader}`` of the decision page: the decision itself, and its entity's timeline.
PAGE_READER = "console decision"
TIMELINE_READER = "console timeline"


def decision_page(platform: Platform, decision_id: int) -> dict[str, Any] | None:
    """Everything the decision page shows; None: no such decision (database or spool).

    A decision stored damaged (``damage`` in the result; storage.decisions.damaged) is shown as stored,
    every column's raw value, under a notice naming the damaged column: an analyst who follows a link to
    it must see what is there and why nothing else is offered (no explanation, no labels: outcomes for it
    are refused). Not the API's 409: the page answers what was asked, what is stored. An intact decision
    leaves its entity's damaged decisions out of its timeline (counted)."""
    record = platform.writer.find_decision(decision_id)
    if record is None:
        return None
    outcome = platform.writer.query(lambda: platform.repository.get_outcome(decision_id))
    row = record.to_row()
    problem = damaged(row)
    if problem is not None:
        stored = [(column, json.dumps(value, default=str)) for column, value in row.items()]
        return {"d": record, "damage": counted(problem, PAGE_READER), "stored": stored, "outcome": outcome}
    # An imputed placeholder is no label: the queue lists it as "no outcome yet", and a reported outcome
    # replaces it (storage/outcomes.py), so the page offers the buttons beside it.
    imputed = outcome if outcome is not None and outcome.imputed else None
    outcome = None if imputed is not None else outcome
    explanation = None
    if platform.narrator is not None:
        try:
            explanation = platform.narrator.explanation(decision_id)
        except DatabaseUnavailable:
            explanation = None
    facts = explanation.facts if explanation is not None else {}
    timeline = platform.writer.query(
        lambda: platform.repository.entity_timeline(record.entity_id, decision_id)
    )
    rewards = platform.rewards
    action, proposed = record.action, record.proposed_action
    labels = [
        {"outcome": name, "reward": rewards.reward(name, action, record.amount)}
        for name in rewards.outcome_names
        if rewards.possible(name, action)
    ]
    return {
        "d": record,
        "damage": None,
        "action_name": ACTION_NAMES[action],
        "proposed_name": None if proposed is None else ACTION_NAMES[proposed],
        "outcome": outcome,
        "imputed": imputed,
        "labels": labels,
        "bars": _bars(list(record.reasons or [])),
        "risk_typical": facts.get("risk_typical"),
        "anomaly_typical": facts.get("anomaly_typical"),
        "explanation": explanation,
        "timeline": _timeline(list(intact_rows(timeline, TIMELINE_READER)), decision_id),
        "attributes": sorted((record.attributes or {}).items()),
    }


def _timeline(rows: list[dict[str, Any]], current: int) -> dict[str, Any]:
    """The entity's recent decisions as points of an SVG strip (x: time, y: risk), oldest on the left."""
    points = sorted(rows, key=lambda r: r["id"])
    if not points:
        return {"points": [], "rows": []}
    first, last = id_timestamp(points[0]["id"]), id_timestamp(points[-1]["id"])
    span = max(last - first, 1e-3)
    for p in points:
        p["x"] = round(20 + 660 * (id_timestamp(p["id"]) - first) / span, 1)
        p["y"] = round(90 - 80 * float(p["risk"] if p["risk"] is not None else 0.0), 1)
        p["action_name"] = ACTION_NAMES[p["action"]]
        p["current"] = p["id"] == current
    return {"points": points, "rows": list(reversed(points))}


def current_rules_text(platform: Platform) -> str:
    return Path(platform.settings.rules_path).read_text("utf-8")


def run_whatif(
    platform: Platform, rules_text: str, since_text: str, until_text: str, now: datetime | None = None
) -> BacktestResult:
    """Backtest ``rules_text`` on the window's logged decisions (the newest ``DP_CONSOLE_BACKTEST_LIMIT``).

    Raises :class:`~decision_platform.rules.ruleset.RulesError` (naming the rule) or ConsoleInputError."""
    now = now or datetime.now(UTC)
    since = _time("since", since_text or "7d", now)
    until = _time("until", until_text or "now", now)
    assert since is not None and until is not None
    if since >= until:
        raise ConsoleInputError("since: must be before until")
    rules = RuleSet.from_text(rules_text, platform.engine.spec.names)
    settings = platform.settings
    choice = ServingChoice(settings.safe_action, settings.exploration_floor, settings.explore_actions)
    return backtest(
        platform.repository, rules, platform.rewards, since, until, choice, settings.console_backtest_limit
    )


def models_page(platform: Platform) -> dict[str, Any]:
    """The registry per kind, what this process serves, the last retrain reports, the shadow agreement."""
    repository = platform.registry.repository
    by_kind = {kind: repository.list_models(kind)[:12] for kind in KINDS}
    settings = platform.settings
    comparison = None
    if any(m["status"] == "shadow" for m in by_kind["policy"]):
        # Only with a shadow registered: finding shadowed decisions scans the table when there are none.
        comparison = compare_logged(
            platform.repository, settings.exploration_floor, settings.explore_actions, limit=5000
        )
    return {
        "kinds": by_kind,
        "serving": platform.serving().as_dict(),
        "reports": retrain_reports(settings.reports_dir),
        "comparison": comparison,
    }


def retrain_reports(directory: Path, count: int = 3) -> list[dict[str, Any]]:
    """The newest retrain reports: whether each promoted, its gate's checks, and the name of its plot.

    A report file of another shape (a hand edit, an older version: not an object, a gate or a check that
    is not one) is shown with what can be read of it, as one that is not JSON is left out: the models page
    answered 500 for it, for as long as it was among the newest."""
    out = []
    for path in sorted(directory.glob("retrain-*.json"), reverse=True)[:count]:
        try:
            report = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        report = report if isinstance(report, dict) else {}
        gate = report.get("gate") if isinstance(report.get("gate"), dict) else {}
        checks = gate.get("checks") if isinstance(gate.get("checks"), list) else []
        png = path.with_suffix(".png")
        out.append(
            {
                "name": path.name,
                "promoted": report.get("promoted") is True,
                "checks": [
                    {
                        "name": str(c.get("name", "?")),
                        "passed": c.get("passed") is True,
                        "detail": str(c.get("detail", "")),
                    }
                    for c in checks
                    if isinstance(c, dict)
                ],
                "png": png.name if png.exists() else None,
            }
        )
    return out


def report_file(directory: Path, name: str) -> Path | None:
    """A retrain report file by name; None for anything but ``retrain-<time>.png|json`` in the directory."""
    if not _REPORT_NAME.match(name):
        return None
    path = directory / name
    return path if path.is_file() else None
