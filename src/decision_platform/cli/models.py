"""``decision-platform models ...``: the registry from the command line (list, promote, roll back,
shadow, compare)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import typer
from rich.table import Table

from decision_platform.cli.common import console, open_registry
from decision_platform.config import get_settings
from decision_platform.core.actions import MODEL_KINDS
from decision_platform.core.events import INT64_MAX

T = TypeVar("T")

models_app = typer.Typer(
    help="The model registry: list, promote, roll back, shadow, compare.", no_args_is_help=True
)


def _version(value: str) -> str:
    """VERSION's callback: a text that cannot be a version (not UTF-8 on the command line, too long)
    names no model; the driver raised on it (a traceback)."""
    from decision_platform.models.registry import is_version

    if not is_version(value):
        raise typer.BadParameter(
            f"not a model version: {ascii(value)[:80]} (letters, digits and _ . : -, at most 64)"
        )
    return value


def _kind(value: str | None) -> str | None:
    """--kind's callback: a misspelt kind listed nothing, or was taken for a registry refusal."""
    if value is not None and value not in MODEL_KINDS:
        raise typer.BadParameter(
            f"{ascii(value)[:80]}: expected {', '.join(MODEL_KINDS[:-1])} or {MODEL_KINDS[-1]}"
        )
    return value


def _since_time(value: str | None) -> datetime | None:
    """--since as a UTC time (naive: UTC); year 1 with an offset, out of the range of dates once in UTC,
    was an OverflowError from the query (a traceback)."""
    if value is None:
        return None
    hint = "'--since'"
    try:
        start = datetime.fromisoformat(value)
        return start.astimezone(UTC) if start.tzinfo else start.replace(tzinfo=UTC)
    except ValueError:
        raise typer.BadParameter(f"not an ISO 8601 date/time: {ascii(value)[:80]}", param_hint=hint) from None
    except OverflowError:
        raise typer.BadParameter(f"{ascii(value)[:80]}: out of the range of dates", param_hint=hint) from None


_STATUS_STYLE = {"champion": "bold green", "shadow": "bold magenta", "retired": "dim"}
_REFRESH_NOTE = "running servers pick it up within DP_MODEL_REFRESH_S seconds"


def _registry_command(operation: Callable[[], T]) -> T:
    """Run a registry operation; its refusal is printed in red and exits 1."""
    from decision_platform.models.registry import CorruptArtifactError, RegistryError

    try:
        return operation()
    except (RegistryError, CorruptArtifactError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


@models_app.command("list")
def models_list(
    kind: str | None = typer.Option(None, help="anomaly, risk or policy", callback=_kind),
) -> None:
    """Registered models, newest first; the champions in green, the shadow in magenta."""
    table = Table(title="Model registry")
    for column in ("version", "kind", "status", "created", "promoted", "data window", "key metric"):
        table.add_column(column)
    for row in open_registry(get_settings()).repository.list_models(kind):
        # Either JSON may be of another shape in a row a hand edit left: listed without it, not a traceback.
        metrics = row["metrics"] if isinstance(row["metrics"], dict) else {}
        key = next((f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)), "")
        window = row["data_window"] if isinstance(row["data_window"], dict) else {}
        style = _STATUS_STYLE.get(row["status"], "")
        table.add_row(
            row["version"],
            row["kind"],
            f"[{style}]{row['status']}[/{style}]" if style else row["status"],
            f"{row['created_at']:%Y-%m-%d %H:%M}" if row["created_at"] else "?",  # unreadable (hand edit)
            f"{row['promoted_at']:%Y-%m-%d %H:%M}" if row["promoted_at"] else "",
            f"{window.get('source')} ({window.get('events')} events)",
            key,
        )
    console.print(table)


@models_app.command("promote")
def models_promote(version: str = typer.Argument(..., callback=_version)) -> None:
    """Make VERSION the champion of its kind (a shadow stops shadowing); the champion is retired."""
    _registry_command(lambda: open_registry(get_settings()).promote(version))
    console.print(f"{version} is now the champion; {_REFRESH_NOTE}")


