"""Hard rules in tiers (block / floor / cap), written in CEL and filtering the policy's action set.

CEL (Common Expression Language) is a safe, side-effect-free expression language: analysts can write
rules without being able to run code, and a compiled rule evaluates in ~2 µs (~40 µs with the event's
attributes map: converting a context to CEL values costs more than evaluating it).

A batch of decisions (``evaluate_batch``) is evaluated over columns: the common shapes (a fact compared
with a constant, ``has(attributes.k)``, membership in a list, and / or / not of those) are computed over
the whole batch with numpy, with CEL's own semantics (an error, such as a missing fact, makes a rule not
fire unless ``&&`` / ``||`` decide without it); any other rule, or a row the vectoriser cannot decide
(an attribute of an unusual type), is evaluated by CEL row by row. tests/unit/test_rules_batch.py holds
the two equal.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cel
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from decision_platform.core.strict_yaml import load_yaml, load_yaml_file

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
        #: Per rule, its expression parsed for evaluation over columns (None: CEL evaluates it per row).
        self._vector: list[tuple[Any, ...] | None] = [_vector_form(rule.when) for rule in config.rules]
        self._verdicts: dict[tuple[int, ...], RuleVerdict] = {}

    @classmethod
    def load(
        cls, path: Path, known_variables: Iterable[str], observer: RuleObserver | None = None
    ) -> RuleSet:
        raw = load_yaml_file(Path(path)) or {}
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
            raw = load_yaml(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise RulesError(f"rules.yaml is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        except RecursionError:  # "a: [a: [a: [..." a thousand deep: the parser recurses
            raise RulesError("rules.yaml is nested too deeply") from None
        except (ValueError, OverflowError) as exc:  # a value YAML types but Python cannot hold: 2001-13-01,
            # an integer of over 4300 digits
            raise RulesError(f"rules.yaml holds a value that cannot be read: {str(exc)[:120]}") from None
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

    @property
    def vectorised(self) -> list[str]:
        """The rules evaluated over columns in a batch (the others: CEL, row by row)."""
        return [rule.name for (rule, _, _, _), node in zip(self._compiled, self._vector, strict=True) if node]

    def evaluate_batch(self, facts: BatchFacts, observer: RuleObserver | None = None) -> list[RuleVerdict]:
        """:meth:`evaluate` for each of a batch's rows (the same verdicts, and the same observer calls
        up to their order), over columns: see the module's docstring."""
        observer = observer or self.observer
        n = facts.n
        fired = np.zeros((n, len(self._compiled)), dtype=bool)
        columns = _Columns(facts, self.lists)
        for k, ((rule, _, program, names), node) in enumerate(zip(self._compiled, self._vector, strict=True)):
            if node is not None:
                value, error, defer = columns.run(node)
                fired[:, k] = value & ~error & ~defer
                failed = int(np.count_nonzero(error & ~defer))
                rows = np.flatnonzero(defer).tolist()
            else:
                failed, rows = 0, range(n)
            for i in rows:  # CEL itself, with the names this rule uses, as evaluate() does
                context = {}
                for name in names:
                    value = facts.value(name, i)
                    if value is not MISSING:
                        context[name] = value
                    elif name in self.lists:
                        context[name] = self.lists[name]
                try:
                    fired[i, k] = program.execute(context) is True
                except Exception:
                    failed += 1
            if observer is not None:
                for _ in range(failed):
                    observer.failed(rule.name)
                for _ in range(int(np.count_nonzero(fired[:, k]))):
                    observer.fired(rule.name, rule.tier.value)
        if not fired.any():
            return [self._verdict(())] * n
        if fired.shape[1] > 62:
            return [self._verdict(tuple(np.flatnonzero(row).tolist())) for row in fired]
        # Each row's fired rules as one integer (bit k: rule k), then one verdict per distinct integer.
        codes = (fired.astype(np.int64) << np.arange(fired.shape[1], dtype=np.int64)).sum(axis=1)
        verdicts = {
            code: self._verdict(tuple(k for k in range(fired.shape[1]) if code >> k & 1))
            for code in set(codes.tolist())
        }
        return [verdicts[code] for code in codes.tolist()]

    def _verdict(self, fired: tuple[int, ...]) -> RuleVerdict:
        """One verdict per distinct set of fired rules (immutable, shared by the rows that have it)."""
        verdict = self._verdicts.get(fired)
        if verdict is None:
            rules = tuple(self._compiled[k][1] for k in fired)
            verdict = self._verdicts[fired] = RuleVerdict(rules, mask_for(r.tier for r in rules))
        return verdict


def _vector_form(when: str) -> tuple[Any, ...] | None:
    try:
        return _Parser(when).parse()
    except (_Unsupported, ValueError, RecursionError):  # "!!!!...true" 5000 deep: CEL evaluates it
        return None


# --- batches: the common comparisons over columns, CEL per row for the rest

