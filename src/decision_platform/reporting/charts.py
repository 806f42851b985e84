"""The report's charts, as PNG bytes.

matplotlib's object API (``Figure``), not pyplot: no global state, no GUI backend, safe in any thread.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from datetime import UTC, datetime

import numpy as np
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from decision_platform.core.actions import ACTION_NAMES
from decision_platform.reporting.data import ReportData

ACTION_COLORS = ("#4caf50", "#ff9800", "#e53935")  # allow, throttle, block
LATENCY_BUDGET_MS = 5.0  # DESIGN.md §10: p99 at steady load
#: Bucket widths to choose from, seconds: the smallest giving at most ~80 buckets over the range.
_BUCKETS = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
#: The first and last instants a chart's dates can hold (years 1 to 9999; the very last microseconds of
#: 9999 round to the year 10000 in matplotlib's float dates).
_FIRST, _LAST = datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC)


def bucket_seconds(since: datetime, until: datetime, most: int = 80) -> int:
    """The bucket width; beyond 80 weeks, whole weeks enough for ~80 buckets (a range from 1970 or to 9999
    drew a bar a week: 417,000 of them, minutes of CPU)."""
    span = (until - since).total_seconds()
    week = _BUCKETS[-1]
    return next((b for b in _BUCKETS if span / b <= most), week * math.ceil(span / most / week))


def human_duration(seconds: float) -> str:
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''}"
    return f"{seconds:g} s"


def _edges(data: ReportData) -> np.ndarray:
    width = bucket_seconds(data.since, data.until)
    start = np.floor(data.since.timestamp() / width) * width
    # Within the years a date can hold: year 1's first bucket began in year 0 (a ValueError).
    edges = np.arange(start, data.until.timestamp() + width, width)
    return np.clip(edges, _FIRST.timestamp(), _LAST.timestamp())


def _dates(epochs: np.ndarray) -> list[datetime]:
    return [datetime.fromtimestamp(float(t), UTC) for t in epochs]


def _time_axis(ax, data: ReportData) -> None:  # type: ignore[no-untyped-def]
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=UTC))
    ax.set_xlim(data.since, min(data.until, _LAST))


def _legend_above(ax) -> None:  # type: ignore[no-untyped-def]
    """Legend in one row above the plot, right of the title: never over the data."""
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=4, fontsize=8, frameon=False)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _figure(title: str, height: float = 3.2) -> tuple[Figure, object]:
    figure = Figure(figsize=(9.0, height))
    ax = figure.add_subplot()
    ax.set_title(title, loc="left", fontsize=11)
    ax.grid(True, alpha=0.3)
    return figure, ax


def actions_over_time(data: ReportData) -> bytes:
    """Stacked bars: decisions per time bucket, by action."""
    figure, ax = _figure("Decisions over time, by action")
    edges = _edges(data)
    width_days = (edges[1] - edges[0]) / 86400 if edges.size > 1 else 1 / 1440
    bottom = np.zeros(max(edges.size - 1, 0))
    for action, (name, color) in enumerate(zip(ACTION_NAMES, ACTION_COLORS, strict=True)):
        counts, _ = np.histogram(data.times[data.actions == action], bins=edges)
        ax.bar(
            _dates(edges[:-1]), counts, width=width_days, bottom=bottom, align="edge", color=color, label=name
        )
        bottom += counts
    _time_axis(ax, data)
    ax.set_ylabel(f"decisions per {human_duration(bucket_seconds(data.since, data.until))}")
    _legend_above(ax)
    return _png(figure)


def latency_percentiles(data: ReportData) -> bytes:
    """p50 / p95 / p99 of the stored end-to-end latency per time bucket, against the 5 ms budget."""
    figure, ax = _figure("Decision latency percentiles")
    edges = _edges(data)
    index = np.digitize(data.times, edges) - 1
    centers = _dates((edges[:-1] + edges[1:]) / 2)
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        values = [
            np.percentile(data.latency_ms[index == i], q) if np.any(index == i) else np.nan
            for i in range(edges.size - 1)
        ]
        ax.plot(centers, values, style, marker=".", label=f"p{q}")
    ax.axhline(LATENCY_BUDGET_MS, color="#e53935", linewidth=1, label="5 ms budget (p99)")
    _time_axis(ax, data)
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    _legend_above(ax)
    return _png(figure)


def risk_histogram(data: ReportData) -> bytes:
    """How risky the range's decisions were, stacked by the action taken (fallbacks have no risk)."""
    figure, ax = _figure("Risk score distribution, by action taken")
    scored = ~np.isnan(data.risk)
    ax.hist(
        [data.risk[scored & (data.actions == a)] for a in range(3)],
        bins=np.linspace(0.0, 1.0, 21),
        stacked=True,
        color=ACTION_COLORS,
        label=list(ACTION_NAMES),
    )
    ax.set_xlabel("risk (P(bad))")
    ax.set_ylabel("decisions")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    return _png(figure)


def _bars(title: str, counts: Counter[str], color: str, empty: str) -> bytes:
    items = counts.most_common(15)[::-1]  # largest on top
    figure, ax = _figure(title, height=max(2.0, 0.9 + 0.35 * len(items)))
    if items:
        names, values = zip(*items, strict=True)
        ax.barh(names, values, color=color)
        for y, value in enumerate(values):
            ax.annotate(f" {value}", (value, y), va="center", fontsize=8)
        ax.set_xlabel("decisions")
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    return _png(figure)


def rule_hits(data: ReportData) -> bytes:
    return _bars("Rule hits (decisions each rule fired on)", data.rule_hits, "#5c6bc0", "No rule fired.")


def fallbacks(data: ReportData) -> bytes:
    share = data.fell_back.mean() if data.count else 0.0
    title = f"Fallbacks by reason ({share:.1%} of decisions)"
    return _bars(title, data.fallbacks, "#8d6e63", "No fallback: every stage answered.")


#: (title, chart) in page order.
CHARTS = (
    ("Actions over time", actions_over_time),
    ("Latency percentiles", latency_percentiles),
    ("Risk histogram", risk_histogram),
    ("Rule hits", rule_hits),
    ("Fallbacks", fallbacks),
)
