"""Deterministic reason codes and the template sentence every decision carries.

These are facts an auditor can check against the decision record: the inputs that moved the risk most
(with their values and what is typical), the inputs that made the event look unusual to the anomaly
model, the rules that fired, the fallback if any. The sentence is built only from them, and so is the
LLM narrative later (explain/facts.py), which is why the wording of values lives here, in one place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from decision_platform.core.actions import ACTION_NAMES
from decision_platform.features.spec import CATEGORY_PREFIX
from decision_platform.rules.ruleset import FiredRule, mask_for

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
    "entity_windows_unreadable": "the entity's stored windows could not be read",
}
#: A category's value when the event has none.
ABSENT = "absent"
#: Reasons smaller than this (logit units for risk, score units for anomaly) explain nothing.
MIN_RISK_WEIGHT = 0.05
MIN_ANOMALY_WEIGHT = 0.005


def describe_feature(name: str) -> str:
    """A plain-words name of a feature: ``count_1m`` -> "events in the last minute"."""
    match = re.fullmatch(r"(count|sum|mean|max)_(\w+)", name)
    if match and match.group(2) in _WINDOWS:
        return f"{_AGGREGATES[match.group(1)]} in {_WINDOWS[match.group(2)]}"
    if name.startswith(CATEGORY_PREFIX):  # a category (FeatureSpec.categorical_names): its attribute
        # in words: "email_domain" read as an unknown rule or input name to the grounding check
        return name.removeprefix(CATEGORY_PREFIX).replace("_", " ")
    match = re.fullmatch(r"distinct_(\w+)_(\w+)", name)
    if match and match.group(2) in _WINDOWS:
        return f"distinct {match.group(1).replace('_', ' ')}s in {_WINDOWS[match.group(2)]}"
    return {
        "seconds_since_last": "seconds since the previous event",
        "amount": "amount",
        "anomaly": "anomaly score",
        "risk": "risk",
        "hour_sin": "time of day",
        "hour_cos": "time of day",
        "time_of_day": "time of day",
    }.get(name, name.replace("_", " "))


def count_phrase(shown: str, description: str) -> str:
    """A count before its words, in the right number: ``1 event in the last minute``, ``3 events ...``."""
    if shown == "1":
        head, sep, rest = description.partition(" in ")
        description = head.removesuffix("s") + sep + rest
    return f"{shown} {description}"


def description_pattern(description: str) -> str:
    """A regular expression for a reason's words as :func:`count_phrase` may write them (either number)."""
    head, sep, rest = description.partition(" in ")
    if sep and head.startswith(("events", "distinct ")) and head.endswith("s"):
        return re.escape(head.removesuffix("s")) + "s?" + re.escape(sep + rest)
    return re.escape(description)


def _is_count(name: str) -> bool:
    return name.startswith(("count_", "distinct_")) or name == "seconds_since_last"


def _is_score(name: str) -> bool:
    return name in ("anomaly", "risk")


def format_value(name: str, value: float) -> str:
    """How a value of ``name`` is written everywhere (sentence, facts, narrative checks): never a "-0",
    and never a score rounded to 0 or 1 that it is not."""
    if _is_score(name):
        text = _score_text(value)
    elif name == "amount" or name.startswith(("sum_", "mean_", "max_")):
        text = f"{value:,.2f}"
    elif _is_count(name) or float(value).is_integer():
        text = f"{value:,.0f}"
    else:
        text = f"{value:,.2f}"
    # -0.001 rounds to "-0.00": a sign on a zero reads as a different number than the zero it is
    return text[1:] if text.startswith("-") and not text.strip("-0.,") else text


def _score_text(value: float) -> str:
    """Two decimals, three below 0.1 (0.004 is not 0); more when fewer would round a score that is
    neither 0 nor 1 to one of them (a risk of 0.0004 is not "0.000", one of 0.9996 not "1.00"). Below 1e-4
    in scientific notation: a risk of 2e-87 was written with 87 decimals."""
    if 0.0 < value < 1e-4:
        return f"{value:.1e}"
    decimals = 2 if value >= 0.1 or value == 0 else 3
    for gap in (value, 1.0 - value):
        if 0.0 < gap < 10.0**-decimals:
            decimals = -math.floor(math.log10(gap))
    return f"{value:.{decimals}f}"