#: A fact a row does not have (CEL: "no such attribute"; the rule errs unless short-circuited).
MISSING: Any = object()


@dataclass
class BatchFacts:
    """The facts of n decisions as columns: what :meth:`RuleSet.evaluate_batch` reads.

    ``numbers``: numeric facts (features, amount, anomaly, risk) as float arrays, with ``present`` masks
    for the ones some rows lack (a decision that fell back has no anomaly); ``strings``: string facts
    (entity_id, event_type) per row; ``attributes``: each row's event attributes (a map, empty without an
    event). A row's facts are exactly the dict :meth:`RuleSet.evaluate` would be given for it."""

    n: int
    numbers: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    strings: dict[str, Sequence[str]]
    attributes: Sequence[Mapping[str, Any]]

    def value(self, name: str, i: int) -> Any:
        """Row i's fact ``name`` as the per-row facts dict holds it, or MISSING."""
        if name in self.numbers:
            mask = self.present.get(name)
            return float(self.numbers[name][i]) if mask is None or mask[i] else MISSING
        if name in self.strings:
            return self.strings[name][i]
        if name == "attributes":
            return dict(self.attributes[i])
        return MISSING

    def has(self, name: str) -> bool:
        return name in self.numbers or name in self.strings or name == "attributes"


#: (value, error) per row: CEL's three outcomes (true, false, error) as two bool arrays; where error is
#: set, value is meaningless.
_Tri = tuple[np.ndarray, np.ndarray]
_COMPARE = {
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": np.not_equal,
}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_TOKEN = re.compile(
    r"\s*(?:(?P<number>\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+(?![\w.]))"
    r"|(?P<string>\"[^\"\\\n]*\"|'[^'\\\n]*')"
    r"|(?P<op>&&|\|\||<=|>=|==|!=|<|>|!|\(|\)|\.|-)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*))"
)
#: Words that are not facts (CEL's other reserved words do not compile at all).
_RESERVED = frozenset({"true", "false", "null", "in", "has"})


class _Unsupported(Exception):
    """The vectoriser does not know this shape: the rule is evaluated by CEL, row by row."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out, at = [], 0
    while at < len(text):
        if text[at:].strip() == "":
            break
        match = _TOKEN.match(text, at)
        if match is None or match.end() == at:
            raise _Unsupported(text[at:])
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group(kind)))
        at = match.end()
    return out


class _Parser:
    """A recursive-descent parser of the CEL subset the vectoriser understands:

        expr := and ('||' and)*        and := unary ('&&' unary)*
        unary := '!' unary | '(' expr ')' | 'has' '(' attributes '.' key ')' | comparison
        comparison := operand OP operand | operand 'in' list-name
        operand := fact | attributes '.' key | number | '-' number | string

    Anything else raises _Unsupported (the rule stays with CEL). The result is a tree of tuples."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.at = 0

    def parse(self) -> tuple[Any, ...]:
        node = self._or()
        if self.at != len(self.tokens):
            raise _Unsupported("trailing tokens")
        return node

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def _take(self, value: str | None = None, kind: str | None = None) -> str:
        token = self._peek()
        if token is None or (value is not None and token[1] != value) or (kind and token[0] != kind):
            raise _Unsupported(f"expected {value or kind}")
        self.at += 1
        return token[1]

    def _or(self) -> tuple[Any, ...]:
        node = self._and()
        while self._peek() == ("op", "||"):
            self.at += 1
            node = ("or", node, self._and())
        return node

    def _and(self) -> tuple[Any, ...]:
        node = self._unary()
        while self._peek() == ("op", "&&"):
            self.at += 1
            node = ("and", node, self._unary())
        return node

    def _unary(self) -> tuple[Any, ...]:
        token = self._peek()
        if token == ("op", "!"):
            self.at += 1
            return ("not", self._unary())
        if token == ("op", "("):
            self.at += 1
            node = self._or()
            self._take(")")
            return node
        if token == ("name", "has"):
            self.at += 1
            self._take("(")
            self._take("attributes")
            self._take(".")
            key = self._take(kind="name")
            self._take(")")
            return ("has", key)
        left = self._operand()
        token = self._peek()
        if token == ("name", "in"):
            self.at += 1
            return ("in", left, self._take(kind="name"))
        if token is None or token[1] not in _COMPARE:
            raise _Unsupported("not a comparison")
        op = self._take()
        right = self._operand()
        if left[0] == "literal" and right[0] != "literal":
            left, right, op = right, left, _FLIP[op]
        if left[0] == "literal" or right[0] != "literal":
            raise _Unsupported("a comparison of two facts or two constants")
        return ("compare", op, left, right[1])

    def _operand(self) -> tuple[Any, ...]:
        kind, value = self._peek() or ("", "")
        if kind == "number":
            self.at += 1
            return ("literal", float(value) if any(c in value for c in ".eE") else int(value))
        if (kind, value) == ("op", "-"):
            self.at += 1
            number = self._take(kind="number")
            return ("literal", -(float(number) if any(c in number for c in ".eE") else int(number)))
        if kind == "string":
            self.at += 1
            return ("literal", value[1:-1])
        if kind == "name" and value not in _RESERVED:
            self.at += 1
            if value == "attributes":
                self._take(".")
                return ("attribute", self._take(kind="name"))
            if self._peek() in (("op", "."), ("op", "(")):
                raise _Unsupported("a member or a call")
            return ("fact", value)
        raise _Unsupported(f"operand {value!r}")