@models_app.command("rollback")
def models_rollback(
    kind: str | None = typer.Option(
        None, help="anomaly, risk or policy (default: all three, together)", callback=_kind
    ),
) -> None:
    """Make the previously promoted version the champion again and retire the current one."""
    plan = _registry_command(lambda: open_registry(get_settings()).rollback(kind))
    for k, (old, new) in plan.items():
        console.print(f"{k}: {old or '(none)'} -> [bold green]{new}[/bold green]")
    console.print(f"rolled back; {_REFRESH_NOTE}")


@models_app.command("shadow")
def models_shadow(version: str = typer.Argument(..., callback=_version)) -> None:
    """Serve VERSION (a policy) as the shadow: scored on every decision and logged, never applied."""
    replaced = _registry_command(lambda: open_registry(get_settings()).shadow(version))
    if replaced:
        console.print(f"{replaced} stopped shadowing (now a challenger)")
    console.print(f"{version} is now the shadow policy; {_REFRESH_NOTE}")


@models_app.command("unshadow")
def models_unshadow() -> None:
    """Stop shadowing: the shadow policy goes back to challenger."""
    removed = _registry_command(lambda: open_registry(get_settings()).unshadow("policy"))
    console.print(f"{removed} is no longer the shadow" if removed else "there was no shadow policy")


@models_app.command("compare")
def models_compare(
    since: str | None = typer.Option(None, help="ISO 8601: only decisions made since (naive: UTC)"),
    limit: int | None = typer.Option(
        None, min=1, max=INT64_MAX, help="at most the newest N shadowed decisions"
    ),
    version: str | None = typer.Option(None, help="the shadow version (default: the newest logged)"),
) -> None:
    """Champion vs shadow on logged decisions: agreement, who chose what, and value per decision."""
    from decision_platform.core.actions import ACTION_NAMES
    from decision_platform.learning.compare import compare_logged

    start = _since_time(since)
    settings = get_settings()
    registry = open_registry(settings)
    result = compare_logged(
        registry.repository, settings.exploration_floor, settings.explore_actions, start, limit, version
    )
    if not result.decisions:
        console.print("no logged decisions with a shadow policy (set one with `models shadow VERSION`)")
        raise typer.Exit(0)
    champions = ", ".join(f"{v} ({n})" for v, n in result.champion_versions.items())
    console.print(f"shadow [bold magenta]{result.shadow_version}[/bold magenta] vs champion {champions}")
    if result.other_shadow_versions:
        console.print(f"[dim]left out, other shadows: {result.other_shadow_versions}[/dim]")
    console.print(f"{result.decisions} decisions, agreement {result.agreement or 0.0:.1%}")

    table = Table(title="champion choice (rows) x shadow choice (columns)")
    table.add_column("champion \\ shadow")
    for name in ACTION_NAMES:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for action, counts in enumerate(result.confusion):
        cells = [f"[bold]{n}[/bold]" if a == action else str(n) for a, n in enumerate(counts)]
        table.add_row(ACTION_NAMES[action], *cells, str(sum(counts)))
    console.print(table)

    if result.champion_value is None:
        console.print(
            f"{result.with_outcome} of them have an outcome: too few for value estimates (need 2); "
            "outcomes arrive with POST /outcome"
        )
        return
    values = Table(
        title=f"value per decision on the {result.with_outcome} with an outcome "
        f"({result.imputed} imputed), 95% bootstrap CI",
        caption=f"shadow: off-policy (effective sample size {result.effective_sample_size:.0f}, "
        f"max weight {result.max_weight:.1f}); champion: on-policy mean (it chose the logged actions)",
    )
    for column in ("policy", "estimator", "value", "CI"):
        values.add_column(column, justify="right" if column in ("value", "CI") else "left")
    rows = [("champion", result.champion_value)]
    rows += [("shadow", estimate) for estimate in result.shadow_values.values()]
    if result.difference is not None:
        rows.append(("shadow - champion", result.difference))
    for policy, estimate in rows:
        values.add_row(
            policy, estimate.name, f"{estimate.value:.3f}", f"[{estimate.ci_low:.3f}, {estimate.ci_high:.3f}]"
        )
    console.print(values)
