"""``decision-platform spool ...``: what the local spool holds, and putting quarantined records back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.table import Table

from decision_platform.cli.common import console
from decision_platform.config import get_settings

spool_app = typer.Typer(
    help="The local spool: decisions and outcomes acknowledged while the database could not take them.",
    no_args_is_help=True,
)


@contextlib.contextmanager
def _readable_spool() -> Iterator[None]:
    """A spool directory the command cannot read (a quarantine.jsonl that is a directory, a disk error):
    one line naming the file, exit 2 -- it was a traceback."""
    try:
        yield
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        console.print(f"[red]cannot read the spool:[/red] {where}{exc.strerror or exc}", soft_wrap=True)
        raise typer.Exit(2) from None


@spool_app.command("status")
def spool_status() -> None:
    """Records waiting for the database, and the quarantine (records it refused), with why."""
    from decision_platform.storage.spool import Spool

    settings = get_settings()
    with _readable_spool():
        spool = Spool(settings.spool_dir)  # adopts no segment a running process holds: those are its own
        entries = spool.quarantine_entries()
    console.print(
        f"spool {settings.spool_dir}: {spool.pending()} records not owned by a running process pending, "
        f"{len(entries)} quarantined"
    )
    spool.close()
    if entries:
        table = Table("quarantined at", "decision", "error")
        for entry in entries[-50:]:
            table.add_row(entry.quarantined_at, str(entry.decision_id or "?"), entry.error[:100])
        console.print(table)


@spool_app.command("requeue")
def spool_requeue() -> None:
    """Put the quarantined records back in the spool (after fixing why the database refused them): a
    running server adopts them within seconds, or the next start does."""
    from decision_platform.storage.spool import Spool

    with _readable_spool():
        spool = Spool(get_settings().spool_dir)
        moved = spool.requeue_quarantined()
    spool.close()  # releases the segment: a running writer adopts it
    console.print(f"{moved} records requeued for replay")
