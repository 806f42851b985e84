"""What ``decision-platform train`` prints once the models are fit: rich tables of the training report."""

from __future__ import annotations

from rich.table import Table

from decision_platform.training.train import PPO_POLICY, RULES_ONLY, TrainReport
from decision_platform.training.yardstick import Interval


def report_tables(report: TrainReport) -> list[Table]:
    """Rich tables of the training report: model metrics, then the policy comparison."""
    models = Table(title="Models (held-out = the later part of time)")
    models.add_column("model")
    models.add_column("version")
    models.add_column("held-out metrics")
    rm = report.risk_metrics
    models.add_row(
        "anomaly", report.versions["anomaly"], f"ROC-AUC {rm['anomaly_roc_auc']:.3f} (unsupervised)"
    )
    models.add_row(
        "risk", report.versions["risk"], _classifier_figures(rm) + f"  (base rate {rm['base_rate']:.3%})"
    )
    if "baseline" in rm:
        models.add_row("  baseline: gradient boosting", "not served", _classifier_figures(rm["baseline"]))
    models.add_row("policy", report.versions["policy"], f"{report.served} (comparison below)")

    policies = Table(
        title="Policies on held-out time: expected total reward per entity (simulator, rewards.yaml units)",
        caption=f"Differences are paired to the best baseline ({report.best_baseline}), 95% CIs by bootstrap "
        f"over entities. {RULES_ONLY}: allow unless a rule blocks or steps up; at serving the rules apply "
        f"on top of every policy. Served as the policy: {report.served}"
        + ("." if report.served == PPO_POLICY else " (PPO earned less than the best baseline: not served)."),
    )
    for column in (
        "policy",
        "reward / entity [95% CI]",
        "- best baseline",
        "reward / decision",
        "fraud stopped / reached",
        "fraud $ lost",
        "good throttled",
        "good blocked",
        "decisions",
    ):
        policies.add_column(column, justify="right" if column != "policy" else "left")
    for c in report.policies:
        served = " [bold](served)[/bold]" if c.name == report.served else ""
        diff = "—" if c.name == report.best_baseline else _interval(c.per_entity_diff, signed=True)
        policies.add_row(
            c.name + served,
            _interval(c.per_entity),
            diff,
            f"{c.per_decision.value:.3f}",
            f"{c.fraud_stopped:,.1f}/{c.fraud_reached:,.1f} ({c.fraud_caught_rate:.0%})",
            f"{c.fraud_amount_lost:,.0f}",
            f"{c.good_throttled:,.1f}",
            f"{c.good_blocked:,.1f}",
            f"{c.decisions:,.0f}",
        )
    return [models, policies]


def _classifier_figures(metrics: dict) -> str:
    """ROC-AUC, PR-AUC, Brier and the recall of a review queue of 1% / 5% of events."""
    return (
        f"ROC-AUC {metrics['roc_auc']:.3f}  PR-AUC {metrics['pr_auc']:.3f}  Brier {metrics['brier']:.4f}  "
        f"recall@1% {metrics['recall_at_1%']:.1%}  recall@5% {metrics['recall_at_5%']:.1%}"
    )


def _interval(i: Interval, signed: bool = False) -> str:
    f = "+.3f" if signed else ".3f"
    return f"{i.value:{f}} [{i.low:{f}}, {i.high:{f}}]"
