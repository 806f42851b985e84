"""Feature definitions loaded from config/features.yaml, and the feature-vector layout.

The online store (Lua) and the offline computation (Python) both take their windows, limits and vector
layout from this one model, and both finish a row with :meth:`FeatureSpec.assemble`: whatever can be
computed outside the windows (means, event-level fields) is computed once, here, so the two paths
cannot disagree on it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from decision_platform.core.events import Event
from decision_platform.core.strict_yaml import load_yaml_file

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]{1,32}$")]
Aggregation = Literal["count", "sum", "mean", "max", "std"]

DAY_SECONDS = 86400.0
#: Extra life of an entity's keys beyond the largest window, so a quiet entity is not forgotten early.
DEFAULT_TTL_MARGIN_S = 3600.0
#: Marks "no value" in the stored event payload; digests are hex, so it cannot collide.
MISSING = "-"
#: Names the feature holding a categorical attribute's code (``code_<attribute>``).
CATEGORY_PREFIX = "code_"
#: The feature of a numeric event attribute: ``attr_<name>`` (0 when the event has none).
ATTRIBUTE_PREFIX = "attr_"
#: Largest magnitude of an attribute value that windows aggregate: beyond it a value counts as missing, so
#: sums and Welford's squared deviations of up to 100k values (the cap's bound) stay finite (< 1e306).
WINDOW_VALUE_LIMIT = 1e150
#: Largest magnitude of a feature: the models compute in float32, where a larger value (an attribute of
#: 1e300, a sum of attributes of 1e100, a ratio to a tiny value) would be infinite, and training fails on it.
FEATURE_LIMIT = float(np.finfo(np.float32).max)


def _default_windows() -> dict[str, float]:
    return {"1m": 60.0, "5m": 300.0, "1h": 3600.0, "24h": 86400.0}


class DistinctSpec(BaseModel):
    """Distinct values of one event attribute over some windows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attribute: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    windows: list[Name] = Field(min_length=1)


class AttributeWindows(BaseModel):
    """Aggregates of one numeric event attribute over some windows (``<agg>_<attribute>_<window>``).

    Only events whose value is a number (bool as 0/1, finite, within WINDOW_VALUE_LIMIT) contribute:
    ``count`` is how many did, ``mean``/``std`` are over those values, and every aggregate is 0 when no
    event in the window has one. Unlike ``amount``, a missing value is not a 0, since 0 is a real value
    of most attributes (a counter, a balance) and a default would drag means and deviations toward it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    attribute: Name
    aggregations: list[Aggregation] = Field(min_length=1)
    windows: list[Name] = Field(min_length=1)


class EventFields(BaseModel):
    """Features taken from the event itself rather than from its history."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amount: bool = True
    hour_of_day: bool = True
    numeric_attributes: list[Name] = Field(default_factory=list)
    #: Attributes whose values are categories (a device, an email domain, a merchant code): each becomes
    #: ``code_<attribute>``, a stable code of its value (0 when absent) that the risk model embeds.
    categorical_attributes: list[Name] = Field(default_factory=list)


class RatioSpec(BaseModel):
    """A per-entity ratio of two features, e.g. the amount over the entity's 24 h mean amount."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    of: Name
    to: Name

    @property
    def name(self) -> str:
        return f"ratio_{self.of}_to_{self.to}"


class Retention(BaseModel):
    """Bounds on what is kept per entity, so memory stays bounded whatever the traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The upper bound keeps every Lua call cheap and within Lua's stack for unpack().
    max_events_per_entity: int = Field(1000, ge=1, le=100_000)
    #: None: the largest window + 1 h.
    ttl_seconds: float | None = Field(None, gt=0)


