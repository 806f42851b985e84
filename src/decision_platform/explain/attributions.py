"""Attributions on the hot path: why the risk is what it is, and why the event looks unusual.

Risk: the risk model's own DeepLIFT contributions (Shrikumar et al., 2017; ``RiskModel.explain``,
computed in the same pass as the risk) say how much each input moved the log-odds away from an average
event; unlike gradient x input they add up to that move exactly (completeness), so "this input added +1.3
to the log-odds" is a statement an auditor can check. This module turns them into reason codes.

Anomaly: exact Shapley values of the Isolation Forest score over the few inputs that are outside their
normal range (at most ``max_candidates``), each replaced by its median. For k candidates that is 2^k
rows through the vectorised forest: nothing for an ordinary event, ~16 rows for an unusual one. Their
sum is the score drop if those inputs had been typical. Without stored ranges (an artifact older than
explanations) there is no reference, and no anomaly contributor is given.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from decision_platform.explain.reasons import (
    ABSENT,
    MIN_ANOMALY_WEIGHT,
    MIN_RISK_WEIGHT,
    Wording,
    format_value,
    time_of_day,
    written_bounds,
)
from decision_platform.features.spec import ATTRIBUTE_PREFIX, CATEGORY_PREFIX
from decision_platform.models.anomaly import AnomalyModel
from decision_platform.models.preprocessing import signed_log
from decision_platform.models.ranges import NO_RANGE, FeatureRanges
from decision_platform.models.risk import RiskModel
from decision_platform.rules.ruleset import FiredRule, RuleSet

log = logging.getLogger(__name__)

# How a reason candidate's value is shown (ReasonBuilder._makers).
_VALUE, _CLOCK, _CATEGORY, _ATTRIBUTE = "value", "clock", "category", "attribute"


def _attribute_display(attributes: Mapping[str, Any] | None, name: str) -> str | None:
    """How a numeric attribute's reason shows its value: None (the number) when the event gave one, else
    why the model read a 0 -- a missing CSV cell is "absent", not "addr1 0 (below the typical 100 to 500)"."""
    given = (attributes or {}).get(name)
    if isinstance(given, int | float):
        return None
    return ABSENT if given is None else "not a number"


def _shapley_matrix(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Coalitions of k players as a (2^k, k) bool matrix, and W (k, 2^k) with phi = W @ v(coalitions)."""
    coalitions = np.array(list(itertools.product([False, True], repeat=k)), dtype=bool)
    index = {tuple(c): i for i, c in enumerate(coalitions)}
    weights = np.zeros((k, len(coalitions)))
    for i in range(k):
        for row, coalition in enumerate(coalitions):
            if coalition[i]:
                continue
            size = int(coalition.sum())
            w = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            with_i = coalition.copy()
            with_i[i] = True
            weights[i, index[tuple(with_i)]] += w
            weights[i, row] -= w
    return coalitions, weights


def feature_group(name: str) -> str:
    """Inputs that measure the same thing over different windows move together: a burst raises every
    count at once. Attributing them one by one would split (and understate) their effect, so the
    anomaly explanation treats each family as one player and names its most unusual member."""
    for prefix, group in (("count_", "activity"), ("distinct_", "distinct"), (ATTRIBUTE_PREFIX, "")):
        if name.startswith(prefix):
            return group or name
    if name.startswith(("sum_", "mean_", "max_")) or name == "amount":
        return "amounts"
    return name


