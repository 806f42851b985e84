"""Static HTML reports of the decisions of a time range, for people without Grafana (or an auditor)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from decision_platform.reporting.data import ReportData, load, parse_time
from decision_platform.reporting.page import render
from decision_platform.storage.sql import Engine

__all__ = ["ReportData", "load", "parse_time", "render", "write_report"]


def write_report(engine: Engine, since: datetime, until: datetime, out: Path) -> ReportData:
    """Read the range from the database and write the page to ``out``; returns what it showed."""
    data = load(engine, since, until)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data), encoding="utf-8")
    return data
