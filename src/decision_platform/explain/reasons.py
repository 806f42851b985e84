"""Deterministic reason codes and the template sentence every decision carries.

These are facts an auditor can check against the decision record: the inputs that moved the risk most
(with their values), the rules that fired, the fallback if any. The sentence is built only from them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from decision_platform.decision.rules import FiredRule

ACTION_NAMES = ("allow", "throttle", "block")
ACTION_VERBS = ("Allowed", "Throttled (step-up required)", "Blocked")
_WINDOWS = {
    "1m": "the last minute",
    "5m": "the last 5 minutes",
    "1h": "the last hour",
    "24h": "the last 24 hours",
}
_AGGREGATES = {"count": "events", "sum": "total amount", "mean": "average amount", "max": "largest amount"}
_FALLBACK_TEXT = {
    "feature_store_unavailable": "the feature store could not be reached",
    "invalid_features": "the features could not be computed",
}


def describe_feature(name: str) -> str:
    """A plain-words name of a feature: ``count_1m`` -> "events in the last minute"."""
    match = re.fullmatch(r"(count|sum|mean|max)_(\w+)", name)
    if match and match.group(2) in _WINDOWS:
        return f"{_AGGREGATES[match.group(1)]} in {_WINDOWS[match.group(2)]}"
    match = re.fullmatch(r"distinct_(\w+)_(\w+)", name)
    if match and match.group(2) in _WINDOWS:
        return f"distinct {match.group(1).replace('_', ' ')}s in {_WINDOWS[match.group(2)]}"
    return {
        "seconds_since_last": "seconds since the previous event",
        "amount": "amount",
        "anomaly": "anomaly score",
        "hour_sin": "time of day",
        "hour_cos": "time of day",
    }.get(name, name.replace("_", " "))


def top_reasons(
    names: Sequence[str], values: Sequence[float], attributions: np.ndarray, k: int = 3
) -> list[dict[str, Any]]:
    """The ``k`` inputs that moved the risk most, largest first."""
    order = np.argsort(-np.abs(attributions))[:k]
    reasons = []
    for i in order:
        weight = float(attributions[i])
        if abs(weight) < 1e-6:
            continue
        reasons.append(
            {
                "feature": names[i],
                "value": round(float(values[i]), 4),
                "direction": "raises_risk" if weight > 0 else "lowers_risk",
                "weight": round(weight, 4),
                "description": describe_feature(names[i]),
            }
        )
    return reasons


def _format_value(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def template_sentence(
    action: int,
    risk: float | None,
    reasons: Sequence[dict[str, Any]],
    rules: Sequence[FiredRule],
    fallback: str | None,
) -> str:
    """One sentence from the facts only; always present, whatever failed."""
    parts = [ACTION_VERBS[action]]
    if fallback:
        cause = _FALLBACK_TEXT.get(fallback, fallback.replace("_", " ").replace(":", ": "))
        parts.append(f" as the safe default because {cause}")
    elif risk is not None:
        parts.append(f": risk {risk:.2f}")
    raising = [r for r in reasons if r["direction"] == "raises_risk"]
    if raising and not fallback:
        facts = ", ".join(f"{r['description']} = {_format_value(r['value'])}" for r in raising[:3])
        parts.append(f"; main factors: {facts}")
    if rules:
        named = ", ".join(f"{r.name} ({r.tier.value})" for r in rules)
        parts.append(f"; rules: {named}")
    return "".join(parts) + "."
