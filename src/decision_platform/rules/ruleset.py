"""Hard rules in tiers (block / floor / cap), written in CEL and filtering the policy's action set.

CEL (Common Expression Language) is a safe, side-effect-free expression language: analysts can write
rules without being able to run code, and a compiled rule evaluates in ~2 µs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cel
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: Facts every rule may use besides features and lists.
BASE_VARIABLES = frozenset({"anomaly", "risk", "amount", "entity_id", "event_type", "attributes"})


class RuleObserver(Protocol):
    """Told about every evaluation: serving counts them in Prometheus, offline evaluations tally them."""

    def fired(self, rule: str, tier: str) -> None: ...

    def failed(self, rule: str) -> None: ...


class RuleTally:
    """A :class:`RuleObserver` that counts hits and errors per rule (offline evaluations, backtests)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.hits = dict.fromkeys(names, 0)
        self.errors = dict.fromkeys(self.hits, 0)

    def fired(self, rule: str, tier: str) -> None:
        self.hits[rule] += 1

    def failed(self, rule: str) -> None:
        self.errors[rule] += 1


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the rule or the line (shown to users as is)."""


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
    """Compiled rules; ``evaluate`` is on the hot path.

    ``observer`` hears about every rule that fires or fails to evaluate (serving: the Prometheus counters,
    observability.metrics.RULE_METRICS); None: nobody, as in training and backtests.
    """

    def __init__(
        self, config: RulesFile, known_variables: Iterable[str], observer: RuleObserver | None = None
    ) -> None:
        self.config = config
        self.observer = observer
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
    def load(
        cls, path: Path, known_variables: Iterable[str], observer: RuleObserver | None = None
    ) -> RuleSet:
        raw = yaml.safe_load(Path(path).read_text("utf-8")) or {}
        return cls(RulesFile.model_validate(raw), known_variables, observer)

    @classmethod
    def from_text(
        cls, text: str, known_variables: Iterable[str], observer: RuleObserver | None = None
    ) -> RuleSet:
        """Rules from a rules.yaml's text (the console's what-if editor, ``rules backtest``).

        Raises :class:`RulesError` with one message naming what is wrong: the YAML line, the field of
        the rule (``rules[2].tier``), or the rule whose CEL does not compile or uses unknown names.
        """
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise RulesError(f"rules.yaml is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(raw, dict):
            raise RulesError("rules.yaml must be a mapping with `rules:` (and optionally `lists:`)")
        try:
            config = RulesFile.model_validate(raw)
        except ValidationError as exc:
            problems = []
            for error in exc.errors()[:5]:
                loc = error["loc"]
                field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
                if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
                    rules = raw.get("rules") or []
                    name = rules[loc[1]].get("name") if isinstance(rules[loc[1]], dict) else None
                    if name:
                        field += f" (rule {name!r})"
                problems.append(f"{field}: {error['msg']}")
            raise RulesError("; ".join(problems)) from None
        try:
            return cls(config, known_variables, observer)
        except ValueError as exc:
            raise RulesError(str(exc)) from None

    @property
    def rules(self) -> list[RuleConfig]:
        return [rule for rule, _, _, _ in self._compiled]

    @property
    def variables(self) -> set[str]:
        """Every name some rule reads."""
        return {name for _, _, _, names in self._compiled for name in names}

    def variables_of(self, rule_name: str) -> set[str]:
        """The names one rule reads."""
        return next(set(names) for rule, _, _, names in self._compiled if rule.name == rule_name)

    def evaluate(self, facts: Mapping[str, Any], observer: RuleObserver | None = None) -> RuleVerdict:
        """Evaluate every rule on ``facts`` (features, scores, event fields). ``observer``: instead of
        the rule set's own, for this evaluation."""
        observer = observer or self.observer
        lists = self.lists
        fired = []
        for rule, fired_rule, program, names in self._compiled:
            # Hand each rule only the names it uses: converting the whole scope to CEL values for
            # every rule costs ~10x more than evaluating it. A fact shadows a list of the same name.
            context = {n: facts[n] if n in facts else lists[n] for n in names if n in facts or n in lists}
            try:
                hit = program.execute(context) is True
            except Exception:  # missing fact or type error: the rule cannot say yes
                if observer is not None:
                    observer.failed(rule.name)
                continue
            if hit:
                fired.append(fired_rule)
                if observer is not None:
                    observer.fired(rule.name, rule.tier.value)
        return RuleVerdict(tuple(fired), mask_for(r.tier for r in fired))