_NUMBER = (int, float)
_EXACT_INT = 2**53


class _Columns:
    """Evaluates a parsed rule over a batch: (value, error, defer) bool arrays; ``defer`` rows are the
    ones the vectoriser cannot decide (CEL decides them, row by row)."""

    def __init__(self, facts: BatchFacts, lists: Mapping[str, Sequence[Any]]) -> None:
        self.facts, self.lists, self.n = facts, lists, facts.n
        self._false = np.zeros(self.n, dtype=bool)
        self._true = np.ones(self.n, dtype=bool)

    def run(self, node: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        kind = node[0]
        if kind in ("and", "or"):
            lv, le, ld = self.run(node[1])
            rv, re_, rd = self.run(node[2])
            if kind == "and":  # false wins over an error, either side (CEL's commutative && and ||)
                decided = (~le & ~lv) | (~re_ & ~rv)
                return lv & rv & ~decided, (le | re_) & ~decided, ld | rd
            decided = (~le & lv) | (~re_ & rv)
            return lv | rv | decided, (le | re_) & ~decided, ld | rd
        if kind == "not":
            v, e, d = self.run(node[1])
            return ~v, e, d
        if kind == "has":
            key = node[1]
            return (
                np.fromiter((key in a for a in self.facts.attributes), bool, self.n),
                self._false,
                self._false,
            )
        if kind == "compare":
            return self._compare(node[1], node[2], node[3])
        return self._in(node[1], node[2])

    def _all(self, value: bool = False, error: bool = False, defer: bool = False) -> tuple[np.ndarray, ...]:
        pick = {False: self._false, True: self._true}
        return pick[value], pick[error], pick[defer]

    def _compare(self, op: str, operand: tuple[Any, ...], literal: Any) -> tuple[np.ndarray, ...]:
        numeric = isinstance(literal, _NUMBER) and abs(literal) <= _EXACT_INT
        if operand[0] == "fact":
            name = operand[1]
            if name in self.facts.numbers and numeric:
                column = self.facts.numbers[name]
                present = self.facts.present.get(name)
                error = self._false if present is None else ~present
                return _COMPARE[op](column, literal), error, self._false
            if name in self.facts.strings and isinstance(literal, str) and op in ("==", "!="):
                equal = np.fromiter((s == literal for s in self.facts.strings[name]), bool, self.n)
                return (equal if op == "==" else ~equal), self._false, self._false
            if not self.facts.has(name) and name not in self.lists:
                return self._all(error=True)  # an undeclared name: CEL errs on every row
            return self._all(defer=True)
        # An event attribute: absent errs; a string or a number compares as CEL does, the rest defers.
        key, compare = operand[1], _COMPARE[op]
        value, error, defer = (np.zeros(self.n, dtype=bool) for _ in range(3))
        for i, attributes in enumerate(self.facts.attributes):
            got = attributes.get(key, MISSING)
            if got is MISSING:
                error[i] = True
            elif isinstance(got, str) and isinstance(literal, str) and op in ("==", "!="):
                value[i] = (got == literal) == (op == "==")
            elif (
                numeric and isinstance(got, _NUMBER) and not isinstance(got, bool) and abs(got) <= _EXACT_INT
            ):
                value[i] = bool(compare(float(got), literal))
            else:
                defer[i] = True
        return value, error, defer

    def _in(self, operand: tuple[Any, ...], list_name: str) -> tuple[np.ndarray, ...]:
        if self.facts.has(list_name) or list_name not in self.lists:
            # A fact shadows the list (CEL decides), or an undeclared name (CEL errs).
            return self._all(defer=True) if self.facts.has(list_name) else self._all(error=True)
        members = {m for m in self.lists[list_name] if isinstance(m, str)}
        if operand[0] == "fact" and operand[1] in self.facts.strings:
            strings = self.facts.strings[operand[1]]
            return np.fromiter((s in members for s in strings), bool, self.n), self._false, self._false
        if operand[0] != "attribute":
            return self._all(defer=True)
        key = operand[1]
        value, error, defer = (np.zeros(self.n, dtype=bool) for _ in range(3))
        for i, attributes in enumerate(self.facts.attributes):
            got = attributes.get(key, MISSING)
            if got is MISSING:
                error[i] = True
            elif isinstance(got, str):
                value[i] = got in members
            else:
                defer[i] = True
        return value, error, defer
