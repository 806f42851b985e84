"""Narratives grounded by construction: the model chooses facts, the platform writes them.

A small local model writing free text states wrong numbers, wrong comparisons and invented causes often
enough that the grounding check refused 43% of them (bench/LLM.md). So in ``narrative-v2`` the model
writes no claim at all. It is given the facts of one decision, each with an id, and answers a JSON object
constrained by a schema (llama.cpp's JSON-schema grammar, Ollama's ``format``, OpenAI's
``response_format``) whose only field is the list of ids it wants mentioned, most important first: which
facts, in which order. The narrative is then rendered here from the facts themselves:

- the opening (the action, and what decided it) always comes from the facts (``facts.opening``, the
  template narrative's own);
- every number, name and "above / within / below the typical range" is the facts' own wording
  (:func:`~decision_platform.explain.reasons.reason_text`);
- the direction of a reason ("raised" / "lowered" the risk, "unusual for") is the sign of its attribution;
- reasons of one direction are written in the order of their attributions, and "most" is written only
  when the ones named are the top ones: rank claims are true whatever order the model gave.

The grounding check still reads the rendered text as it reads any narrative (the last gate). The event's
attributes never reach this prompt: nothing the model can be told by them could be said anyway, and
what is not in the prompt cannot steer the choice either.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from decision_platform.explain.facts import RULE_EFFECTS, Facts, opening
from decision_platform.explain.reasons import format_value, range_phrase, reason_text

#: Most facts a narrative names besides its opening: more reads as a dump of the record.
MAX_MENTIONS = 4
_SECTIONS = ("rule", "risk", "anomaly", "raises_risk", "lowers_risk", "raises_anomaly")


@dataclass(frozen=True)
class Choice:
    """One fact the model may choose: ``id`` is what it answers, ``line`` what it reads."""

    id: str
    section: str  # one of _SECTIONS
    line: str
    reason: dict[str, Any] | None = None
    rank: int = 0  # order of the attribution within its section (0: the largest)


def ranked(facts: Facts, direction: str) -> list[dict[str, Any]]:
    """Reasons of one direction, largest attribution first (the order rank claims are checked against)."""
    found = [r for r in facts.reasons if r.get("direction") == direction]
    return sorted(found, key=lambda r: -abs(float(r.get("weight") or 0.0)))


def choices(facts: Facts) -> list[Choice]:
    """The facts the model may name, in a fixed order (risk, reasons by rank, anomaly, other rules).

    Each line is short on purpose (every prompt token costs milliseconds on a CPU thread): the value,
    the rank and where the value stands; the narrative writes the full ranges. A feature that is both a
    risk reason and an unusual value is offered once, as the risk reason."""
    opened = {r["name"] for r in facts.deciding_rules()}
    if facts.fallback:  # the models were not used: only the rules can be said, those not in the opening
        return [
            Choice(r["name"], "rule", f"rule {r['name']} ({r['tier']} tier) fired")
            for r in facts.rules
            if r["name"] not in opened
        ]
    out: list[Choice] = []
    if facts.risk is not None:
        out.append(Choice("risk", "risk", "risk of fraud " + _brief("risk", facts.risk, facts.risk_typical)))
    seen: set[str] = set()
    for direction, title in (
        ("raises_risk", "raised risk"),
        ("lowers_risk", "lowered risk"),
        ("raises_anomaly", "unusual value"),
    ):
        for rank, reason in enumerate(ranked(facts, direction)):
            if reason["feature"] in seen:
                continue
            seen.add(reason["feature"])
            line = f"{title} #{rank + 1}: {_brief_reason(reason)}"
            out.append(Choice(reason["feature"], direction, line, reason, rank))
    if facts.anomaly is not None and "anomaly" not in seen:
        line = "anomaly score " + _brief("anomaly", facts.anomaly, facts.anomaly_typical)
        out.append(Choice("anomaly", "anomaly", line))
    for rule in facts.rules:
        if rule["name"] not in opened:
            out.append(Choice(rule["name"], "rule", f"rule {rule['name']} ({rule['tier']} tier) also fired"))
    return out


def keyed(facts: Facts) -> dict[str, Choice]:
    """The choices by the one-letter key the model reads and answers (``a``, ``b``...): a feature name
    costs the model 3 to 5 tokens to write, a letter one, and each token is a forward pass on a CPU."""
    return {chr(ord("a") + i): choice for i, choice in enumerate(choices(facts)[:26])}


def schema(facts: Facts) -> dict[str, Any] | None:
    """The JSON schema of the answer for this decision (None: nothing to choose)."""
    ids = list(keyed(facts))
    if not ids:
        return None
    return {
        "type": "object",
        "properties": {
            "mention": {
                "type": "array",
                "items": {"type": "string", "enum": ids},
                "minItems": 1,
                "maxItems": min(MAX_MENTIONS, len(ids)),
            }
        },
        "required": ["mention"],
        "additionalProperties": False,
    }


def prompt_facts(facts: Facts) -> str:
    """The user message's body: the decision, then each choosable fact as ``id: fact``."""
    decided = {"rule": "the rules", "policy": "the learned policy", "fallback": "the safe default"}.get(
        facts.decided_by, facts.decided_by or "the platform"
    )
    if facts.explored:
        decided = "a random draw (exploration)"
    head = f"Decision: {facts.action_word.upper()}, decided by {decided}"
    rules = facts.deciding_rules()
    if rules:
        head += " (" + ", ".join(f"rule {r['name']} {RULE_EFFECTS[r['tier']]}" for r in rules) + ")"
    lines = [head, "FACTS (id: fact):"] + [f"{key}: {c.line}" for key, c in keyed(facts).items()]
    return "\n".join(lines)


