"""Hard rules in tiers (block / floor / cap), written in CEL and filtering the policy's action set.

CEL (Common Expression Language) is a safe, side-effect-free expression language: analysts can write
rules without being able to run code, and a compiled rule evaluates in ~2 µs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cel
import yaml
from pydantic import BaseModel, ConfigDict, Field

from decision_platform.observability import metrics

ALLOW, THROTTLE, BLOCK = 0, 1, 2
#: Facts every rule may use besides features and lists.
BASE_VARIABLES = frozenset({"anomaly", "risk", "amount", "entity_id", "event_type", "attributes"})


class Tier(enum.StrEnum):
    BLOCK = "block"
    FLOOR = "floor"
    CAP = "cap"


class RuleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    tier: Tier
    when: str
    description: str = ""


class RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lists: dict[str, list[str | int | float]] = {}
    rules: list[RuleConfig] = []


@dataclass(frozen=True)
class FiredRule:
    name: str
    tier: Tier
    description: str


@dataclass(frozen=True)
class RuleVerdict:
    """Which rules fired and which actions they leave allowed (index = action)."""

    fired: tuple[FiredRule, ...]
    mask: tuple[bool, bool, bool]

    @property
    def forced_action(self) -> int | None:
        """The action when exactly one remains allowed."""
        allowed = [a for a, ok in enumerate(self.mask) if ok]
        return allowed[0] if len(allowed) == 1 else None


def mask_for(tiers: Iterable[Tier]) -> tuple[bool, bool, bool]:
    """The allowed actions given the tiers that fired. Block wins over everything."""
    tiers = set(tiers)
    if Tier.BLOCK in tiers:
        return (False, False, True)
    allow = Tier.FLOOR not in tiers
    block = Tier.CAP not in tiers
    return (allow, True, block)


class RuleSet:
    """Compiled rules; ``evaluate`` is on the hot path."""

    def __init__(self, config: RulesFile, known_variables: Iterable[str]) -> None:
        self.config = config
        self.lists = dict(config.lists)
        known = set(known_variables) | BASE_VARIABLES | set(self.lists)
        self._compiled: list[tuple[RuleConfig, FiredRule, Any, tuple[str, ...]]] = []
        names = set()
        for rule in config.rules:
            if rule.name in names:
                raise ValueError(f"rules: duplicate rule name {rule.name!r}")
            names.add(rule.name)
            try:
                program = cel.compile(rule.when)
            except ValueError as exc:
                raise ValueError(f"rule {rule.name!r}: cannot compile {rule.when!r}: {exc}") from None
            names_used = set(program.variables())
            unknown = names_used - known
            if unknown:
                raise ValueError(f"rule {rule.name!r} uses unknown names {sorted(unknown)}")
            self._compiled.append(
                (rule, FiredRule(rule.name, rule.tier, rule.description), program, tuple(sorted(names_used)))
            )

    @classmethod
    def load(cls, path: Path, known_variables: Iterable[str]) -> RuleSet:
        raw = yaml.safe_load(Path(path).read_text("utf-8")) or {}
        return cls(RulesFile.model_validate(raw), known_variables)

    @property
    def rules(self) -> list[RuleConfig]:
        return [rule for rule, _, _, _ in self._compiled]

    def evaluate(self, facts: Mapping[str, Any]) -> RuleVerdict:
        """Evaluate every rule on ``facts`` (features, scores, event fields)."""
        scope = {**self.lists, **facts}
        fired = []
        for rule, fired_rule, program, names in self._compiled:
            # Hand each rule only the names it uses: converting the whole scope to CEL values for
            # every rule costs ~10x more than evaluating it.
            context = {n: scope[n] for n in names if n in scope}
            try:
                hit = program.execute(context) is True
            except Exception:  # missing fact or type error: the rule cannot say yes
                metrics.RULE_ERRORS.labels(rule=rule.name).inc()
                continue
            if hit:
                fired.append(fired_rule)
                metrics.RULE_HITS.labels(rule=rule.name, tier=rule.tier.value).inc()
        return RuleVerdict(tuple(fired), mask_for(r.tier for r in fired))
