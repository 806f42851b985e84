"""What ``decision-platform train`` prints once the models are fit: rich tables of the training report."""

from __future__ import annotations

from rich.table import Table

from decision_platform.training.train import RULES_ONLY, TrainReport


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
    models.add_row("policy", report.versions["policy"], "see the comparison below")

    policies = Table(
        title="Expected reward per decision on held-out entities (simulator, rewards.yaml units)",
        caption=f"{RULES_ONLY}: allow unless a rule blocks or steps up. At serving the rules apply on "
        "top of every policy.",
    )
    for column in (
        "policy",
        "reward / decision",
        "95% CI",
        "fraud stopped",
        "fraud $ lost",
        "good blocked",
        "good throttled",
        "decisions",
    ):
        policies.add_column(column, justify="right" if column != "policy" else "left")
    for r in report.policies:
        policies.add_row(
            r.name,
            f"{r.reward_per_decision:.3f}",
            f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
            f"{r.fraud_stopped}/{r.fraud_events} ({r.fraud_caught_rate:.0%})",
            f"{r.fraud_amount_lost:,.0f}",
            str(r.good_blocked),
            str(r.good_throttled),
            str(r.decisions),
        )
    return [models, policies]


def _classifier_figures(metrics: dict) -> str:
    """ROC-AUC, PR-AUC, Brier and the recall of a review queue of 1% / 5% of events."""
    return (
        f"ROC-AUC {metrics['roc_auc']:.3f}  PR-AUC {metrics['pr_auc']:.3f}  Brier {metrics['brier']:.4f}  "
        f"recall@1% {metrics['recall_at_1%']:.1%}  recall@5% {metrics['recall_at_5%']:.1%}"
    )