class FeatureSpec(BaseModel):
    """The declarative feature definitions; ``FeatureSpec()`` defines what config/features.yaml ships."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    windows: dict[Name, float] = Field(default_factory=_default_windows, min_length=1)
    aggregations: list[Aggregation] = Field(default_factory=lambda: ["count", "sum", "mean", "max"])
    distinct: list[DistinctSpec] = Field(
        default_factory=lambda: [DistinctSpec(attribute="device_id", windows=["1h", "24h"])]
    )
    #: Numeric event attributes aggregated over windows, like ``amount`` but missing values left out.
    attribute_windows: list[AttributeWindows] = Field(default_factory=list)
    seconds_since_last: bool = True
    event_fields: EventFields = Field(default_factory=EventFields)
    #: Ratios of two features (``of`` / ``to``; 0 where ``to`` is 0), computed where every vector is
    #: assembled, so the online store and the offline twin cannot differ.
    ratios: list[RatioSpec] = Field(default_factory=list)
    retention: Retention = Field(default_factory=Retention)
    #: None: the largest window.
    late_tolerance_seconds: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> FeatureSpec:
        for name, seconds in self.windows.items():
            if not math.isfinite(seconds) or seconds <= 0:
                raise ValueError(f"window {name!r} must be a positive number of seconds")
        if len(set(self.aggregations)) != len(self.aggregations):
            raise ValueError("aggregations must not repeat")
        for item in self.distinct:
            unknown = [w for w in item.windows if w not in self.windows]
            if unknown:
                raise ValueError(f"distinct {item.attribute!r}: unknown windows {unknown}")
        self._check_attribute_windows()
        # A later trim removes events older than (latest - largest window): accepting older ones would
        # store an event only to drop it at once.
        if self.late_tolerance_seconds is not None and self.late_tolerance_seconds > self.largest_window:
            raise ValueError("late_tolerance_seconds must not exceed the largest window")
        ttl = self.retention.ttl_seconds
        if ttl is not None and ttl < self.largest_window:
            raise ValueError("retention.ttl_seconds must be at least the largest window")
        if len(set(self.names)) != len(self.names):
            raise ValueError("feature names must be unique")
        base = set(self._base_names)
        for ratio in self.ratios:
            unknown = [n for n in (ratio.of, ratio.to) if n not in base]
            if unknown:
                raise ValueError(f"ratio {ratio.name!r}: unknown features {unknown}")
        return self

    def _check_attribute_windows(self) -> None:
        """Clear errors for attribute_windows mistakes (a repeated name would otherwise only surface as
        "feature names must be unique")."""
        seen: set[str] = set()
        categorical = set(self.event_fields.categorical_attributes)
        for item in self.attribute_windows:
            where = f"attribute_windows {item.attribute!r}"
            if item.attribute in seen:
                raise ValueError(f"{where}: listed twice; put all its aggregations and windows in one entry")
            seen.add(item.attribute)
            if item.attribute in categorical:
                raise ValueError(f"{where}: is a categorical attribute (codes are identities, not amounts)")
            unknown = [w for w in item.windows if w not in self.windows]
            if unknown:
                raise ValueError(f"{where}: unknown windows {unknown}")
            if len(set(item.windows)) != len(item.windows):
                raise ValueError(f"{where}: windows must not repeat")
            if len(set(item.aggregations)) != len(item.aggregations):
                raise ValueError(f"{where}: aggregations must not repeat")

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        """Read and validate a features.yaml file."""
        data = load_yaml_file(Path(path)) or {}
        return cls.model_validate(data)

    # --- derived values

    @property
    def largest_window(self) -> float:
        return max(self.windows.values())

    @property
    def late_tolerance(self) -> float:
        tol = self.late_tolerance_seconds
        return self.largest_window if tol is None else tol

    @property
    def ttl_seconds(self) -> float:
        ttl = self.retention.ttl_seconds
        return self.largest_window + DEFAULT_TTL_MARGIN_S if ttl is None else ttl

    @property
    def window_seconds(self) -> list[float]:
        """Window lengths in config order: the order of every per-window array below."""
        return list(self.windows.values())

    @cached_property
    def distinct_attributes(self) -> list[str]:
        return [d.attribute for d in self.distinct]

    @cached_property
    def window_attributes(self) -> list[str]:
        """The attributes aggregated over windows, in the order of their raw columns and stored values."""
        return [item.attribute for item in self.attribute_windows]

    @property
    def amount_std(self) -> bool:
        return "std" in self.aggregations

    @cached_property
    def names(self) -> list[str]:
        """Feature names in vector order: amount windows, attribute windows, distinct counts, event
        fields, then ratios. Specs without the later additions (attribute windows, std, ratios) keep the
        names and order they always had, so trained artifacts read the same vectors."""
        return [*self._base_names, *(r.name for r in self.ratios)]

    @cached_property
    def _base_names(self) -> list[str]:
        names = [f"{agg}_{w}" for w in self.windows for agg in self.aggregations]
        names += [
            f"{agg}_{item.attribute}_{w}"
            for item in self.attribute_windows
            for w in item.windows
            for agg in item.aggregations
        ]
        names += [f"distinct_{d.attribute}_{w}" for d in self.distinct for w in d.windows]
        if self.seconds_since_last:
            names.append("seconds_since_last")
        if self.event_fields.amount:
            names.append("amount")
        if self.event_fields.hour_of_day:
            names += ["hour_sin", "hour_cos"]
        names += [f"{ATTRIBUTE_PREFIX}{a}" for a in self.event_fields.numeric_attributes]
        names += [f"{CATEGORY_PREFIX}{a}" for a in self.event_fields.categorical_attributes]
        return names

    @property
    def categorical_names(self) -> list[str]:
        """The features that are category codes: identities, not quantities (never scaled or ranged)."""
        return [f"{CATEGORY_PREFIX}{a}" for a in self.event_fields.categorical_attributes]

    @property
    def dim(self) -> int:
        return len(self.names)

    # --- the raw aggregates (windows.lua's reply, offline.py's rows) and how a vector is assembled

    @cached_property
    def raw_layout(self) -> dict[str, int]:
        """Where each block of the raw aggregates starts (windows.lua's reply, offline.py's rows):

        - 0: seconds_since_last;
        - ``amount``: (count, sum, max) per window;
        - ``distinct``: the distinct count of each attribute over every window;
        - ``amount_m2`` (only with std): the amount's sum of squared deviations per window;
        - ``attr_<k>``: per window, (count, sum, max) of the k-th windowed attribute, plus its sum of
          squared deviations when it has std (stride ``attr_<k>_stride``).

        Every window is computed (config order throughout), whatever subset the features use: the
        script stays one loop, and the features pick their columns in :attr:`_plan`.
        """
        nw, layout = len(self.windows), {"amount": 1}
        col = 1 + 3 * nw
        layout["distinct"] = col
        col += len(self.distinct) * nw
        if self.amount_std:
            layout["amount_m2"] = col
            col += nw
        for k, item in enumerate(self.attribute_windows):
            stride = 4 if "std" in item.aggregations else 3
            layout[f"attr_{k}"], layout[f"attr_{k}_stride"] = col, stride
            col += stride * nw
        layout["width"] = col
        return layout

    @property
    def raw_width(self) -> int:
        """Columns of the raw aggregates (see :attr:`raw_layout`)."""
        return self.raw_layout["width"]

    @cached_property
    def _plan(self) -> dict[str, np.ndarray]:
        """How to assemble: the (count, sum) raw columns of each mean, the (count, sum of squared
        deviations) columns of each std, and for every feature its column in
        [raw aggregates | means | stds | event-level values]."""
        nw = len(self.windows)
        window_index = {w: i for i, w in enumerate(self.windows)}
        layout, n_raw = self.raw_layout, self.raw_width
        means: list[tuple[int, int]] = []
        stds: list[tuple[int, int]] = []
        # (feature, column) for means and stds; their derived columns are numbered once all are known.
        gather: list[tuple[str, int]] = []

        def add(agg: str, count_col: int, max_col: int, m2_col: int) -> None:
            if agg == "mean":
                gather.append(("mean", len(means)))
                means.append((count_col, count_col + 1))
            elif agg == "std":
                gather.append(("std", len(stds)))
                stds.append((count_col, m2_col))
            else:
                gather.append(("raw", {"count": count_col, "sum": count_col + 1, "max": max_col}[agg]))

        for i in range(nw):
            for agg in self.aggregations:
                count_col = layout["amount"] + 3 * i
                add(agg, count_col, count_col + 2, layout.get("amount_m2", -1) + i)
        for k, item in enumerate(self.attribute_windows):
            base, stride = layout[f"attr_{k}"], layout[f"attr_{k}_stride"]
            for w in item.windows:
                count_col = base + stride * window_index[w]
                for agg in item.aggregations:
                    add(agg, count_col, count_col + 2, count_col + 3)
        for a, d in enumerate(self.distinct):
            gather += [("raw", layout["distinct"] + a * nw + window_index[w]) for w in d.windows]
        if self.seconds_since_last:
            gather.append(("raw", 0))
        offset = {"raw": 0, "mean": n_raw, "std": n_raw + len(means)}
        columns = [offset[kind] + col for kind, col in gather]
        first_event = n_raw + len(means) + len(stds)
        columns += range(first_event, first_event + len(self._base_names) - len(columns))
        column = {n: i for i, n in enumerate(self._base_names)}
        return {
            "ratio_of": np.asarray([column[r.of] for r in self.ratios], dtype=np.intp),
            "ratio_to": np.asarray([column[r.to] for r in self.ratios], dtype=np.intp),
            "mean_count": np.asarray([c for c, _ in means], dtype=np.intp),
            "mean_sum": np.asarray([s for _, s in means], dtype=np.intp),
            "std_count": np.asarray([c for c, _ in stds], dtype=np.intp),
            "std_m2": np.asarray([m for _, m in stds], dtype=np.intp),
            "gather": np.asarray(columns, dtype=np.intp),
        }

    @property
    def n_event_values(self) -> int:
        fields = self.event_fields
        return (
            int(fields.amount)
            + 2 * int(fields.hour_of_day)
            + len(fields.numeric_attributes)
            + len(fields.categorical_attributes)
        )

    def assemble(self, raw: np.ndarray, event_values: np.ndarray) -> np.ndarray:
        """Feature matrix (n, dim) from raw aggregates (n, raw_width) and event-level values.

        Both the store and offline.py end here, so means, stds and event fields cannot differ between
        them. A std is the population standard deviation sqrt(M2 / n) of the window's values, M2 being the
        sum of squared deviations that both paths accumulate with Welford's update, newest event first:
        no cancellation (unlike sumsq/n - mean^2), never negative, and the same operations in the same
        order in Lua and Python, so the same bits. Every value is within +-FEATURE_LIMIT.
        """
        plan = self._plan
        counts, sums = raw[:, plan["mean_count"]], raw[:, plan["mean_sum"]]
        means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        n, m2 = raw[:, plan["std_count"]], raw[:, plan["std_m2"]]
        stds = np.sqrt(np.divide(m2, n, out=np.zeros_like(m2), where=n > 0))
        vectors = np.concatenate((raw, means, stds, event_values), axis=1)[:, plan["gather"]]
        if self.ratios:
            of, to = vectors[:, plan["ratio_of"]], vectors[:, plan["ratio_to"]]
            ratios = np.divide(of, to, out=np.zeros_like(of), where=to != 0)
            vectors = np.concatenate((vectors, ratios), axis=1)
        # Saturated, not infinite, in float32 (FEATURE_LIMIT); online and offline alike.
        return np.clip(vectors, -FEATURE_LIMIT, FEATURE_LIMIT, out=vectors)

    def event_values(self, timestamps: Sequence[float], events: Sequence[Event] | None) -> np.ndarray:
        """Event-level fields (n, k); with no events (plain reads) amount and attributes are 0.

        Plain Python math, row by row: cheap for the one-row online case, fine for offline batches.
        """
        fields = self.event_fields
        rows: list[list[float]] = []
        for k, ts in enumerate(timestamps):
            event = events[k] if events is not None else None
            row: list[float] = []
            if fields.amount:
                row.append(float(event.amount or 0.0) if event is not None else 0.0)
            if fields.hour_of_day:
                angle = 2.0 * math.pi * (ts % DAY_SECONDS) / DAY_SECONDS
                row += [math.sin(angle), math.cos(angle)]
            for name in fields.numeric_attributes:
                row.append(_numeric(event.attributes.get(name)) if event is not None else 0.0)
            for name in fields.categorical_attributes:
                row.append(category_code(event.attributes.get(name)) if event is not None else 0.0)
            rows.append(row)
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), self.n_event_values)

    def distinct_tokens(self, event: Event) -> list[str]:
        """One short digest per distinct attribute (or MISSING): bounded memory whatever the value size."""
        return [distinct_token(event.attributes.get(a)) for a in self.distinct_attributes]

    def window_values(self, event: Event) -> list[float | None]:
        """The event's value of each windowed attribute, None where it contributes nothing."""
        return [window_value(event.attributes.get(a)) for a in self.window_attributes]


