"""The report as one self-contained HTML file: a summary table and the charts as embedded PNGs.

One file (images as data: URIs) so that it can be attached to a ticket or mailed to an auditor and still
show everything; no script, no external asset.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from html import escape

import numpy as np

from decision_platform.core.actions import ACTION_NAMES
from decision_platform.reporting.charts import CHARTS, LATENCY_BUDGET_MS
from decision_platform.reporting.data import ReportData

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 960px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.muted { color: #666; } table { border-collapse: collapse; margin: 0.5em 0; }
td, th { padding: 3px 12px 3px 0; text-align: left; } td.n { text-align: right; }
img { max-width: 100%; display: block; margin: 0.4em 0 1em; }
"""


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{escape(k)}</th><td class='n'>{escape(v)}</td></tr>" for k, v in pairs)


def summary(data: ReportData) -> list[tuple[str, str]]:
    """The headline numbers, as (label, value) rows."""
    n = data.count
    rows = [("decisions", f"{n:,}")]
    for action, name in enumerate(ACTION_NAMES):
        k = int(np.sum(data.actions == action))
        rows.append((name, f"{k:,} ({k / n:.1%})" if n else "0"))
    for source, k in sorted(data.decided_by.items()):
        rows.append((f"decided by {source}", f"{k:,} ({k / n:.1%})"))
    fell_back = int(data.fell_back.sum())
    rows.append(("fallbacks", f"{fell_back:,} ({fell_back / n:.1%})" if n else "0"))
    if n:
        p50, p95, p99 = np.percentile(data.latency_ms, [50, 95, 99])
        rows.append(("latency p50 / p95 / p99", f"{p50:.2f} / {p95:.2f} / {p99:.2f} ms"))
        within = float(np.mean(data.latency_ms <= LATENCY_BUDGET_MS))
        rows.append((f"within {LATENCY_BUDGET_MS:g} ms", f"{within:.2%}"))
        scored = data.risk[~np.isnan(data.risk)]
        if scored.size:
            rows.append(("mean risk", f"{scored.mean():.3f}"))
    return rows


def render(data: ReportData, generated_at: datetime | None = None) -> str:
    """The HTML page (charts included only when the range has decisions)."""
    generated_at = generated_at or datetime.now(UTC)
    span = f"{data.since:%Y-%m-%d %H:%M} to {data.until:%Y-%m-%d %H:%M} UTC"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Decision report {escape(span)}</title><style>{_STYLE}</style></head><body>",
        "<h1>Decision report</h1>",
        f"<p class='muted'>{escape(span)} &middot; generated {generated_at:%Y-%m-%d %H:%M} UTC from the "
        "decisions table</p>",
        f"<h2>Summary</h2><table>{_rows(summary(data))}</table>",
    ]
    if data.outcomes:
        outcome_rows = [
            (name, f"{n:,}, mean reward {mean:+.2f}") for name, (n, mean) in data.outcomes.items()
        ]
        parts.append(f"<h2>Outcomes received</h2><table>{_rows(sorted(outcome_rows))}</table>")
    if data.count == 0:
        parts.append("<p><strong>No decisions in this range.</strong></p>")
    else:
        for title, chart in CHARTS:
            image = base64.b64encode(chart(data)).decode("ascii")
            parts.append(
                f"<h2>{escape(title)}</h2><img alt='{escape(title)}' src='data:image/png;base64,{image}'>"
            )
    parts.append("</body></html>\n")
    return "\n".join(parts)
