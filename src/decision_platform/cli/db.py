"""``decision-platform db ...``: the decision log's day partitions on PostgreSQL (create ahead, retention).

The API and the worker create partitions ahead on their own (at start, then every
``DP_DB_PARTITION_CHECK_S``); these commands are for operators and cron: make days ahead before a
quiet period, see what exists, and drop what is older than the retention period.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from decision_platform.cli.common import console
from decision_platform.config import get_settings

if TYPE_CHECKING:
    import sqlalchemy as sa

    from decision_platform.storage.partitions import Partition

db_app = typer.Typer(
    help="The decision log on PostgreSQL: day partitions created ahead, and retention.", no_args_is_help=True
)


def _partitioned_engine() -> sa.Engine:
    """The configured database, migrated (partitions left to the command), or exit when it is SQLite."""
    from decision_platform.storage.database import make_engine, migrate
    from decision_platform.storage.partitions import is_partitioned

    settings = get_settings()
    engine = make_engine(settings.database_url, settings.database_schema)
    migrate(engine, settings.database_schema, partitions_ahead_days=None)
    if not is_partitioned(engine):
        engine.dispose()
        console.print("the decision log is one table here (SQLite): nothing to partition")
        raise typer.Exit(0)
    return engine


def _table(partitions: list[Partition], title: str) -> Table:
    from decision_platform.core.ids import id_timestamp

    table = Table("partition", "from (UTC)", "to (UTC)", "rows (estimate)", title=title)
    for p in partitions:
        start = "-" if p.low is None else f"{datetime.fromtimestamp(id_timestamp(p.low), UTC):%Y-%m-%d %H:%M}"
        end = "-" if p.high is None else f"{datetime.fromtimestamp(id_timestamp(p.high), UTC):%Y-%m-%d %H:%M}"
        table.add_row(p.name, start, end, str(max(p.rows_estimate, 0)))
    return table


@db_app.command("partitions")
def partitions_command(
    ahead: int | None = typer.Option(
        None, "--ahead", min=0, max=366, help="Days after today [default: DP_DB_PARTITIONS_AHEAD_DAYS]"
    ),
) -> None:
    """Create the day partitions of today and the next ``--ahead`` days where missing, then list all."""
    from decision_platform.storage.partitions import ensure_partitions, list_partitions

    engine = _partitioned_engine()
    days = get_settings().db_partitions_ahead_days if ahead is None else ahead
    result = ensure_partitions(engine, days)
    console.print(_table(list_partitions(engine), "decision log partitions"))
    console.print(f"created {len(result.created)}: {', '.join(result.created) or 'none'}")
    if result.in_default:
        days_left = ", ".join(result.in_default)
        console.print(f"[yellow]left in the default partition (it holds rows of those days): {days_left}")
    engine.dispose()


@db_app.command("retention")
def retention_command(
    keep: str = typer.Option(..., "--keep", help="How long decisions are kept: an age such as 90d or 36h."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list the partitions that would be dropped."),
) -> None:
    """Drop the day partitions whose decisions are all older than ``--keep``, with their outcomes,
    narratives and event claims (the default partition is never dropped)."""
    from decision_platform.reporting import parse_time
    from decision_platform.storage.partitions import drop_partitions_before

    now = datetime.now(UTC)
    try:
        cutoff = parse_time(keep, now)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--keep") from None
    if cutoff > now:
        raise typer.BadParameter("must be an age (e.g. 90d), not a future time", param_hint="--keep")
    engine = _partitioned_engine()
    dropped = drop_partitions_before(engine, cutoff, dry_run=dry_run)
    verb = "would drop" if dry_run else "dropped"
    console.print(_table(dropped, f"{verb}: decisions made before {cutoff:%Y-%m-%d %H:%M} UTC"))
    console.print(f"{verb} {len(dropped)} partitions")
    engine.dispose()
