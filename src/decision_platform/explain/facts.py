"""The facts of one decision: everything a narrative may say, and nothing else.

Built from the stored decision record (what was decided, its reason codes and rules with their values
and normal ranges), plus this entity's own normal range of each reason, read from its recent decisions
(off the hot path: one indexed query). Two renderings: ``trusted_text`` (the FACTS block of the prompt,
and the reference of the grounding check) and ``data_text`` (the event's own fields, untrusted, quoted as
JSON; a narrative may not draw reasons, numbers or instructions from it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from decision_platform.core.actions import ACTION_NAMES
from decision_platform.core.records import DecisionRecord
from decision_platform.explain.reasons import (
    Wording,
    format_range,
    format_value,
    range_phrase,
    reason_text,
)
from decision_platform.models.policy import serving_distribution
from decision_platform.models.ranges import Typical, entity_typical
from decision_platform.rules.ruleset import Tier, mask_for

#: Attributes quoted into the prompt: at most this many, each value cut to this many characters.
MAX_ATTRIBUTES = 8
MAX_ATTRIBUTE_CHARS = 64
ACTION_WORDS = ("Allowed", "Throttled", "Blocked")
_DECIDED_BY = {"policy": "the learned policy", "rule": "the rules", "fallback": "the safe default (fallback)"}
#: What a rule of each tier does to the action set, as the opening says it (mask_for is the truth).
RULE_EFFECTS = {"block": "fired", "floor": "ruled out allowing it", "cap": "ruled out blocking it"}


@dataclass
class Facts:
    decision_id: int
    entity_id: str
    action: int
    decided_by: str
    proposed_action: int | None
    risk: float | None
    anomaly: float | None
    fallback: str | None
    reasons: list[dict[str, Any]]
    rules: list[dict[str, Any]]
    event_type: str = ""
    amount: float | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    risk_typical: dict[str, Any] | None = None
    anomaly_typical: dict[str, Any] | None = None
    #: How many earlier decisions of this entity the entity ranges come from.
    history: int = 0
    #: The actions the rules left allowed ([allow, throttle, block]); None in explanations stored before
    #: it was kept (``allowed`` then derives it from the tiers fired, as the engine did).
    action_mask: list[bool] | None = None
    #: What the learned policy proposed among the actions the rules allowed (the most likely of them): an
    #: action other than it was drawn at random (exploration). None under a fallback, or in explanations
    #: stored before it was kept.
    policy_choice: int | None = None

    @property
    def action_name(self) -> str:
        return ACTION_NAMES[self.action]

    @property
    def action_word(self) -> str:
        return ACTION_WORDS[self.action]

    @property
    def allowed(self) -> list[int]:
        """The actions the rules allowed."""
        mask = self.action_mask if self.action_mask is not None else mask_for(_tiers(self.rules))
        return [a for a, ok in enumerate(mask) if ok]

    @property
    def explored(self) -> bool:
        """The action was drawn at random, not the one the learned policy proposed among those allowed."""
        return self.policy_choice is not None and self.policy_choice != self.action and not self.fallback

    def deciding_rules(self) -> list[dict[str, Any]]:
        """The rules that constrained the decision (the opening names them): none unless the rules
        decided -- under a fallback, when they left one action (then they, not the safe default, chose
        it); the block-tier ones when one fired (they alone decide the block); else every rule."""
        if self.fallback:
            if len(self.allowed) > 1:
                return []
        elif self.decided_by != "rule":
            return []
        blocking = [r for r in self.rules if r.get("tier") == Tier.BLOCK.value]
        return blocking or list(self.rules)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Facts:
        return cls(**{k: payload[k] for k in cls.__dataclass_fields__ if k in payload})

    # --- renderings
    def rule_lines(self, listed: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        lines = []
        for rule in self.rules:
            line = f"{rule['name']} ({rule['tier']} tier): {rule.get('description') or 'no description'}"
            tested = [
                _input_text(i)
                for i in rule.get("inputs") or ()
                if not i["feature"].startswith("attributes.") and i["feature"] not in listed
            ]
            if tested:
                line = line.rstrip(".") + f" (tested: {'; '.join(tested)})."
            lines.append(line)
        return lines

    def trusted_text(self) -> str:
        """The FACTS block: what the platform itself computed (no event text in it). Compact on purpose:
        on a CPU every prompt token costs ~10-40 ms, and a small model loses track of a long list."""
        lines = [f"Decision: {self.action_word.upper()} (final action: {self.action_name})"]
        decided = _DECIDED_BY.get(self.decided_by, self.decided_by)
        if self.explored and self.policy_choice is not None:
            proposed = ACTION_NAMES[self.policy_choice]
            decided = f"a random draw (exploration; the learned policy proposed: {proposed})"
        elif (
            self.decided_by == "rule"
            and self.proposed_action is not None
            and self.proposed_action != self.action
        ):
            decided += f" (the policy alone would have chosen: {ACTION_NAMES[self.proposed_action]})"
        lines.append(f"Decided by: {decided}")
        allowed = self.allowed
        if len(allowed) < len(ACTION_NAMES):
            ruled_out = [ACTION_NAMES[a] for a in range(len(ACTION_NAMES)) if a not in allowed]
            lines.append(
                f"Actions the rules left: {', '.join(ACTION_NAMES[a] for a in allowed)} "
                f"(ruled out: {', '.join(ruled_out)})"
            )
        if self.fallback:
            lines.append(f"Fallback: {self.fallback.replace('_', ' ')} (models not used)")
        if self.risk is not None:
            lines.append("Risk of fraud: " + _scored("risk", self.risk, self.risk_typical))
        if self.anomaly is not None:
            lines.append("Anomaly score: " + _scored("anomaly", self.anomaly, self.anomaly_typical))
        listed: set[str] = {"anomaly"} if self.anomaly is not None else set()
        for title, kind, direction, limit in (
            ("Raised the risk", "risk", "raises_risk", 3),
            ("Lowered the risk", "risk", "lowers_risk", 2),
            ("Unusual values", "anomaly", "raises_anomaly", 2),
        ):
            found = [r for r in self.reasons if r.get("kind", "risk") == kind and r["direction"] == direction]
            fresh = [r for r in found if r["feature"] not in listed][:limit]
            if fresh:
                lines.append(f"{title}: " + "; ".join(_reason_line(r) for r in fresh))
                listed |= {r["feature"] for r in fresh}
        rules = self.rule_lines(listed)
        lines += [f"Rule fired: {line}" for line in rules] or ["Rules fired: none"]
        event = f"Event: {self.event_type or 'none (a plain read of the entity)'}"
        if self.amount is not None:
            event += f", amount {format_value('amount', self.amount)}"
        lines.append(event)
        return "\n".join(lines)

    def data_text(self) -> str:
        """The event's attributes as quoted JSON: data for context, never instructions."""
        return json.dumps(self.attributes, ensure_ascii=True, sort_keys=True)

    def template_narrative(self) -> str:
        """A deterministic narrative from the facts: what is served when no LLM is configured or its
        narrative failed the grounding check. It passes that check itself (a test holds it to that)."""
        opened = {r["name"] for r in self.deciding_rules()}
        fired = [f"{r['name']} ({r['tier']} tier)" for r in self.rules if r["name"] not in opened]
        sentences = [opening(self)]
        if self.risk is not None and not self.fallback:
            sentences.append(f"The risk of fraud was {_scored('risk', self.risk, self.risk_typical)}.")
        if not self.fallback:
            raised = [reason_text(r) for r in self.reasons if r["direction"] == "raises_risk"][:2]
            lowered = [reason_text(r) for r in self.reasons if r["direction"] == "lowers_risk"][:1]
            unusual = [reason_text(r) for r in self.reasons if r["direction"] == "raises_anomaly"]
            unusual = [u for u in unusual if u not in raised + lowered][:1]
            if raised:
                sentences.append(f"The risk was raised most by {_join(raised)}.")
            if lowered:
                sentences.append(f"It was lowered by {_join(lowered)}.")
            if unusual:
                sentences.append(f"The event was also unusual for its {unusual[0]}.")
        if fired:
            sentences.append(f"The rule{'s' if len(fired) > 1 else ''} {_join(fired)} also fired.")
        return " ".join(sentences)


