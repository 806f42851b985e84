"""The gradient-boosting baseline the risk model is measured against, and the metrics both get.

A fraud team's afternoon model is scikit-learn's HistGradientBoosting with default settings on the
same feature vector: the platform's PyTorch model has to earn its place against it, so ``train`` fits
both on the same rows and split, prints them side by side, and the registry stores both figures with
the risk model. The fitted baseline is also the PyTorch model's teacher (distillation, see
models/risk.py); it is never served.
"""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

#: The alert rates a review team can afford: the recall of the top 1% and top 5% scored events.
ALERT_RATES = (0.01, 0.05)


def fit_gradient_boosting(x: np.ndarray, y: np.ndarray, seed: int = 0) -> HistGradientBoostingClassifier:
    """Default settings (its own early stopping on a random 10% above 10k rows): the honest baseline."""
    return HistGradientBoostingClassifier(random_state=seed).fit(np.asarray(x, dtype=np.float64), y)


def recall_at_alert_rate(labels: np.ndarray, scores: np.ndarray, rate: float) -> float:
    """Share of the bad events among the ``rate`` highest-scored events (what a review queue catches)."""
    bad = int(np.sum(labels))
    if bad == 0:
        return float("nan")
    top = max(1, round(len(scores) * rate))
    chosen = np.argsort(-np.asarray(scores), kind="stable")[:top]
    return float(np.sum(np.asarray(labels)[chosen]) / bad)


def classifier_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Ranking (ROC-AUC, PR-AUC, recall at each alert rate) and calibration (Brier) of P(bad) scores."""
    labels = np.asarray(labels)
    both = len(set(labels.tolist())) > 1
    metrics = {
        "roc_auc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "pr_auc": float(average_precision_score(labels, scores)) if labels.any() else float("nan"),
        "brier": float(brier_score_loss(labels, scores)),
    }
    for rate in ALERT_RATES:
        metrics[f"recall_at_{rate:.0%}"] = recall_at_alert_rate(labels, scores, rate)
    return metrics
