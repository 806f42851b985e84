"""``decision-platform explain DECISION_ID``: the facts of a decision and its narrative.

Registered in cli/main.py with ``app.command("explain")(explain)``. It needs only the database, the risk
model's ranges and the LLM (if configured): not the feature store or the other models, so it works
against a production database from an analyst's laptop. A narrative already stored is shown as is (the
one that was served); otherwise one is written now, checked, and stored, exactly as the API would.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from decision_platform.config import get_settings
from decision_platform.core.events import INT64_MAX

console = Console()


def explain(
    # Ids are BIGINT: a larger one names no decision (it was an OverflowError from the driver).
    decision_id: int = typer.Argument(..., min=1, max=INT64_MAX, help="the decision_id returned by /decide"),
    generate: bool = typer.Option(True, help="write the narrative now if none is stored (needs DP_LLM_URL)"),
) -> None:
    """Print the facts of a decision (action, risk, reasons with normal ranges, rules) and its narrative."""
    from decision_platform.explain.facts import Facts
    from decision_platform.explain.llm import open_chat_client
    from decision_platform.explain.narrator import Narrator
    from decision_platform.models.ranges import ranges_of_model
    from decision_platform.storage.database import open_database
    from decision_platform.storage.decisions import intact
    from decision_platform.storage.errors import DamagedDecisionError
    from decision_platform.storage.repository import Repository

    settings = get_settings()
    repository = Repository(open_database(settings))
    try:
        record = repository.get_decision(decision_id)
        if record is None:
            console.print(f"[red]no decision {decision_id}[/red]")
            raise typer.Exit(1)
        try:  # first: the ranges are looked up by its model versions
            intact(record, "explain cli")
        except DamagedDecisionError as exc:  # named, as the API's 409 does; no facts can be built from it
            console.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(1) from None
        version = (record.model_versions or {}).get("risk")
        ranges = ranges_of_model(settings.model_dir, repository.get_model(version)) if version else None
        client = open_chat_client(settings) if generate else None
        narrator = Narrator(settings, repository, client, ranges)
        try:
            writing = f"; written now by {client.backend}: {client.model} if none is stored" if client else ""
            with console.status(f"the narrative{writing}"):
                explanation = narrator.explanation_now(record)
        finally:
            narrator.close()
        facts = Facts.from_dict(explanation.facts)
        console.print(_facts_table(facts))
        source = explanation.source + (f" ({explanation.reason})" if explanation.reason else "")
        subtitle = f"source: {source}"
        if explanation.model:
            subtitle += f" | model: {explanation.model} | prompt: {explanation.prompt_version}"
        if explanation.latency_ms is not None:
            subtitle += f" | {explanation.latency_ms / 1000:.1f} s"
        console.print(Panel(explanation.narrative, title="Narrative", subtitle=subtitle, expand=False))
        grounding = explanation.grounding or {}
        for rejected in grounding.get("rejected") or ():
            console.print(
                f"[yellow]rejected[/yellow] {rejected['narrative']}\n  because: {rejected['problems']}"
            )
    finally:
        repository.engine.dispose()


def _facts_table(facts: object) -> Table:
    from decision_platform.explain.facts import Facts

    assert isinstance(facts, Facts)
    table = Table(title=f"Decision {facts.decision_id} (entity {facts.entity_id})", show_header=False)
    table.add_column("fact", style="bold")
    table.add_column("value")
    for line in facts.trusted_text().splitlines():
        label, _, value = line.partition(": ")
        table.add_row(label, value)
    table.add_row("Event data (untrusted)", facts.data_text())
    return table