def written_bounds(name: str, low: float, high: float) -> tuple[float, float]:
    """A typical range's bounds as they are written: counts widened to whole numbers (percentiles
    interpolate between them). What is "outside the typical range" is judged on these (the anomaly's
    contributors too), so that no reason says "unusual" of a value its own words place within."""
    if _is_count(name) and math.isfinite(low) and math.isfinite(high):
        return math.floor(low + 1e-9), math.ceil(high - 1e-9)
    return low, high


def format_range(name: str, low: float, high: float) -> str:
    """A typical range, as ``written_bounds`` gives it."""
    if _is_count(name):
        low, high = written_bounds(name, low, high)
        return f"{low:,.0f} to {high:,.0f}" if low != high else f"{low:,.0f}"
    low_text, high_text = format_value(name, low), format_value(name, high)
    return f"{low_text} to {high_text}" if low_text != high_text else low_text


def range_phrase(name: str, value: float, low: float, high: float) -> str:
    """``above the typical 1 to 2``: the range and where the value stands, compared as they are written
    (so that the words and the numbers a reader sees always agree, and the grounding check with them)."""
    text = format_range(name, low, high)
    return _placed(format_value(name, value), text, _bounds(text))


def _bounds(range_text: str) -> tuple[float, float]:
    bounds = [float(t.replace(",", "")) for t in range_text.split(" to ")]
    return bounds[0], bounds[-1]


def _placed(shown: str, range_text: str, bounds: tuple[float, float]) -> str:
    value = float(shown.replace(",", ""))
    where = "above" if value > bounds[1] else "below" if value < bounds[0] else "within"
    return f"{where} the typical {range_text}"


def time_of_day(hour_sin: float, hour_cos: float) -> str:
    """The UTC clock time encoded by the two circular features."""
    minutes = round((math.atan2(hour_sin, hour_cos) % (2 * math.pi)) / (2 * math.pi) * 24 * 60) % (24 * 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d} UTC"


def event_text(reason: Mapping[str, Any]) -> str | None:
    """The event's own text a reason quotes (a category's value, ``'gmail.com'``), None if it quotes none.
    It is untrusted data: never sent to a model, and never read as the platform's words by the check."""
    display = reason.get("display")
    if str(reason.get("feature", "")).startswith(CATEGORY_PREFIX) and display and display != ABSENT:
        return str(display)
    return None


def reason_text(reason: Mapping[str, Any], quote_event: bool = True) -> str:
    """``25 events in the last minute (above the typical 1 to 2)``: a reason in words, and its range.
    ``quote_event=False``: a category's value, which is the event's text, is not written (``email domain
    of the event``): what a model reads and what a narrative is checked against."""
    description = reason.get("description") or describe_feature(reason["feature"])
    if not quote_event and event_text(reason) is not None:
        return f"{description} of the event"
    if reason.get("text"):
        return str(reason["text"])
    display = reason.get("display") or format_value(reason["feature"], float(reason["value"]))
    if description.startswith(("events ", "distinct ")):
        text = count_phrase(display, description)
    else:
        text = f"{description} {display}"
    typical = reason.get("typical")
    if typical:
        text += (
            f" ({range_phrase(reason['feature'], float(reason['value']), typical['low'], typical['high'])})"
        )
    return text


#: Distinct values whose words a Wording keeps (counts repeat a lot; amounts hardly: then it starts over).
WORDS_CACHE = 4096


