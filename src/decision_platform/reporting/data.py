"""What the report shows, read from the decisions (and outcomes) tables for one time range.

The database, not Prometheus, is the source: it holds every decision since the start, so a report can
cover any past range, and its numbers are the ones an auditor can re-derive with SQL.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from decision_platform.core.events import iso_time
from decision_platform.storage.decisions import intact_rows
from decision_platform.storage.repository import Repository
from decision_platform.storage.sql import Engine

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: datetime) -> datetime:
    """``now``, an age (``90m``, ``6h``, ``7d``: that long before now) or ISO 8601 (UTC when no offset)."""
    text = text.strip()
    if text == "now":
        return now
    match = _RELATIVE.match(text)
    try:
        if match:
            return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
        parsed = iso_time(text)  # a leap second, a lower-case "t" / "z" as the API reads them
        # Year 1 or 9999 with an offset is out of range once in UTC, where every query compares it.
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except OverflowError:  # callers expect ValueError (a CLI's bad parameter, a console's 422)
        raise ValueError(f"{text[:40]!r}: out of the range of dates") from None
    except ValueError:
        raise ValueError(f"{text[:40]!r}: expected now, an age like 6h / 7d, or an ISO 8601 time") from None


@dataclass
class ReportData:
    """The decisions of [since, until) as arrays (one entry per decision) plus counted categories."""

    since: datetime
    until: datetime
    times: np.ndarray  # epoch seconds
    actions: np.ndarray  # 0 allow, 1 throttle, 2 block
    latency_ms: np.ndarray
    risk: np.ndarray  # NaN where no risk was scored (fallbacks)
    fell_back: np.ndarray  # True where the decision fell back
    decided_by: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    #: Decisions each rule fired on.
    rule_hits: Counter[str] = field(default_factory=Counter)
    #: outcome -> (count, mean reward) of the range's decisions that have one.
    outcomes: dict[str, tuple[int, float]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.times.size)


def _epoch(value: datetime) -> float:
    # SQLite gives naive datetimes back; the platform writes UTC.
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def load(engine: Engine, since: datetime, until: datetime) -> ReportData:
    """Read the range's decisions, streaming (a few columns per row; ~1M rows fit in ~50 MB)."""
    repository = Repository(engine)
    times: list[float] = []
    actions: list[int] = []
    latency: list[float] = []
    risk: list[float] = []
    fell_back: list[bool] = []
    decided_by: Counter[str] = Counter()
    fallbacks: Counter[str] = Counter()
    rule_hits: Counter[str] = Counter()
    for row in intact_rows((r._mapping for r in repository.report_rows(since, until)), "report"):
        times.append(_epoch(row["created_at"]))
        actions.append(int(row["action"]))
        latency.append(float(row["latency_ms"]))
        risk.append(float("nan") if row["risk"] is None else float(row["risk"]))
        fell_back.append(bool(row["fallback"]))
        decided_by[row["decided_by"]] += 1
        if row["fallback"]:
            fallbacks[row["fallback"]] += 1
        for rule in row["rules_fired"] or ():
            rule_hits[rule["name"]] += 1
    outcome_rows = repository.outcome_totals(since, until)
    return ReportData(
        since=since,
        until=until,
        times=np.asarray(times, dtype=np.float64),
        actions=np.asarray(actions, dtype=np.int8),
        latency_ms=np.asarray(latency, dtype=np.float64),
        risk=np.asarray(risk, dtype=np.float64),
        fell_back=np.asarray(fell_back, dtype=bool),
        decided_by=decided_by,
        fallbacks=fallbacks,
        rule_hits=rule_hits,
        outcomes={name: (int(n), float(mean)) for name, n, mean in outcome_rows},
    )
