"""``decision-platform retrain``: learn from logged outcomes, judge off-policy, promote through the gate."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.console import Console
from rich.table import Table

from decision_platform.cli.common import SEED_MAX, config_file
from decision_platform.config import get_settings

console = Console() if Console().is_terminal else Console(width=160)


def _utc(value: datetime | None) -> datetime | None:
    """--since / --until are UTC, as for every command (taken for local time, year 1 was a traceback)."""
    return value.replace(tzinfo=UTC) if value is not None else None


def retrain(
    since: datetime | None = typer.Option(
        None, help="only decisions made at or after this time (ISO, UTC)", callback=_utc
    ),
    until: datetime | None = typer.Option(
        None, help="only decisions made before this time (ISO, UTC)", callback=_utc
    ),
    timesteps: int | None = typer.Option(None, min=0, help="PPO steps (default: config/learning.yaml)"),
    promote: bool = typer.Option(True, help="promote the candidate if it passes the gate"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX),
) -> None:
    """Retrain risk and policy from decisions ⋈ outcomes; promote only if the off-policy gate passes."""
    from decision_platform.cli.progress import RichProgress
    from decision_platform.core.rewards import RewardTable
    from decision_platform.learning.config import LearningConfig
    from decision_platform.learning.retrain import RetrainError
    from decision_platform.learning.retrain import retrain as run
    from decision_platform.models.registry import ModelRegistry
    from decision_platform.storage.database import open_database
    from decision_platform.storage.repository import Repository

    settings = get_settings()
    learning = config_file(settings.learning_path, LearningConfig.load)
    rewards = config_file(settings.rewards_path, RewardTable.load_for_learning)
    engine = open_database(settings)
    registry = ModelRegistry(Repository(engine), settings.model_dir)
    try:
        with RichProgress(console) as progress:
            report = run(
                settings,
                registry,
                learning,
                rewards,
                since=since,
                until=until,
                promote=promote,
                timesteps=timesteps,
                seed=seed,
                progress=progress,
            )
    except RetrainError as exc:
        console.print(f"[red]cannot retrain:[/red] {exc}")
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    for table in report_tables(report):
        console.print(table)
    if report.promoted:
        console.print(f"[green]promoted[/green] {', '.join(report.versions.values())}")
    elif report.gate.passed:
        console.print(f"passed the gate, not promoted (--no-promote): {', '.join(report.versions.values())}")
    else:
        kept = ", ".join(report.versions.values())
        console.print(f"[yellow]not promoted[/yellow] ({kept} kept as challenger):")
        for failure in report.gate.failures:
            console.print(f"  - {failure}")
    console.print(f"report: {report.files['json']}  plot: {report.files['png']}")


def report_tables(report: object) -> list[Table]:
    from decision_platform.learning.retrain import RetrainReport

    assert isinstance(report, RetrainReport)
    data = Table(title="Logged data", show_header=True)
    for column in ("decisions", "with outcome", "imputed", "labelled", "bad", "train", "held out"):
        data.add_column(column, justify="right")
    d = report.data
    data.add_row(
        *(str(d[k]) for k in ("decisions", "with_outcome", "imputed", "labelled", "bad", "train", "holdout"))
    )
    imputed = report.imputed
    data.caption = (
        f"this run imputed {imputed['total']} outcomes: {imputed['blocked_bad']} blocked events labelled "
        f"bad and {imputed['blocked_good']} good by the risk model, {imputed['default_reward']} given the "
        f"default reward; {d['imputed_labels']} imputed labels were used"
    )

    risk = report.risk
    risk_table = Table(title="Risk model on held-out labelled decisions")
    for column in ("model", "ROC-AUC", "PR-AUC"):
        risk_table.add_column(column, justify="right" if column != "model" else "left")
    for name in ("champion", "candidate"):
        if f"{name}_roc_auc" in risk:
            risk_table.add_row(name, f"{risk[f'{name}_roc_auc']:.3f}", f"{risk[f'{name}_pr_auc']:.3f}")
    refit = risk.get("refit")
    risk_table.caption = "refit on outcome labels" if refit else f"not refit: {risk.get('why_not')}"

    ope = Table(title="Off-policy estimates: reward per decision on held-out logged decisions (95% CI)")
    ope.add_column("policy")
    for name in report.champion.estimates:
        ope.add_column(name, justify="right")
    for column in ("ESS", "max weight", "good blocked", "fraud allowed"):
        ope.add_column(column, justify="right")
    for policy in (report.champion, report.candidate):
        ope.add_row(
            f"{policy.name} {policy.version}",
            *(f"{e.value:.3f} [{e.ci_low:.3f}, {e.ci_high:.3f}]" for e in policy.estimates.values()),
            f"{policy.effective_sample_size:.0f} / {policy.decisions}",
            f"{policy.max_weight:.1f}",
            f"{policy.good_block_rate:.2%}" if policy.good_events else "no labels",
            f"{policy.fraud_allow_rate:.1%}" if policy.fraud_events else "no labels",
        )

    d = report.difference
    ope.caption = "candidate - champion on the same decisions (paired bootstrap): " + ", ".join(
        f"{k} {e.value:+.3f} [{e.ci_low:+.3f}, {e.ci_high:+.3f}]" for k, e in d.items()
    )

    tables = [data, risk_table]
    if report.baselines is not None:
        tables.append(baselines_table(report.baselines))

    gate = Table(title="Promotion gate (config/learning.yaml)")
    for column in ("check", "result", "detail"):
        gate.add_column(column)
    for check in report.gate.checks:
        gate.add_row(check.name, "[green]pass[/green]" if check.passed else "[red]fail[/red]", check.detail)
    return [*tables, ope, gate]


def baselines_table(verdict: object) -> Table:
    """PPO against the baselines `train` uses, in the simulator of the labelled held-out histories."""
    from decision_platform.training.train import PPO_POLICY, Verdict

    assert isinstance(verdict, Verdict)
    table = Table(
        title="Candidate against the baselines: expected total reward per entity, labelled held-out rows",
        caption=f"paired to the best baseline ({verdict.best_baseline}); the candidate is "
        + (
            "the PPO policy"
            if verdict.served == PPO_POLICY
            else f"{verdict.served}: PPO earned less than it, so the baseline is the candidate"
        ),
    )
    for column in ("policy", "reward / entity [95% CI]", "- best baseline", "reward / decision"):
        table.add_column(column, justify="right" if column != "policy" else "left")
    for name, c in verdict.comparisons.items():
        e, d = c.per_entity, c.per_entity_diff
        table.add_row(
            name + (" (candidate)" if name == verdict.served else ""),
            f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]",
            "—" if name == verdict.best_baseline else f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}]",
            f"{c.per_decision.value:.3f}",
        )
    return table