class Wording:
    """What does not change between decisions, per input: its words and its normal range."""

    def __init__(self, name: str, typical: dict[str, Any] | None) -> None:
        self.name = name
        self.description = describe_feature(name)
        self.count_first = self.description.startswith(("events ", "distinct "))
        self.typical = typical
        # The range's words and bounds do not change between decisions: written once, not per reason.
        self._range = format_range(name, typical["low"], typical["high"]) if typical else ""
        self._bounds = _bounds(self._range) if typical else (0.0, 0.0)
        #: value -> (value rounded, its display, the phrase): the same value is worded once.
        self._words: dict[float, tuple[float, str, str]] = {}

    def _worded(self, value: float) -> tuple[float, str, str]:
        words = self._words.get(value) if value != 0.0 else None  # 0.0 == -0.0, but "-0" != "0"
        if words is None:
            shown = format_value(self.name, value)
            phrase = self._phrase(shown)
            if self.typical:
                phrase += f" ({_placed(shown, self._range, self._bounds)})"
            words = (round(value, 4), shown, phrase)
            if value != 0.0:
                if len(self._words) >= WORDS_CACHE:
                    self._words = {}
                self._words[value] = words
        return words

    def written_outside(self, value: float) -> bool:
        """Whether ``value``, as written, lies outside the typical range as written (True without one):
        an anomaly reason is only given for such a value."""
        if not self.typical:
            return True
        shown = float(format_value(self.name, value).replace(",", ""))
        return not self._bounds[0] <= shown <= self._bounds[1]

    def _phrase(self, shown: str) -> str:
        return count_phrase(shown, self.description) if self.count_first else f"{self.description} {shown}"

    def reason(self, kind: str, value: float, weight: float, display: str | None = None) -> dict[str, Any]:
        if kind == "risk":
            direction = "raises_risk" if weight > 0 else "lowers_risk"
        else:
            direction = "raises_anomaly" if weight > 0 else "lowers_anomaly"
        if display is not None:  # words given (a clock time, a category's value): no range after them
            rounded, shown = round(value, 4), display or format_value(self.name, value)
            phrase = self._phrase(shown)
        else:
            rounded, shown, phrase = self._worded(value)
        return {
            "feature": self.name,
            "value": rounded,
            "direction": direction,
            "weight": round(weight, 4),
            "description": self.description,
            "kind": kind,
            "display": shown,
            "typical": self.typical,
            "text": phrase,
        }


def make_reason(
    kind: str,
    feature: str,
    value: float,
    weight: float,
    typical: Mapping[str, Any] | None,
    display: str | None = None,
) -> dict[str, Any]:
    """One reason code. ``kind`` risk: ``weight`` is the input's share of the risk logit (DeepLIFT);
    kind anomaly: its share of the anomaly score above what typical values would give."""
    return Wording(feature, dict(typical) if typical else None).reason(
        kind, float(value), float(weight), display
    )


def template_sentence(
    action: int,
    risk: float | None,
    reasons: Sequence[dict[str, Any]],
    rules: Sequence[FiredRule],
    fallback: str | None,
    proposed: int | None = None,
) -> str:
    """One sentence from the facts only; always present, whatever failed. ``proposed``: the action the
    learned policy favoured among those the rules allowed, when ``action`` is another one -- drawn at
    random (exploration), which the sentence says rather than let the risk and its reasons seem to
    justify it."""
    parts = [ACTION_VERBS[action]]
    if proposed is not None and proposed != action and not fallback:
        parts.append(f" at random (exploration; the learned policy proposed {ACTION_NAMES[proposed]})")
    if fallback:
        cause = _FALLBACK_TEXT.get(fallback, fallback.replace("_", " ").replace(":", ": "))
        if sum(mask_for([r.tier for r in rules])) == 1:  # the rules left one action: no default was chosen
            parts.append(f" by the rules; the models were not used because {cause}")
        else:
            parts.append(f" as the safe default because {cause}")
    elif risk is not None:
        parts.append(f": risk {format_value('risk', risk)}")
    raising = [r for r in reasons if r["direction"] == "raises_risk"]
    if raising and not fallback:
        parts.append("; main factors: " + ", ".join(reason_text(r) for r in raising[:3]))
    unusual = [r for r in reasons if r.get("kind") == "anomaly" and r["direction"] == "raises_anomaly"]
    if unusual and not fallback:
        parts.append("; unusual: " + ", ".join(reason_text(r) for r in unusual[:2]))
    if rules:
        named = ", ".join(f"{r.name} ({r.tier.value})" for r in rules)
        parts.append(f"; rules: {named}")
    return "".join(parts) + "."