def window_value(value: object) -> float | None:
    """An attribute value as windows aggregate it: a number (bool as 0/1) within WINDOW_VALUE_LIMIT, else
    None (missing, text, non-finite or too large: it adds to no count, sum, max or std)."""
    if not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if abs(number) <= WINDOW_VALUE_LIMIT else None  # False for nan too


def _numeric(value: object) -> float:
    """A numeric attribute as a feature: bool is an int (true -> 1); text, or an int too big, is 0."""
    if not isinstance(value, int | float):
        return 0.0
    try:
        return float(value)
    except OverflowError:
        return 0.0


@lru_cache(maxsize=65536, typed=True)
def category_code(value: bool | int | float | str | None) -> float:
    """A category's code: a 31-bit digest of its value, 0 when absent. Numbers are codes by value (a
    merchant code sent as 5411 or 5411.0 is one category), text by its exact spelling. Exact in float64,
    so it travels in the feature vector and its snapshot like any feature."""
    if value is None:
        return 0.0
    if isinstance(value, bool):
        text = f"bool:{value}"
    elif isinstance(value, int | float):
        text = f"num:{int(value)}" if math.isfinite(value) and float(value).is_integer() else f"num:{value!r}"
    else:
        text = f"str:{value}"
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")
    return float((digest & 0x7FFFFFFF) or 1)


@lru_cache(maxsize=65536, typed=True)
def distinct_token(value: bool | int | float | str | None) -> str:
    """A 64-bit digest of an attribute value, tagged by type so "7" and 7 stay different values."""
    if value is None:
        return MISSING
    text = f"{type(value).__name__}:{value!r}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
