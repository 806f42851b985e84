"""The grounding check: a narrative is served only if it says nothing the facts do not.

A small local model writes fluent text that may state a wrong number, the wrong action, or a reason
that sounds plausible and is not in the record ("a login from a new country"). For an auditor that is
worse than no narrative. So before a narrative is stored, it must pass, against the FACTS it was
written from (``Facts.trusted_text``, never the untrusted event data):

- length: bounded, not empty;
- numbers: every number it states is a fact's number at the precision written (``0.93``, ``93%``);
- action: the first sentence states the decision's own action first; any other action it names
  appears in the facts (e.g. what the policy alone proposed);
- reasons: every kind of cause it invokes (devices, location, amounts, timing, history...) is among
  the facts, and every identifier-like name (``card_testing_burst``) is a fired rule or a known input;
- data stays data: it does not quote the event's attribute text, nor carry links;
- substance: it mentions at least one fact (a rule, a number, a reason);
- direction: a reason said to raise the risk has a positive attribution, one said to lower it a negative
  one, one said to make the event unusual raised the anomaly score;
- rank: reasons of one direction are named in the order of their attributions, and reasons said to
  matter "most" (or "mainly"...) are the largest attributions, in order;
- rules: rules said to have caused the action ("because the rule X fired") leave that action alone by
  their tiers (a floor rule alone does not cause a block: it only rules out allowing), and a rule said
  to have ruled out an action is of a tier that does.

The checks are deliberately conservative (a correct narrative may be refused, then the template is
served); they are cheap, deterministic, and each failure says why.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from decision_platform.core.actions import ACTION_NAMES
from decision_platform.explain.facts import Facts
from decision_platform.explain.reasons import (
    describe_feature,
    description_pattern,
    event_text,
    format_value,
    range_phrase,
    reason_text,
)
from decision_platform.rules.ruleset import Tier, mask_for

_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(\s?%|\s?percent)?(?![\w])")
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
    if i >= 2
} | {"thirty": 30, "forty": 40, "fifty": 50, "hundred": 100, "thousand": 1000}
_WORD_NUMBER = re.compile(r"\b(" + "|".join(_WORD_NUMBERS) + r")\b", re.IGNORECASE)

#: The words of each action (index = action). The first one a narrative uses must be its own.
ACTION_PATTERNS = (
    re.compile(
        r"\b(allow(s|ed|ing)?|approv(e|es|ed|ing|al)|accept(s|ed|ing)?|permit(s|ted)?|let through)\b", re.I
    ),
    re.compile(
        r"\b(throttl(e|es|ed|ing)|step[- ]?ups?|rate[- ]limit(s|ed|ing)?|slow(ed)? down|"
        r"(additional|extra) (verification|authentication|check)s?|challeng(e|es|ed))\b",
        re.I,
    ),
    re.compile(
        r"\b(block(s|ed|ing)?|declin(e|es|ed|ing)|den(y|ies|ied)|reject(s|ed|ion)?|refus(e|ed|al))\b", re.I
    ),
)


@dataclass(frozen=True)
class Concept:
    """A kind of cause. Invoking it (``trigger`` in the narrative) needs ``support`` in the facts."""

    name: str
    trigger: re.Pattern[str]
    support: re.Pattern[str]


def _concept(name: str, trigger: str, support: str | None = None) -> Concept:
    return Concept(
        name, re.compile(rf"\b({trigger})\b", re.I), re.compile(rf"\b({support or trigger})\b", re.I)
    )


CONCEPTS = (
    _concept(
        "activity volume",
        r"velocity|frequen\w*|bursts?|rapid\w*|in (quick|rapid) succession|"
        r"(many|several|multiple|numerous|lots of) "
        r"(events|payments|transactions|attempts|requests|purchases)",
        r"events in the last|velocity|burst|card testing",
    ),
    _concept("devices", r"devices?", r"devices?"),
    _concept(
        "amounts",
        r"amounts?|spen[dt]|spending|large (payment|purchase|transaction)s?|high[- ]value|expensive",
        r"amounts?",
    ),
    _concept(
        "time of day",
        r"time of (the )?day|night\w*|midnight|early morning|late (hour|evening)|unusual hour|odd hour",
        r"time of day",
    ),
    _concept(
        "time since previous",
        r"since (the|its|their) (last|previous)|time between|gaps?",
        r"since the previous",
    ),
    _concept("anomaly", r"anomal\w*|outliers?|atypical", r"anomaly"),
    _concept(
        "location",
        r"locations?|countr(y|ies)|geo\w*|ip( address)?|vpn|proxy|abroad|foreign|cit(y|ies)|travel\w*|"
        r"distance|region",
    ),
    _concept(
        "identity",
        r"e-?mails?|phone( number)?s?|passwords?|credentials?|account age|new account|identity|kyc|"
        r"address(es)?|log-?ins?|sign-?ins?",
    ),
    _concept(
        "history",
        r"chargebacks?|fraud history|history of fraud|previous(ly)? (fraud|flagged)|black-?list\w*|"
        r"deny-?list\w*|watch-?list\w*|stolen|compromised|reported|known fraud\w*",
    ),
    _concept("merchants", r"merchants?|retailers?|shops?|stores?|vendors?|sellers?"),
    _concept("card", r"cards?|card testing", r"cards?|card testing"),
)
_IDENTIFIER = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b")
_LINK = re.compile(r"https?://|www\.", re.I)
#: Labels of the prompt's blocks: a narrative repeating them is an echo of the prompt, not an explanation.
_LAYOUT = re.compile(
    r"\b(decision|decided by|risk of fraud|anomaly score|raised the risk|lowered the risk|unusual values|"
    r"rules? fired|event|facts|event data)\s*:|^\s*[-*•]\s|\n\s*[-*•]\s|<<<|>>>",
    re.I,
)
#: "<value> ... higher than ... typical ... <low> to <high>" within one clause: the relation must be true.
_RELATION = (
    r"higher|above|exceed\w*|more than|greater|over|lower|below|less than|under|within|inside|in line with|"
    r"outside"
)
#: "the last 5 minutes": a window's length, not a value.
_WINDOW = r"(?:minutes?|hours?|days?|seconds?)\b"
_COMPARISON = re.compile(
    rf"(?P<value>(?<![\d.,])\d[\d,]*(?:\.\d+)?)(?!\d)(?!\s*{_WINDOW})(?:(?![.;]\s)(?:\d+\s*{_WINDOW}|[^;\d]))*?"
    rf"\b(?P<relation>{_RELATION})\b"
    r"(?:(?![.;]\s)[^;])*?typical\D{0,20}?"
    r"(?P<low>\d[\d,]*(?:\.\d+)?)\s*(?:to|-|\u2013)\s*(?P<high>\d[\d,]*(?:\.\d+)?)",
    re.I,
)
#: The prompt's machinery is not part of an explanation ("the rule that is not in FACTS").
_PROMPT_TALK = re.compile(r"(?-i:\bFACTS\b|\bEVENT DATA\b)|\binstruct\w*|\bprompt\w*|\bas an ai\b", re.I)
_HIGH_RISK = re.compile(
    r"\bhigh[- ]risk|\b(high|elevated|significant|considerable)( level of)? risk|"
    r"\brisk( of fraud)? (was|is) (high|elevated)|\bhigh(er)? (likelihood|probability|chance) of fraud",
    re.I,
)
_LOW_RISK = re.compile(
    r"\blow[- ]risk|\blow( level of)? risk|\brisk( of fraud)? (was|is) (low|minimal|negligible)", re.I
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
#: Direction words: a verb that says what a reason did to the risk (adjectives such as "lower than" compare
#: a value with its range, they claim no direction), or that it made the event unusual.
_DIRECTION = re.compile(
    r"\b(?P<raises>rais(?:ed|es|ing)|increas(?:ed|es|ing)|push(?:ed|es|ing) up|dr(?:ove|ives|iving) up|"
    r"add(?:ed|s|ing) to)\b|\b(?P<lowers>lower(?:ed|s|ing)|reduc(?:ed|es|ing)|decreas(?:ed|es|ing)|"
    r"offset(?:s|ting)?|pull(?:ed|s|ing) down|br(?:ought|ings|inging) down|mitigat(?:ed|es|ing))\b|"
    r"\b(?P<unusual>unusual|anomalous|atypical)\b",
    re.I,
)
#: A rank claim: the reasons named are the largest ones.
_MOST = re.compile(
    r"\b(most|mainly|mostly|chiefly|primarily|above all|main|biggest|largest|strongest|top)\b", re.I
)
#: Where one claim ends and another begins within a sentence.
_CLAUSE_END = re.compile(r"[.;!?](?:\s|$)|\b(?:while|although|though|whereas|but)\b|,\s+(?=which\b)", re.I)

#: A claim that what follows in the clause caused the action.
_CAUSE = re.compile(
    r"\b(because|due to|as a result of|caused by|forced by|triggered by|owing to|on account of|"
    r"thanks to|decided by)\b",
    re.I,
)
#: "ruled out allowing": which action a rule is said to have taken away.
_RULED_OUT = re.compile(r"\b(?:ruled out|excluded|prevented)\s+(?P<action>allow|throttl|block)\w*", re.I)
#: The tiers that take each action away (mask_for).
_RULES_OUT = {"allow": {"block", "floor"}, "throttl": {"block"}, "block": {"cap"}}


@dataclass
class Grounding:
    passed: bool
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "problems": list(self.problems)}


def numbers_in(text: str) -> list[tuple[float, int, bool]]:
    """Numbers written in ``text``: (value, decimals, is_percent). ``d-1``-style identifiers are skipped."""
    found = []
    for match in _NUMBER.finditer(text):
        start = match.start()
        if start >= 2 and text[start - 1] == "-" and text[start - 2].isalpha():
            continue
        whole, fraction, percent = match.group(1), match.group(2) or "", match.group(3)
        value = float(whole.replace(",", "") + fraction)
        found.append((value, max(len(fraction) - 1, 0), bool(percent)))
    for match in _WORD_NUMBER.finditer(text):
        found.append((float(_WORD_NUMBERS[match.group(1).lower()]), 0, False))
    return found


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("."))


def reference_text(facts: Facts) -> str:
    """What a narrative is checked against: the FACTS block, and every reason of the record in words
    (a structured narrative may name a reason the block leaves out for brevity)."""
    return "\n".join([facts.trusted_text(), *(reason_text(r, quote_event=False) for r in facts.reasons)])


def unquoted(text: str, facts: Facts) -> str:
    """``text`` with the event's own text its reasons quote (a category's value) replaced by a neutral
    mark: a device named "Blocked VPN 15" is data, not a claim of an action, a location or a number."""
    for quoted in sorted({q for r in facts.reasons if (q := event_text(r))}, key=len, reverse=True):
        text = text.replace(quoted, "'…'")
    return text


def allowed_numbers(facts: Facts) -> list[float]:
    values = [v for v, _, _ in numbers_in(reference_text(facts))]
    values += [float(len(facts.rules)), float(len(facts.reasons))]
    return values


def _matches(value: float, decimals: int, percent: bool, allowed: list[float]) -> bool:
    if percent:
        value, decimals = value / 100.0, decimals + 2
    tolerance = 0.5 * 10.0**-decimals + 1e-9
    return any(abs(f - value) <= tolerance for f in allowed)


def check(narrative: str, facts: Facts, max_chars: int = 700) -> Grounding:
    """Every problem found (an empty list means the narrative passed)."""
    problems: list[str] = []
    written = narrative.strip()
    text = unquoted(written, facts)
    if len(written) < 20:
        problems.append("too short")
    if len(written) > max_chars:
        problems.append(f"too long ({len(written)} > {max_chars} characters)")
    trusted = facts.trusted_text()
    support_text = reference_text(facts).replace("_", " ")

    allowed = allowed_numbers(facts)
    wrong = sorted(
        {f"{v:g}{'%' if p else ''}" for v, d, p in numbers_in(text) if not _matches(v, d, p, allowed)}
    )
    if wrong:
        problems.append(f"numbers not in the facts: {', '.join(wrong)}")

    first = _SENTENCE_END.split(text, maxsplit=1)[0]
    mentions = [(m.start(), a) for a, pattern in enumerate(ACTION_PATTERNS) for m in pattern.finditer(first)]
    if not mentions:
        problems.append(f"the first sentence does not state the action ({facts.action_name})")
    elif min(mentions)[1] != facts.action:
        problems.append(
            f"states {ACTION_NAMES[min(mentions)[1]]} first, but the action is {facts.action_name}"
        )
    context = trusted.split("\n", 1)[-1]  # the facts below the decision line: proposed action, rules
    for action, pattern in enumerate(ACTION_PATTERNS):
        if action != facts.action and pattern.search(text) and not pattern.search(context):
            problems.append(f"names the action {ACTION_NAMES[action]}, which is not in the facts")

    for concept in CONCEPTS:
        said = concept.trigger.search(text)
        if said and not concept.support.search(support_text):
            problems.append(f"invented reason ({concept.name}): {said.group(0)!r}")
    known = {r["name"] for r in facts.rules} | {r["feature"] for r in facts.reasons}
    for name in sorted(set(_IDENTIFIER.findall(text)) - known):
        problems.append(f"unknown rule or input: {name}")

    for clause in _COMPARISON.finditer(text):
        value, relation = _number(clause.group("value")), clause.group("relation").lower()
        low, high = _number(clause.group("low")), _number(clause.group("high"))
        above, below = value > high, value < low
        wrong = (
            (relation.startswith(("high", "above", "exceed", "more", "great", "over")) and not above)
            or (relation.startswith(("low", "below", "less", "under")) and not below)
            or (relation.startswith(("within", "inside", "in line")) and (above or below))
            or (relation.startswith("outside") and not (above or below))
        )
        if wrong:
            problems.append(f"wrong comparison: {clause.group(0)[:80]!r}")

    lowered = text.lower()
    for key, value in facts.attributes.items():
        if len(value) >= 12 and any(c.isspace() for c in value) and value.lower() in lowered:  # free text
            problems.append(f"quotes the event attribute {key!r}")
    if _LINK.search(text):
        problems.append("contains a link")
    if _LAYOUT.search(text):
        problems.append("copies the facts' layout instead of writing sentences")

    if _PROMPT_TALK.search(text):
        problems.append(f"talks about its instructions: {_PROMPT_TALK.search(text).group(0)!r}")  # type: ignore[union-attr]
    sentences = [re.sub(r"\W+", " ", s).strip().lower() for s in _SENTENCE_END.split(text) if s.strip()]
    words = lowered.split()
    grams = [" ".join(words[i : i + 12]) for i in range(len(words) - 11)]  # a loop, not a turn of phrase
    if len(set(sentences)) < len(sentences) or len(set(grams)) < len(grams):
        problems.append("repeats itself")
    level = _risk_level(facts)
    if level in ("within", "below") and _HIGH_RISK.search(text):
        problems.append(f"calls the risk high, but it is {level} its typical range")
    if level == "above" and _LOW_RISK.search(text):
        problems.append("calls the risk low, but it is above its typical range")

    deciding = [r["name"] for r in facts.deciding_rules()]
    if deciding and not any(name in text for name in deciding):
        problems.append(f"does not name the rule that decided ({', '.join(deciding)})")
    shown = [str(r.get("display") or "") for r in facts.reasons] + [r["name"] for r in facts.rules]
    # The policy decides on the risk and the anomaly score: each is a reason.
    shown += [
        format_value(name, v)
        for name, v in (("risk", facts.risk), ("anomaly", facts.anomaly))
        if v is not None
    ]
    if (facts.reasons or facts.rules) and not any(item and _mentions(written, item) for item in shown):
        problems.append("states no reason of the facts (no rule, no reason's value)")
    problems += direction_and_rank(text, facts)
    problems += rule_claims(text, facts)
    return Grounding(not problems, problems)


def rule_claims(text: str, facts: Facts) -> list[str]:
    """Problems with what the narrative says the rules did (see the module docstring).

    A clause with a causal word ("because", "due to"...) followed by rule names claims those rules
    caused the action: by their tiers (mask_for) they must leave the action and nothing else. A rule
    followed in its clause by "ruled out allowing / throttling / blocking" must be of a tier that does."""
    tiers = {r["name"]: r.get("tier") for r in facts.rules}
    if not tiers:
        return []
    problems: list[str] = []
    bounds = [0, *(m.end() for m in _CLAUSE_END.finditer(text)), len(text)]
    for start, end in itertools.pairwise(bounds):
        clause = text[start:end]
        named = sorted(
            (m.start(), name)
            for name in tiers
            for m in re.finditer(rf"(?<![\w-]){re.escape(name)}(?![\w-])", clause)
        )
        if not named:
            continue
        cause = _CAUSE.search(clause)
        causes = [name for position, name in named if cause and position > cause.start()]
        if causes:
            fired = [Tier(tiers[n]) for n in causes if tiers[n] in {t.value for t in Tier}]
            left = [a for a, ok in enumerate(mask_for(fired)) if ok]
            if left != [facts.action]:
                said = ", ".join(f"{n} ({tiers[n]} tier)" for n in causes)
                problems.append(
                    f"wrong cause: says {said} caused the {facts.action_name}, but by their tiers the rules "
                    f"left {' or '.join(ACTION_NAMES[a] for a in left)}"
                )
        for match in _RULED_OUT.finditer(clause):
            before = [name for position, name in named if position < match.start()]
            if before and tiers[before[-1]] not in _RULES_OUT[match.group("action").lower()]:
                problems.append(
                    f"wrong rule effect: says {before[-1]} ({tiers[before[-1]]} tier) "
                    f"{match.group(0).lower()}, which a {tiers[before[-1]]} rule does not do"
                )
    return problems


def _claims(text: str, facts: Facts) -> list[list[tuple[int, str, str | None, bool]]]:
    """Per clause, the reasons it names in order: (position, feature, direction claimed or None, "most").

    A reason is found by its description ("events in the last minute", or "event" for a count of one),
    longest first so that "amount"
    is not found inside "average amount in the last 24 hours"; its claimed direction is the direction
    word nearest to it in the clause."""
    names = {r["feature"]: str(r.get("description") or describe_feature(r["feature"])) for r in facts.reasons}
    bounds = [0, *(m.end() for m in _CLAUSE_END.finditer(text)), len(text)]
    out = []
    for start, end in itertools.pairwise(bounds):
        clause = text[start:end]
        taken = [False] * len(clause)
        found: list[tuple[int, str]] = []
        for feature, name in sorted(names.items(), key=lambda item: -len(item[1])):
            for match in re.finditer(rf"(?<![\w-]){description_pattern(name)}(?![\w-])", clause, re.I):
                if not any(taken[match.start() : match.end()]):
                    taken[match.start() : match.end()] = [True] * (match.end() - match.start())
                    found.append((match.start(), feature))
        if not found:
            continue
        # Words of the reasons' own names claim nothing ("largest amount in the last hour" is no rank).
        rest = "".join(" " if hidden else c for c, hidden in zip(clause, taken, strict=True))
        words = [(m.start(), m.lastgroup) for m in _DIRECTION.finditer(rest)]
        most = _MOST.search(rest) is not None
        claims = []
        for position, feature in sorted(found):
            nearest = min(words, key=lambda w: abs(w[0] - position), default=None)
            claims.append((position, feature, nearest[1] if nearest else None, most))
        out.append(claims)
    return out


def direction_and_rank(text: str, facts: Facts) -> list[str]:
    """Problems with the direction and rank of the reasons a narrative names (see the module docstring)."""
    problems: list[str] = []
    directions: dict[str, set[str]] = {}
    for reason in facts.reasons:
        directions.setdefault(reason["feature"], set()).add(reason["direction"])
    order = {
        d: [r["feature"] for r in sorted(group, key=lambda r: -abs(float(r.get("weight") or 0.0)))]
        for d in ("raises_risk", "lowers_risk", "raises_anomaly")
        for group in [[r for r in facts.reasons if r["direction"] == d]]
    }
    claimed_to = {"raises": "raises_risk", "lowers": "lowers_risk", "unusual": "raises_anomaly"}
    verbs = {
        "raises_risk": "raised the risk",
        "lowers_risk": "lowered the risk",
        "raises_anomaly": "was unusual",
    }
    for claims in _claims(text, facts):
        by_direction: dict[str, list[str]] = {}
        for _, feature, word, _most in claims:
            if word is None:
                continue
            claimed = claimed_to[word]
            name = describe_feature(feature)
            if claimed not in directions.get(feature, set()):
                truth = " and ".join(verbs[d] for d in sorted(directions.get(feature, ())) if d in verbs)
                problems.append(f"wrong direction: says {name} {verbs[claimed]}, but it {truth or 'did not'}")
                continue
            named = by_direction.setdefault(claimed, [])
            if feature not in named:
                named.append(feature)
        for claimed, named in by_direction.items():
            ranks = [order[claimed].index(f) for f in named]
            if ranks != sorted(ranks):
                problems.append(
                    f"wrong rank: names {', '.join(describe_feature(f) for f in named)} out of the order "
                    f"of their attributions ({', '.join(describe_feature(f) for f in order[claimed])})"
                )
            elif any(most for _, _, _, most in claims) and ranks != list(range(len(ranks))):
                top = ", ".join(describe_feature(f) for f in order[claimed][: len(named)])
                problems.append(
                    f"wrong rank: says {', '.join(describe_feature(f) for f in named)} mattered most, "
                    f"but the largest were {top}"
                )
    return problems


def _mentions(text: str, item: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(item)}(?![\w]|\.\d)", text) is not None


def _risk_level(facts: Facts) -> str | None:
    """Where the risk stands against its typical range, as the facts write it (None: no range)."""
    if facts.risk is None or not facts.risk_typical:
        return None
    return range_phrase("risk", facts.risk, facts.risk_typical["low"], facts.risk_typical["high"]).split()[0]