class AnomalyAttributor:
    """Which unusual inputs made the anomaly score high: exact Shapley values over the families of
    inputs that are outside their normal range, each family set back to its medians when absent."""

    def __init__(self, model: AnomalyModel, ranges: FeatureRanges, max_players: int = 3) -> None:
        self.model = model
        self.names = list(model.feature_names)
        columns = [ranges.index.get(n) for n in self.names]
        usable = np.array(
            [c is not None and n not in NO_RANGE for c, n in zip(columns, self.names, strict=True)]
        )
        pick = [c if c is not None else 0 for c in columns]
        self.median = ranges.medians[pick]
        # Outside the range as the reasons write it (counts in whole numbers), not the raw percentiles.
        bounds = [
            written_bounds(n, lo, hi)
            for n, lo, hi in zip(self.names, ranges.lows[pick], ranges.highs[pick], strict=True)
        ]
        with np.errstate(invalid="ignore"):
            low, high = (signed_log(np.array(side, dtype=np.float64)) for side in zip(*bounds, strict=True))
        self._low = np.where(usable, low, -np.inf)
        self._high = np.where(usable, high, np.inf)
        # Distance outside the normal range, in the squashed units the models use, per unit of range width.
        self._span = np.where(usable, np.maximum(high - low, 1.0), 1.0)
        groups = [feature_group(n) for n in self.names]
        self.groups = list(dict.fromkeys(groups))
        self._members = np.array([[g == group for g in groups] for group in self.groups])  # (groups, d)
        self.max_players = max_players
        self.gate = float(ranges.highs[ranges.index["anomaly"]]) if "anomaly" in ranges.index else 0.5
        self._shapley = {k: _shapley_matrix(k) for k in range(1, max_players + 1)}

    def outside(self, rows: np.ndarray) -> np.ndarray:
        """How far each value is outside its normal range (0 inside), in range widths."""
        z = signed_log(rows)
        return np.maximum(np.maximum(z - self._high, self._low - z), 0.0) / self._span

    def explain(self, features: np.ndarray, scores: np.ndarray) -> list[list[tuple[int, float]]]:
        """For each row: (most unusual member of a family, the family's Shapley contribution to the
        score), largest first. Empty for rows scored within the normal range, or with nothing unusual."""
        features = np.atleast_2d(features)
        out: list[list[tuple[int, float]]] = [[] for _ in range(len(features))]
        rows = np.flatnonzero(np.asarray(scores) > self.gate)
        if len(rows) == 0:
            return out
        outside = self.outside(features[rows])  # (m, d)
        severity = np.where(self._members[None, :, :], outside[:, None, :], 0.0).max(axis=2)  # (m, groups)
        plans: list[tuple[int, np.ndarray, list[int]]] = []
        blocks: list[np.ndarray] = []
        for j, i in enumerate(rows):
            players = [int(g) for g in np.argsort(-severity[j])[: self.max_players] if severity[j, g] > 0]
            if not players:
                continue
            coalitions, _ = self._shapley[len(players)]
            block = np.repeat(features[i][None, :], len(coalitions), axis=0)
            for p, group in enumerate(players):  # an absent family: its unusual members at their medians
                columns = self._members[group] & (outside[j] > 0)
                block[np.ix_(~coalitions[:, p], columns)] = self.median[columns]
            representatives = [int(np.argmax(np.where(self._members[g], outside[j], -1.0))) for g in players]
            plans.append((int(i), np.asarray(representatives), players))
            blocks.append(block)
        if not blocks:
            return out
        values = self.model.score(np.vstack(blocks))
        start = 0
        for (i, representatives, players), block in zip(plans, blocks, strict=True):
            _, weights = self._shapley[len(players)]
            phi = weights @ values[start : start + len(block)]
            start += len(block)
            out[i] = sorted(zip(representatives.tolist(), phi.tolist(), strict=True), key=lambda t: -t[1])
        return out


