"""Champion vs shadow on live traffic: how often they agree, and what each is worth per decision.

A shadow policy scores every decision beside the champion and its choice is logged in
``decisions.shadow`` (``{"version", "action", "probabilities"}``: the shadow's distribution restricted by
the same rules, with the same exploration floor, and its argmax), never applied. This module reads those
logged decisions back and answers the question a promotion needs:

- Agreement: the share of decisions where the shadow's choice equals the champion's, and the 3x3 table
  champion choice x shadow choice. The champion's choice is the argmax of its own serving distribution
  (recomputed from the logged probabilities and rule mask), not the sampled action: exploration is not
  a disagreement between the policies.
- Value per decision, on the decisions that have an outcome (``outcomes.reward``):

  * champion: it is the logging policy. Its serving distribution sampled the logged actions, with exactly
    the logged propensities, so its value is on-policy: the mean logged reward, with a percentile
    bootstrap CI. (``ope.evaluate`` with the champion's own distribution as target would give importance
    weights of 1 and the same number, provided the floor and rules did not change since; the plain mean
    needs no reconstruction and cannot be thrown off by a settings change.)
  * shadow: off-policy, ``ope.evaluate`` (IPS, SNIPS, DR) with the logged shadow distribution as target,
    the logged propensities, and a ridge reward model (``fit_reward_model``) on the logged state
    (signed-log standardised features, anomaly, risk) for DR.
  * difference: DR(shadow) - champion, bootstrapped per decision (paired). Both estimates come from the
    same decisions, so the paired interval is much tighter than comparing two separate intervals.

Imputed outcomes (no real outcome within the horizon) are used as recorded and counted; leaving them out
would drop most blocked decisions, whose outcome is never observed, and bias both values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from decision_platform.learning.ope import Estimate, evaluate, fit_reward_model
from decision_platform.models.policy import serving_distribution
from decision_platform.models.preprocessing import signed_log
from decision_platform.storage.decisions import intact_rows
from decision_platform.storage.repository import DecisionRow, Repository

#: Fewer decisions with an outcome than this: agreement only, no value estimates.
MIN_OUTCOMES = 2


@dataclass(frozen=True)
class ShadowComparison:
    """Champion vs shadow on logged decisions (see the module docstring for the estimators)."""

    shadow_version: str | None
    #: Logged decisions with this shadow's choice.
    decisions: int
    agreement: float | None
    #: confusion[c][s]: decisions where the champion chose c and the shadow s (0 allow, 1 throttle, 2 block).
    confusion: list[list[int]]
    #: Champion policy versions that made those decisions, with their counts.
    champion_versions: dict[str, int]
    #: Decisions shadowed by other versions in the same window (left out), with their counts.
    other_shadow_versions: dict[str, int]
    #: Of ``decisions``, those with an outcome (the value estimates use only these), and imputed ones.
    with_outcome: int
    imputed: int
    champion_value: Estimate | None = None
    shadow_values: dict[str, Estimate] = field(default_factory=dict)
    difference: Estimate | None = None
    effective_sample_size: float | None = None
    max_weight: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _choice(
    probabilities: Sequence[float], mask: Sequence[bool], floor: float, explore: Sequence[int]
) -> int:
    return int(np.argmax(serving_distribution(np.asarray(probabilities), mask, floor, explore)))


def _states(rows: Sequence[DecisionRow]) -> np.ndarray:
    """The logged state for the reward model: signed-log features (by name: PostgreSQL's JSONB does not
    keep key order), anomaly and risk, standardised."""
    names = sorted({name for row in rows for name in (row["features"] or {})})
    x = np.array(
        [
            [float((row["features"] or {}).get(n, 0.0)) for n in names]
            + [float(row["anomaly"] or 0.0), float(row["risk"] or 0.0)]
            for row in rows
        ]
    )
    z = signed_log(x)
    std = z.std(axis=0)
    return (z - z.mean(axis=0)) / np.where(std < 1e-9, 1.0, std)


def _bootstrap(values: np.ndarray, name: str, n_bootstrap: int, confidence: float, seed: int) -> Estimate:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_bootstrap, len(values)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    return Estimate(
        name, float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
    )


def compare_shadow(
    rows: Sequence[DecisionRow],
    floor: float,
    explore_actions: Sequence[int],
    version: str | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ShadowComparison:
    """Compare the champion with the shadow ``version`` (default: the newest row's) on ``rows``.

    ``rows``: logged decisions with a shadow record, as :meth:`Repository.shadow_decisions` returns them
    (``reward`` / ``imputed`` None without an outcome). ``floor`` and ``explore_actions``: the serving
    settings, to recompute the champion's choice exactly as it was served.
    """
    rows = [r for r in intact_rows(rows, "shadow comparison") if r.get("shadow") and r.get("probabilities")]
    version = version or (rows[0]["shadow"]["version"] if rows else None)
    others = Counter(r["shadow"]["version"] for r in rows if r["shadow"]["version"] != version)
    rows = [r for r in rows if r["shadow"]["version"] == version]
    confusion = np.zeros((3, 3), dtype=np.int64)
    for row in rows:
        champion = _choice(row["probabilities"], row["action_mask"], floor, explore_actions)
        confusion[champion, int(row["shadow"]["action"])] += 1
    n = len(rows)
    rewarded = [r for r in rows if r.get("reward") is not None]
    result: dict[str, Any] = {
        "shadow_version": version,
        "decisions": n,
        "agreement": float(np.trace(confusion) / n) if n else None,
        "confusion": confusion.tolist(),
        "champion_versions": dict(
            Counter((r["model_versions"] or {}).get("policy", "unknown") for r in rows).most_common()
        ),
        "other_shadow_versions": dict(others.most_common()),
        "with_outcome": len(rewarded),
        "imputed": sum(1 for r in rewarded if r.get("imputed")),
    }
    if len(rewarded) < MIN_OUTCOMES:
        return ShadowComparison(**result)

    actions = np.array([int(r["action"]) for r in rewarded])
    propensities = np.array([float(r["propensity"]) for r in rewarded])
    rewards = np.array([float(r["reward"]) for r in rewarded])
    target = np.array([r["shadow"]["probabilities"] for r in rewarded], dtype=np.float64)
    q_hat = fit_reward_model(_states(rewarded), actions, rewards)
    report = evaluate(
        target,
        actions,
        propensities,
        rewards,
        q_hat,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        seed=seed,
    )
    # Per-decision DR terms of the shadow minus the champion's reward: the paired difference.
    idx = np.arange(len(rewarded))
    weights = target[idx, actions] / propensities
    dr_terms = (target * q_hat).sum(axis=1) + weights * (rewards - q_hat[idx, actions])
    return ShadowComparison(
        **result,
        champion_value=_bootstrap(rewards, "on-policy", n_bootstrap, confidence, seed),
        shadow_values=report.estimates,
        difference=_bootstrap(dr_terms - rewards, "DR - on-policy", n_bootstrap, confidence, seed),
        effective_sample_size=report.effective_sample_size,
        max_weight=report.max_weight,
    )


def compare_logged(
    repository: Repository,
    floor: float,
    explore_actions: Sequence[int],
    since: datetime | None = None,
    limit: int | None = None,
    version: str | None = None,
) -> ShadowComparison:
    """:func:`compare_shadow` on the stored decisions since ``since`` (naive: UTC), the newest ``limit``
    decisions with a shadow."""
    if since is not None:
        since = since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC)
    return compare_shadow(repository.shadow_decisions(since, limit), floor, explore_actions, version)
