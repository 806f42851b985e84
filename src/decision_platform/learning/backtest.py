"""Rule what-if: replay logged decisions under another rules.yaml, without touching the live rules.

Each decision of the window is re-evaluated from what it stored -- the exact feature snapshot the models
saw, its anomaly and risk, the event's amount, type and attributes -- so no model runs again and the
answer is the same every time. The new action is what serving would do under the new rules' mask:

- the same mask as logged: the logged action (nothing changed for this decision);
- another mask, and the policy scored it: the policy's most likely action among those the new rules allow
  (the serving distribution's mode; exploration is left out, so the replay is deterministic);
- another mask on a fallback decision (no policy scores): the safe action moved to the nearest allowed one.

**What the reward estimate means.** Only decisions with a *reported* outcome (not an imputed one) whose
action would change are estimated. For them the outcome is assumed to stay what it was (the same good
customer, the same fraud) and is priced with rewards.yaml for the new action; an outcome that cannot follow
the new action is re-read as its counterpart (``success`` after a block is a ``false_positive``), and
one with no counterpart is counted as not estimable. Decisions with no outcome are counted, not
estimated. It is a what-if on the labelled sample, not an off-policy estimate of the whole population:
outcomes are rarer after blocks, so the labelled sample is biased.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol

from decision_platform.core.actions import ACTION_NAMES
from decision_platform.core.rewards import RewardTable
from decision_platform.models.policy import serving_distribution
from decision_platform.rules.ruleset import RuleSet, RuleTally
from decision_platform.storage.decisions import intact_rows

#: An outcome that cannot follow the new action, read as what the same event would then have been.
COUNTERPART_OUTCOMES = {"success": "false_positive"}
#: Changed decisions listed by id in the result (the console links to them).
SAMPLE_SIZE = 50


class BacktestRows(Protocol):
    """Where the logged decisions come from (storage.review.ReviewStore)."""

    def backtest_rows(
        self, since: datetime, until: datetime, limit: int | None = None
    ) -> Iterable[Mapping[str, Any]]: ...


@dataclass
class RuleImpact:
    """One rule of either set: how often the new set fires it, and the changed decisions it takes part in
    (it fires under one set and not the other, or with another tier)."""

    name: str
    tier: str | None  # None: the rule is not in the new set (it only fired in the logged decisions)
    hits: int = 0
    errors: int = 0
    logged_hits: int = 0
    changed: int = 0
    reward_change: float = 0.0


@dataclass
class ChangedDecision:
    decision_id: int
    entity_id: str
    before: int
    after: int
    outcome: str | None
    reward_before: float | None
    reward_after: float | None


@dataclass
class BacktestResult:
    since: datetime
    until: datetime
    decisions: int = 0
    #: The window held more decisions than the limit: the newest ``decisions`` were replayed.
    truncated: bool = False
    changed: int = 0
    #: transitions[before][after]: how many decisions go from one action to another.
    transitions: list[list[int]] = field(default_factory=lambda: [[0] * 3 for _ in range(3)])
    rules: list[RuleImpact] = field(default_factory=list)
    labelled_changed: int = 0
    unlabelled_changed: int = 0
    not_estimable: int = 0
    #: Sum of the stored rewards of the estimated decisions, and of their rewards under the new action.
    reward_before: float = 0.0
    reward_after: float = 0.0
    samples: list[ChangedDecision] = field(default_factory=list)

    @property
    def actions_before(self) -> list[int]:
        return [sum(row) for row in self.transitions]

    @property
    def actions_after(self) -> list[int]:
        return [sum(row[a] for row in self.transitions) for a in range(3)]

    @property
    def estimated(self) -> int:
        return self.labelled_changed - self.not_estimable

    @property
    def reward_change(self) -> float:
        return self.reward_after - self.reward_before

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["since"], out["until"] = self.since.isoformat(), self.until.isoformat()
        out["actions_before"] = dict(zip(ACTION_NAMES, self.actions_before, strict=True))
        out["actions_after"] = dict(zip(ACTION_NAMES, self.actions_after, strict=True))
        out["estimated"], out["reward_change"] = self.estimated, self.reward_change
        return out


@dataclass(frozen=True)
class ServingChoice:
    """How serving picks an action (the settings the what-if must reproduce)."""

    safe_action: int = 1
    exploration_floor: float = 0.01
    explore_actions: tuple[int, ...] = (0, 1)

    def action(self, probabilities: list[float] | None, mask: tuple[bool, bool, bool]) -> int:
        """The action serving would most likely take under ``mask`` (no exploration sampling)."""
        if probabilities is None:  # a fallback: the safe action, nearest allowed (serving/engine.py)
            allowed = [a for a, ok in enumerate(mask) if ok]
            return min(allowed, key=lambda a: (abs(a - self.safe_action), -a))
        distribution = serving_distribution(probabilities, mask, self.exploration_floor, self.explore_actions)
        return int(max(range(3), key=lambda a: distribution[a]))


def facts_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The facts the rules saw when the decision was made, rebuilt from the stored row (as
    serving/engine.py builds them: the snapshot, the event's fields, the scores when scored)."""
    features = dict(row.get("features") or {})
    amount = row.get("amount")
    facts: dict[str, Any] = {
        **features,
        "amount": float(amount) if amount is not None else float(features.get("amount", 0.0)),
        "entity_id": row["entity_id"],
        "event_type": row.get("event_type") or "",
        "attributes": dict(row.get("attributes") or {}),
    }
    if row.get("anomaly") is not None:
        facts["anomaly"] = row["anomaly"]
    if row.get("risk") is not None:
        facts["risk"] = row["risk"]
    return facts