class ParseError(ValueError):
    """The answer is not the JSON object the schema describes."""


def parse(text: str, facts: Facts) -> list[str]:
    """The facts chosen (their ids: ``risk``, a feature, a rule), known and without repeats, in the
    model's order. Raises ParseError.

    Tolerant of what servers without constrained decoding add (code fences, a sentence around the
    object); strict about the ids: an unknown one is dropped, and choosing none is an error."""
    match = re.search(r"\{.*\}", text, re.S)
    if match is None:
        raise ParseError("the answer is not the JSON object asked for")
    try:
        payload = json.loads(match.group(0))
    except ValueError:
        raise ParseError("the answer is not valid JSON") from None
    mention = payload.get("mention") if isinstance(payload, dict) else None
    if not isinstance(mention, list):
        raise ParseError('the answer has no "mention" list')
    by_key = keyed(facts)
    known = {c.id for c in by_key.values()}  # a server without constrained decoding may write the names
    chosen: list[str] = []
    for item in mention:
        fact = by_key[item].id if isinstance(item, str) and item in by_key else item
        if isinstance(fact, str) and fact in known and fact not in chosen:
            chosen.append(fact)
    if not chosen:
        raise ParseError("the answer names no fact of the list")
    return chosen[:MAX_MENTIONS]


def render(facts: Facts, chosen: Sequence[str]) -> str:
    """The narrative of ``chosen`` ids: sections in the order the model first named them, reasons
    within a section in the order of their attributions."""
    by_id = {c.id: c for c in choices(facts)}
    picked = [by_id[i] for i in chosen if i in by_id]
    sections: list[str] = []
    for choice in picked:
        if choice.section not in sections:
            sections.append(choice.section)
    sentences = [opening(facts)]
    for section in sections:
        group = sorted((c for c in picked if c.section == section), key=lambda c: c.rank)
        sentences.append(_sentence(facts, section, group))
    return " ".join(sentences)


def _sentence(facts: Facts, section: str, group: list[Choice]) -> str:
    if section == "risk":
        return f"The risk of fraud was {_scored('risk', facts.risk or 0.0, facts.risk_typical)}."
    if section == "anomaly":
        return f"The anomaly score was {_scored('anomaly', facts.anomaly or 0.0, facts.anomaly_typical)}."
    if section == "rule":
        rules = [f"{c.id} ({next(r['tier'] for r in facts.rules if r['name'] == c.id)} tier)" for c in group]
        return f"The rule{'s' if len(rules) > 1 else ''} {_join(rules)} also fired."
    texts = _join([reason_text(c.reason or {}) for c in group])
    top = [c.rank for c in group] == list(range(len(group)))  # the largest ones, in order: "most" is true
    if section == "raises_risk":
        return f"The risk was raised {'most ' if top else ''}by {texts}."
    if section == "lowers_risk":
        return f"It was lowered {'most ' if top else ''}by {texts}."
    return f"The event was unusual for its {texts}."


def _scored(name: str, value: float, typical: dict[str, Any] | None) -> str:
    text = format_value(name, value)
    if typical:
        text += f" ({range_phrase(name, value, typical['low'], typical['high'])})"
    return text


def _brief(name: str, value: float, typical: dict[str, Any] | None) -> str:
    """``0.93, above typical``: the value and where it stands, without the range's numbers."""
    text = format_value(name, value)
    if typical:
        text += (
            ", " + range_phrase(name, value, typical["low"], typical["high"]).split(" the ")[0] + " typical"
        )
    return text


def _brief_reason(reason: dict[str, Any]) -> str:
    text = reason_text({k: v for k, v in reason.items() if k not in ("text", "typical")}, quote_event=False)
    typical = reason.get("typical")
    if typical:
        where = range_phrase(reason["feature"], float(reason["value"]), typical["low"], typical["high"])
        text += ", " + where.split(" the ")[0] + " typical"
    return text


def _join(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