class ReasonBuilder:
    """Reason codes for a batch: risk attributions, anomaly contributors, rules with their inputs."""

    def __init__(
        self,
        risk: RiskModel,
        anomaly: AnomalyModel | None,
        ranges: FeatureRanges | None,
        rules: RuleSet | None = None,
        max_up: int = 3,
        max_down: int = 2,
        max_anomaly: int = 3,
    ) -> None:
        self.model = risk
        self.anomaly = AnomalyAttributor(anomaly, ranges) if anomaly is not None and ranges else None
        self.ranges = ranges
        self.names = list(risk.input_names)
        self.max_up, self.max_down, self.max_anomaly = max_up, max_down, max_anomaly
        self._rule_inputs = _rule_inputs(rules) if rules is not None else {}
        # Time of day is two inputs (sin, cos) but one reason: their attributions are added up.
        self._hour = (
            (self.names.index("hour_sin"), self.names.index("hour_cos"))
            if {"hour_sin", "hour_cos"} <= set(self.names)
            else None
        )
        self.reason_names = [n for n in self.names if n not in ("hour_sin", "hour_cos")]
        if self._hour:
            self.reason_names.append("time_of_day")
        self._keep = [i for i, n in enumerate(self.names) if n not in ("hour_sin", "hour_cos")]
        self._column = {n: i for i, n in enumerate(self.names)}
        self._wording = {n: Wording(n, self.typical(n)) for n in [*self.names, "time_of_day"]}
        # Per reason candidate (a column of the merged attributions): its words, and what its value is
        # shown as: the input's value, the clock time, or the value of the event attribute a category names.
        self._makers: list[tuple[Wording, str, str]] = [
            (
                self._wording[name],
                _CLOCK
                if name == "time_of_day" and self._hour
                else _CATEGORY
                if name.startswith(CATEGORY_PREFIX)
                else _ATTRIBUTE
                if name.startswith(ATTRIBUTE_PREFIX)
                else _VALUE,
                name.removeprefix(CATEGORY_PREFIX).removeprefix(ATTRIBUTE_PREFIX),
            )
            for name in self.reason_names
        ]
        # The input column each candidate's value is read from (time of day: unused, any column).
        self._value_column = np.asarray(
            [self._column.get(name, 0) for name in self.reason_names], dtype=np.int64
        )

    @classmethod
    def for_models(
        cls,
        risk: RiskModel | None,
        anomaly: AnomalyModel | None,
        ranges: FeatureRanges | None,
        rules: RuleSet,
    ) -> ReasonBuilder | None:
        """The builder for the serving models, or None (no risk model, or one it cannot read: then the
        engine's own risk stage fails and falls back, as for any model failure; serving still starts)."""
        if risk is None:
            return None
        try:
            return cls(risk, anomaly, ranges, rules)
        except Exception:
            log.exception("reason codes unavailable for this risk model")
            return None

    def typical(self, name: str) -> dict[str, Any] | None:
        if name.startswith(CATEGORY_PREFIX):  # a code has no normal range
            return None
        found = self.ranges.typical(name) if self.ranges is not None else None
        return found.as_dict() if found else None

    def reasons(
        self,
        inputs: np.ndarray,
        attributions: np.ndarray,
        anomaly: np.ndarray | None = None,
        attributes: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[list[dict[str, Any]]]:
        """Reason codes of each row of ``inputs`` (features + anomaly), from the risk model's
        ``attributions`` of those rows (``RiskModel.explain``) and the anomaly's contributors.
        ``attributes``: each row's event attributes, which name the value of a categorical reason."""
        inputs = np.atleast_2d(inputs)
        n = len(inputs)
        rows_attributes = attributes if attributes is not None else [None] * n
        merged = attributions[:, self._keep]
        if self._hour:
            merged = np.column_stack(
                [merged, attributions[:, self._hour[0]] + attributions[:, self._hour[1]]]
            )
        top = np.argsort(-np.abs(merged), axis=1)[:, : self.max_up + self.max_down + 2]
        contributors: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        if self.anomaly is not None and anomaly is not None:
            contributors = self.anomaly.explain(inputs[:, :-1], anomaly)
        # Python lists once per batch of only what the reasons read (each row's top candidates, their
        # weights and values): indexing numpy per reason, or a whole row as a list, costs more than a reason.
        top_rows = top.tolist()
        weight_rows = np.take_along_axis(merged, top, axis=1).tolist()
        value_rows = np.take_along_axis(inputs, self._value_column[top], axis=1).tolist()
        clocks = inputs[:, list(self._hour)].tolist() if self._hour else None
        max_up, max_down, max_anomaly = self.max_up, self.max_down, self.max_anomaly
        makers, names, wording = self._makers, self.names, self._wording
        reasons = []
        for i in range(n):
            up: list[dict[str, Any]] = []
            down: list[dict[str, Any]] = []
            for j, weight, value in zip(top_rows[i], weight_rows[i], value_rows[i], strict=True):
                if abs(weight) < MIN_RISK_WEIGHT:
                    break
                bucket, limit = (up, max_up) if weight > 0 else (down, max_down)
                if len(bucket) >= limit:
                    continue
                words, shown_as, attribute = makers[j]
                if shown_as == _VALUE:
                    bucket.append(words.reason("risk", value, weight))
                elif shown_as == _ATTRIBUTE:
                    display = _attribute_display(rows_attributes[i], attribute)
                    bucket.append(words.reason("risk", value, weight, display))
                elif shown_as == _CLOCK:  # time of day: the clock time, not the two circular inputs
                    assert clocks is not None
                    bucket.append(words.reason("risk", 0.0, weight, time_of_day(*clocks[i])))
                else:  # a category's reason names its value (untrusted text, shortened), not its code
                    shown = (rows_attributes[i] or {}).get(attribute)
                    display = ABSENT if shown is None else repr(str(shown)[:40])
                    bucket.append(words.reason("risk", value, weight, display))
            found = []
            for c, w in contributors[i][:max_anomaly]:
                words, value = wording[names[c]], float(inputs[i, c])
                if w < MIN_ANOMALY_WEIGHT or not words.written_outside(value):
                    continue
                attribute = names[c].removeprefix(ATTRIBUTE_PREFIX)
                display = _attribute_display(rows_attributes[i], attribute) if attribute != names[c] else None
                found.append(words.reason("anomaly", value, w, display))
            reasons.append(up + down + found)
        return reasons

    def rules_fired(self, fired: Sequence[FiredRule], facts: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The fired rules as stored and returned, each with the inputs it tested and their ranges."""
        out = []
        for rule in fired:
            inputs = []
            for name in self._rule_inputs.get(rule.name, ()):
                if name.startswith("attributes."):
                    value = (facts.get("attributes") or {}).get(name.split(".", 1)[1])
                    if value is not None:
                        inputs.append({"feature": name, "value": str(value)[:64], "display": str(value)[:64]})
                    continue
                value = facts.get(name)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    item: dict[str, Any] = {
                        "feature": name,
                        "value": round(float(value), 4),
                        "display": format_value(name, float(value)),
                    }
                    typical = self.typical(name)
                    if typical:
                        item["typical"] = typical
                    inputs.append(item)
            out.append(
                {
                    "name": rule.name,
                    "tier": rule.tier.value,
                    "description": rule.description,
                    "inputs": inputs,
                }
            )
        return out


def _rule_inputs(rules: RuleSet) -> dict[str, tuple[str, ...]]:
    """Per rule, the numeric facts and event attributes its expression reads (its evidence)."""
    found: dict[str, tuple[str, ...]] = {}
    for rule in rules.rules:
        variables = sorted(v for v in rules.variables_of(rule.name) if v not in rules.lists)
        names = [v for v in variables if v not in ("attributes", "entity_id", "event_type")]
        names += [f"attributes.{a}" for a in dict.fromkeys(re.findall(r"attributes\.(\w+)", rule.when))]
        found[rule.name] = tuple(names)
    return found