def counterfactual_reward(
    rewards: RewardTable, outcome: str, action: int, amount: float | None
) -> float | None:
    """The reward of the same outcome after ``action`` (or of its counterpart); None: not estimable."""
    if not rewards.possible(outcome, action):
        outcome = COUNTERPART_OUTCOMES.get(outcome, "")
        if not rewards.possible(outcome, action):
            return None
    return rewards.reward(outcome, action, amount)


def backtest(
    source: BacktestRows,
    rules: RuleSet,
    rewards: RewardTable,
    since: datetime,
    until: datetime,
    choice: ServingChoice | None = None,
    limit: int | None = None,
) -> BacktestResult:
    """Replay the decisions of ``[since, until)`` (the newest ``limit`` at most) under ``rules``."""
    choice = choice or ServingChoice()
    result = BacktestResult(since, until)
    tally = RuleTally(r.name for r in rules.rules)
    impacts = {r.name: RuleImpact(r.name, r.tier.value) for r in rules.rules}
    read = limit + 1 if limit is not None else None
    for row in intact_rows(source.backtest_rows(since, until, read), "rules backtest"):
        if limit is not None and result.decisions >= limit:
            result.truncated = True
            break
        result.decisions += 1
        verdict = rules.evaluate(facts_of(row), tally)
        logged = {(r["name"], r.get("tier")) for r in row.get("rules_fired") or () if "name" in r}
        for name, _tier in logged:
            impacts.setdefault(name, RuleImpact(name, None)).logged_hits += 1
        before = int(row["action"])
        logged_mask = tuple(bool(m) for m in row["action_mask"])
        after = (
            before if verdict.mask == logged_mask else choice.action(row.get("probabilities"), verdict.mask)
        )
        result.transitions[before][after] += 1
        if after == before:
            continue
        result.changed += 1
        outcome = row.get("outcome")
        reward_before = reward_after = None
        if outcome is None:
            result.unlabelled_changed += 1
        else:
            result.labelled_changed += 1
            reward_before = float(row["reward"])
            reward_after = counterfactual_reward(rewards, outcome, after, row.get("amount"))
            if reward_after is None:
                result.not_estimable += 1
            else:
                result.reward_before += reward_before
                result.reward_after += reward_after
        new = {(r.name, r.tier.value) for r in verdict.fired}
        for name in {name for name, _ in new ^ logged}:
            impact = impacts[name]
            impact.changed += 1
            if reward_after is not None and reward_before is not None:
                impact.reward_change += reward_after - reward_before
        if len(result.samples) < SAMPLE_SIZE:
            result.samples.append(
                ChangedDecision(
                    int(row["id"]), row["entity_id"], before, after, outcome, reward_before, reward_after
                )
            )
    for name, impact in impacts.items():
        if name in tally.hits:
            impact.hits, impact.errors = tally.hits[name], tally.errors[name]
    result.rules = list(impacts.values())
    return result
