"""``decision-platform report``: registered with ``app.command("report")(report)`` in cli/main.py."""

from __future__ import annotations

from pathlib import Path

import typer


def report(
    since: str = typer.Option(
        "24h", help="start: an age (90m, 6h, 7d) or an ISO 8601 time (UTC if no offset)"
    ),
    until: str = typer.Option("now", help="end: now, an age or an ISO 8601 time"),
    out: Path = typer.Option(Path("decision-report.html"), help="the HTML file to write"),
) -> None:
    """Write a static HTML page with charts of the decisions of a time range (from the database)."""
    from decision_platform.cli.common import time_window
    from decision_platform.config import get_settings
    from decision_platform.reporting import write_report
    from decision_platform.storage.database import open_database

    start, end = time_window(since, until)
    settings = get_settings()
    engine = open_database(settings)
    try:
        data = write_report(engine, start, end, out)
    except OSError as exc:  # --out a directory, or where nothing can be written: was a traceback
        raise typer.BadParameter(
            f"cannot write the report: {exc.strerror or exc}", param_hint="'--out'"
        ) from None
    finally:
        engine.dispose()
    typer.echo(f"{data.count:,} decisions from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC -> {out}")
