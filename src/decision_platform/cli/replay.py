"""What ``decision-platform replay`` prints at the end: what was sent, and the outcomes posted."""

from __future__ import annotations

from rich.table import Table

from decision_platform.learning.replay import ReplaySummary


def summary_tables(summary: ReplaySummary, target: str, outcome_delay: float | None) -> list[Table]:
    """The traffic table, and with outcomes (``outcome_delay`` set) the outcomes table."""
    table = Table(title=f"replay to {target}")
    for column in ("sent", "acknowledged", "errors", "seconds", "rate achieved (ev/s)"):
        table.add_column(column, justify="right")
    table.add_row(
        str(summary.sent),
        str(summary.acknowledged),
        str(summary.errors),
        f"{summary.seconds:.1f}",
        f"{summary.rate:,.0f}",
    )
    if outcome_delay is None:
        return [table]
    posted = Table(title=f"outcomes ({outcome_delay:g} s after each decision)")
    for column in ("posted", "conflicts (409)", "failed", *summary.outcomes):
        posted.add_column(column, justify="right")
    posted.add_row(
        str(summary.outcomes_posted),
        str(summary.outcomes_conflicts),
        str(summary.outcomes_failed),
        *(str(n) for n in summary.outcomes.values()),
    )
    return [table, posted]