def opening(facts: Facts) -> str:
    """The first sentence: the action and what decided it, true by construction for every combination
    of tiers fired and action taken (the template and the structured narratives both open with it).

    A block-tier rule decides the block. A floor rule only rules out allowing, a cap rule only rules out
    blocking: when they leave one action, they decided it; when they leave two, the learned policy chose
    among them, and the sentence says so."""
    word = facts.action_word
    rules = facts.deciding_rules()
    effects = []
    for tier in (Tier.BLOCK.value, Tier.FLOOR.value, Tier.CAP.value):
        names = [f"{r['name']} ({tier} tier)" for r in rules if r["tier"] == tier]
        if names:
            effects.append(f"the rule{'s' if len(names) > 1 else ''} {_join(names)} {RULE_EFFECTS[tier]}")
    allowed = facts.allowed
    if facts.fallback:
        cause = facts.fallback.replace("_", " ").replace(":", ": ")
        if rules:  # they left one action: the safe default chose nothing
            return f"{word} because {' and '.join(effects)}; the models could not be used ({cause})."
        return f"{word} as the safe default because the models could not be used ({cause})."
    proposed = ACTION_NAMES[facts.policy_choice] if facts.policy_choice is not None else ""
    if rules:
        if len(allowed) <= 1:
            return f"{word} because {' and '.join(effects)}."
        left = " or ".join(ACTION_NAMES[a] for a in allowed)
        if facts.explored:
            return (
                f"{word}: {' and '.join(effects)}, and {facts.action_name} was drawn at random (exploration) "
                f"among the actions the rules allowed ({left}); the learned policy proposed {proposed}."
            )
        return (
            f"{word}: {' and '.join(effects)}, and the learned policy chose {facts.action_name} among the "
            f"actions the rules allowed ({left})."
        )
    if facts.explored:
        return f"{word} at random (exploration); the learned policy proposed {proposed}."
    if facts.decided_by == "policy":
        return f"{word} by the learned policy."
    return f"{word}."


