"""``decision-platform rules backtest RULES.yaml --since 7d``: a rule what-if on the logged decisions.

The same replay as the console's what-if page (learning/backtest.py), printed as tables; a rules file
that does not load (YAML, a field, CEL that does not compile) is printed with the rule it names and exits 2.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from decision_platform.cli.common import console, time_window
from decision_platform.core.actions import ACTION_NAMES
from decision_platform.core.events import INT64_MAX

if TYPE_CHECKING:
    from decision_platform.learning.backtest import BacktestResult

rules_app = typer.Typer(help="Hard rules: try a rules.yaml on logged decisions.", no_args_is_help=True)


@rules_app.command("backtest")
def backtest_command(
    rules_file: Path = typer.Argument(..., help="the rules.yaml to try (the live rules are not touched)"),
    since: str = typer.Option(
        "7d", help="start: an age (90m, 6h, 7d) or an ISO 8601 time (UTC if no offset)"
    ),
    until: str = typer.Option("now", help="end: now, an age or an ISO 8601 time"),
    limit: int | None = typer.Option(
        None,
        min=1,
        max=INT64_MAX - 1,  # one more is read (to tell a truncated window): beyond it, SQL's OverflowError
        help="replay at most the newest N decisions of the window",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON instead of tables"),
) -> None:
    """Replay the window's logged decisions (stored features and scores) under RULES_FILE: how many each
    rule would change, actions before and after, and the estimated reward change on labelled outcomes."""
    from decision_platform.config import get_settings
    from decision_platform.core.rewards import RewardTable
    from decision_platform.core.strict_yaml import read_config_text
    from decision_platform.features import FeatureSpec
    from decision_platform.learning.backtest import ServingChoice, backtest
    from decision_platform.rules.ruleset import RulesError, RuleSet
    from decision_platform.storage.database import open_database
    from decision_platform.storage.repository import Repository

    settings = get_settings()
    start, end = time_window(since, until)
    try:
        text = read_config_text(rules_file)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {rules_file}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # was a traceback
        raise typer.BadParameter(f"cannot read {rules_file}: not UTF-8 text (byte {exc.start + 1})") from None
    except ValueError as exc:  # /dev/zero: was read for ever
        raise typer.BadParameter(f"cannot read {rules_file}: {exc}") from None
    names = FeatureSpec.load(settings.features_path).names
    try:
        rules = RuleSet.from_text(text, names)
    except RulesError as exc:
        console.print(f"{rules_file}: {exc}", style="red", highlight=False, markup=False)  # tags were printed
        raise typer.Exit(2) from None
    engine = open_database(settings)
    try:
        choice = ServingChoice(settings.safe_action, settings.exploration_floor, settings.explore_actions)
        rewards = RewardTable.load(settings.rewards_path)
        # --json: stdout carries the JSON alone (no spinner).
        with contextlib.nullcontext() if as_json else console.status("replaying logged decisions"):
            result = backtest(Repository(engine), rules, rewards, start, end, choice, limit)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(result.as_dict(), default=str, indent=2))
        return
    _print(result)


def _print(result: BacktestResult) -> None:
    window = f"{result.since:%Y-%m-%d %H:%M} to {result.until:%Y-%m-%d %H:%M} UTC"
    more = " (the window holds more: the newest were replayed)" if result.truncated else ""
    console.print(f"{result.changed:,} of {result.decisions:,} decisions would change, {window}{more}")
    matrix = Table(title="Actions before (rows) and after (columns)")
    matrix.add_column("before \\ after")
    for name in ACTION_NAMES:
        matrix.add_column(name, justify="right")
    matrix.add_column("total", justify="right")
    for b, name in enumerate(ACTION_NAMES):
        cells = [
            f"[bold]{n:,}[/bold]" if a != b and n else f"{n:,}" for a, n in enumerate(result.transitions[b])
        ]
        matrix.add_row(name, *cells, f"{result.actions_before[b]:,}")
    matrix.add_row("total", *(f"{n:,}" for n in result.actions_after), "")
    console.print(matrix)
    rules = Table(title="Per rule")
    for column in ("rule", "tier", "fires (new)", "fired (logged)", "errors", "changed", "reward change"):
        rules.add_column(column, justify="left" if column in ("rule", "tier") else "right")
    for r in result.rules:
        rules.add_row(
            r.name,
            r.tier or "removed",
            f"{r.hits:,}" if r.tier else "-",
            f"{r.logged_hits:,}",
            f"{r.errors:,}",
            f"{r.changed:,}",
            f"{r.reward_change:+.2f}",
        )
    console.print(rules)
    if result.estimated:
        console.print(
            f"estimated reward change {result.reward_change:+.2f} over {result.estimated:,} labelled "
            f"decisions whose action changes ({result.reward_before:.2f} as logged, "
            f"{result.reward_after:.2f} new)"
        )
    else:
        console.print("no labelled decision changes: no reward estimate")
    console.print(
        f"{result.unlabelled_changed:,} changed decisions have no outcome and are not estimated"
        + (
            f"; {result.not_estimable:,} have an outcome that cannot follow the new action"
            if result.not_estimable
            else ""
        )
    )