def _tiers(rules: Sequence[Mapping[str, Any]]) -> list[Tier]:
    return [Tier(r["tier"]) for r in rules if r.get("tier") in {t.value for t in Tier}]


def _scored(name: str, value: float, typical: Mapping[str, Any] | None) -> str:
    text = format_value(name, value)
    if typical:
        text += f" ({range_phrase(name, value, typical['low'], typical['high'])})"
    return text


def _join(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _reason_line(reason: Mapping[str, Any]) -> str:
    """A reason with its population range and, when known, this entity's own."""
    own = reason.get("entity_typical")
    text = reason_text(
        {k: v for k, v in reason.items() if k != "text" and (k != "typical" or not own)}, quote_event=False
    )
    if own:
        ranges = [f"this entity: {format_range(reason['feature'], own['low'], own['high'])}"]
        if reason.get("typical"):
            typical = reason["typical"]
            ranges.insert(
                0, range_phrase(reason["feature"], float(reason["value"]), typical["low"], typical["high"])
            )
        text += f" ({'; '.join(ranges)})"
    return text


def _input_text(item: Mapping[str, Any]) -> str:
    return Wording(item["feature"], item.get("typical")).reason("risk", float(item["value"]), 0.0)["text"]


def _quoted_attributes(attributes: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key in sorted(attributes)[:MAX_ATTRIBUTES]:
        out[str(key)[:MAX_ATTRIBUTE_CHARS]] = str(attributes[key])[:MAX_ATTRIBUTE_CHARS]
    return out


def build_facts(
    record: DecisionRecord,
    history: Sequence[Mapping[str, float]] = (),
    ranges: Any = None,
    attributes: Mapping[str, Any] | None = None,
    event_type: str = "",
) -> Facts:
    """Facts of a stored decision. ``history``: feature snapshots of this entity's earlier decisions
    (newest first); ``ranges``: the population ranges (explain.ranges.FeatureRanges) for risk/anomaly."""
    reasons = [dict(r) for r in record.reasons or ()]
    if history:
        for reason in reasons:
            values = [h[reason["feature"]] for h in history if reason["feature"] in h]
            own: Typical | None = entity_typical(np.asarray(values)) if values else None
            if own is not None:
                reason["entity_typical"] = own.as_dict()
    risk_typical = anomaly_typical = None
    if ranges is not None:
        found = ranges.typical("risk")
        risk_typical = found.as_dict() if found else None
        found = ranges.typical("anomaly")
        anomaly_typical = found.as_dict() if found else None
    return Facts(
        decision_id=int(record.id),
        entity_id=str(record.entity_id),
        action=int(record.action),
        decided_by=str(record.decided_by or ""),
        proposed_action=record.proposed_action,
        risk=record.risk,
        anomaly=record.anomaly,
        fallback=record.fallback,
        reasons=reasons,
        rules=[dict(r) for r in record.rules_fired or ()],
        event_type=event_type,
        amount=record.amount,
        attributes=_quoted_attributes(attributes or {}),
        risk_typical=risk_typical,
        anomaly_typical=anomaly_typical,
        history=len(history),
        action_mask=[bool(m) for m in record.action_mask] if record.action_mask is not None else None,
        policy_choice=_policy_choice(record),
    )


def _policy_choice(record: DecisionRecord) -> int | None:
    """The action the policy's own distribution over the allowed actions favours (serving's, without the
    exploration floor); None when the models were not used."""
    if record.fallback or record.probabilities is None:
        return None
    mask = record.action_mask if record.action_mask is not None else [True] * len(ACTION_NAMES)
    return int(np.argmax(serving_distribution(np.asarray(record.probabilities), mask, 0.0, ())))
