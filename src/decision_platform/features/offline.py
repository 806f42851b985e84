"""The feature definitions computed in Python, for training: the same numbers the online store returns.

Events are processed in the order given (arrival order), exactly as the stream worker feeds them to
windows.lua: duplicates are not counted twice, too-late events get features but are not stored, the
same trims apply. So a model trained on these rows sees what it will see at serving time.

Per entity, events are kept sorted by (event time, event_id) in parallel lists; windows are found by
bisection and aggregated with C-level builtins (sum, max, set) over slices, nested windows extending the
previous one, so the cost per event is one pass over the largest window. A std needs Welford's update in
the Lua order (newest first), a Python loop: paid only by the values whose std is asked for.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence

import numpy as np

from decision_platform.core.events import Event
from decision_platform.features.spec import MISSING, FeatureSpec, distinct_token

STORED, DUPLICATE, LATE = 0, 1, 2


class _Entity:
    """One entity's stored events, sorted by (ts, event_id) like the Redis sorted set."""

    __slots__ = ("amounts", "ids", "known", "tokens", "ts", "values")

    def __init__(self, n_distinct: int, n_values: int) -> None:
        self.ts: list[float] = []
        self.ids: list[str] = []
        self.amounts: list[float] = []
        self.tokens: list[list[str]] = [[] for _ in range(n_distinct)]
        #: Per windowed attribute, its value per event (None: the event contributes nothing).
        self.values: list[list[float | None]] = [[] for _ in range(n_values)]
        self.known: set[str] = set()

    def position(self, ts: float, event_id: str) -> int:
        pos = bisect_right(self.ts, ts)
        # Equal times are ordered by event_id (ids are ASCII, so str order is Redis' byte order).
        while pos > 0 and self.ts[pos - 1] == ts and self.ids[pos - 1] > event_id:
            pos -= 1
        return pos

    def insert(
        self, pos: int, ts: float, event_id: str, amount: float, tokens: list[str], values: list[float | None]
    ) -> None:
        self.ts.insert(pos, ts)
        self.ids.insert(pos, event_id)
        self.amounts.insert(pos, amount)
        for column, token in zip(self.tokens, tokens, strict=True):
            column.insert(pos, token)
        if values:
            for series, value in zip(self.values, values, strict=True):
                series.insert(pos, value)
        self.known.add(event_id)

    def drop_oldest(self, k: int) -> None:
        if k <= 0:
            return
        self.known.difference_update(self.ids[:k])
        for column in (self.ts, self.ids, self.amounts, *self.tokens, *self.values):
            del column[:k]


class OfflineWindows:
    """The state windows.lua keeps in Redis, in memory; feed events in arrival order.

    ``update`` and ``read`` return raw aggregates (the layout of the Lua reply, FeatureSpec.raw_width);
    FeatureSpec.assemble turns them into feature vectors.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._entities: dict[str, _Entity] = {}
        windows = spec.window_seconds
        self._nd = len(spec.distinct)
        nw = len(windows)
        layout = spec.raw_layout
        self._nv = len(spec.attribute_windows)
        #: Per windowed attribute, whether its M2 (for std) is computed.
        self._value_std = [layout[f"attr_{b}_stride"] == 4 for b in range(self._nv)]
        order = sorted(enumerate(windows), key=lambda item: item[1])
        # Per window, smallest first (each extends the previous one's slice): its length, the raw column
        # of its count (sum and max follow), and the raw column of each attribute's distinct count.
        self._plan = [
            (seconds, 1 + 3 * i, [layout["distinct"] + a * nw + i for a in range(self._nd)])
            for i, seconds in order
        ]
        #: Same order, for the aggregates that need more than builtins (None: the spec has none): the raw
        #: column of the amount's M2 (-1: no std), and of each windowed attribute's count (sum, max, M2
        #: follow).
        self._extra_plan = (
            [
                (
                    layout["amount_m2"] + i if spec.amount_std else -1,
                    [layout[f"attr_{b}"] + layout[f"attr_{b}_stride"] * i for b in range(self._nv)],
                )
                for i, _ in order
            ]
            if spec.amount_std or self._nv
            else None
        )
        self._raw_width = spec.raw_width
        self._largest = spec.largest_window
        self._tolerance = spec.late_tolerance
        self._cap = spec.retention.max_events_per_entity
        self._attributes = spec.distinct_attributes

    def update(self, event: Event) -> tuple[list[float], int]:
        """Raw aggregates at the event's time and its flag (STORED, DUPLICATE or LATE)."""
        t, eid = event.timestamp, event.event_id
        entity = self._entities.get(event.entity_id)
        if entity is None:
            entity = self._entities[event.entity_id] = _Entity(self._nd, self._nv)
        tokens = [distinct_token(event.attributes.get(a)) for a in self._attributes]
        values = self.spec.window_values(event) if self._nv else []
        flag = self._store(entity, t, eid, float(event.amount or 0.0), tokens, values)
        return self._raw(entity, t, "" if flag == LATE else eid), flag

    def read(self, entity_id: str, at: float) -> list[float]:
        """Raw aggregates at time ``at`` without an event (what FeatureStore.read computes)."""
        return self._raw(self._entities.get(entity_id) or _Entity(self._nd, self._nv), at, "")

    def _store(
        self,
        entity: _Entity,
        t: float,
        eid: str,
        amount: float,
        tokens: list[str],
        values: list[float | None],
    ) -> int:
        if eid in entity.known:
            return DUPLICATE
        newest = t
        if entity.ts:
            latest = entity.ts[-1]
            if t < latest - self._tolerance:
                return LATE
            newest = max(newest, latest)
        pos = entity.position(t, eid)
        n = len(entity.ts) + 1
        if n > self._cap and pos < n - self._cap:
            return LATE  # the oldest of a full entity: the cap would evict it at once
        entity.insert(pos, t, eid, amount, tokens, values)
        entity.drop_oldest(bisect_left(entity.ts, newest - self._largest))
        entity.drop_oldest(len(entity.ts) - self._cap)
        return STORED

    def _raw(self, entity: _Entity, t: float, self_id: str) -> list[float]:
        raw = [0.0] * self._raw_width
        ts = entity.ts
        hi = bisect_right(ts, t)
        # Latest other event at or before t, within the largest window.
        j = hi - 1
        if j >= 0 and entity.ids[j] == self_id:
            j -= 1
        raw[0] = t - ts[j] if j >= 0 and ts[j] > t - self._largest else self._largest
        if hi == 0:
            return raw
        amounts, tokens = entity.amounts, entity.tokens
        seen: list[set[str]] = [set() for _ in tokens]
        distinct = [0] * len(tokens)
        prev, total, top = hi, 0.0, 0.0
        for seconds, col, distinct_cols in self._plan:
            lo = bisect_right(ts, t - seconds, 0, prev)
            if lo < prev:
                chunk = amounts[lo:prev]
                # Newest first from the running total: Lua's addition order, so sums agree bit for bit.
                total = sum(reversed(chunk), total)
                top = max(top, max(chunk))
                for a, column in enumerate(tokens):
                    values = seen[a]
                    values.update(column[lo:prev])
                    distinct[a] = len(values) - (MISSING in values)
                prev = lo
            raw[col] = hi - lo
            raw[col + 1] = total
            raw[col + 2] = top
            for a, dcol in enumerate(distinct_cols):
                raw[dcol] = distinct[a]
        if self._extra_plan is not None:
            self._raw_extra(entity, raw, t, hi)
        return raw

    def _raw_extra(self, entity: _Entity, raw: list[float], t: float, hi: int) -> None:
        """The amount's M2 and the windowed attributes' aggregates, window by window as in _raw (a pass
        of its own, so specs without them pay nothing)."""
        assert self._extra_plan is not None
        ts, prev = entity.ts, hi
        amount_m2 = [0, 0.0, 0.0]  # Welford (n, mean, M2) of the amount
        # Per windowed attribute: count, sum, max, and Welford (n, mean, M2).
        state: list[list[float]] = [[0, 0.0, 0.0, 0, 0.0, 0.0] for _ in range(self._nv)]
        for (seconds, _, _), (m2_col, value_cols) in zip(self._plan, self._extra_plan, strict=True):
            lo = bisect_right(ts, t - seconds, 0, prev)
            if lo < prev:
                if m2_col >= 0:
                    _welford(amount_m2, reversed(entity.amounts[lo:prev]))
                for b, series in enumerate(entity.values):
                    present = [v for v in reversed(series[lo:prev]) if v is not None]
                    if present:
                        self._extend(state[b], present, self._value_std[b])
                prev = lo
            if m2_col >= 0:
                raw[m2_col] = amount_m2[2]
            for b, vcol in enumerate(value_cols):
                count, value_sum, value_max, _, _, m2 = state[b]
                raw[vcol : vcol + 3] = count, value_sum, value_max
                if self._value_std[b]:
                    raw[vcol + 3] = m2

    @staticmethod
    def _extend(state: list[float], present: list[float], with_std: bool) -> None:
        """Add one window's extension (values newest first) to an attribute's running aggregates, as
        windows.lua does: sum in that order, on ties the newer value is the max, Welford for M2."""
        top = max(present)
        state[2] = top if state[0] == 0 or top > state[2] else state[2]
        state[0] += len(present)
        state[1] = sum(present, state[1])
        if with_std:
            welford = state[3:6]
            _welford(welford, present)
            state[3:6] = welford


def _welford(state: list[float], values: Iterable[float]) -> None:
    """Welford's update of (n, mean, M2) in place, in windows.lua's exact operations and order."""
    n, mean, m2 = state
    for x in values:
        n += 1
        d = x - mean
        mean = mean + d / n
        m2 = m2 + d * (x - mean)
    state[0], state[1], state[2] = n, mean, m2


#: Events whose raw aggregates are held at once: memory stays bounded whatever the data set's size.
CHUNK = 16384


def compute_features_with_flags(
    events: Sequence[Event], spec: FeatureSpec, dtype: type[np.floating] = np.float64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feature matrix (n, dim) plus boolean ``duplicate`` and ``late`` masks, events in arrival order.

    A chunk of events at a time: only the (n, dim) result grows with the data, so a million events
    (held as columns, `data.EventColumns`) never exist as a million Python objects at once. Features are
    computed in float64 (the store's numbers, bit for bit); ``dtype`` is how the result is kept
    (training keeps float32: half the memory, and what the models compute in anyway).
    """
    n = len(events)
    windows = OfflineWindows(spec)
    features = np.empty((n, spec.dim), dtype=dtype)
    flags = np.empty(n, dtype=np.int8)
    raw = np.empty((min(n, CHUNK), spec.raw_width), dtype=np.float64)
    for start in range(0, n, CHUNK):
        batch = list(events[start : start + CHUNK])
        for k, event in enumerate(batch):
            raw[k], flags[start + k] = windows.update(event)
        values = spec.event_values([e.timestamp for e in batch], batch)
        features[start : start + len(batch)] = spec.assemble(raw[: len(batch)], values)
    return features, flags == DUPLICATE, flags == LATE


def compute_features(
    events: Sequence[Event], spec: FeatureSpec, dtype: type[np.floating] = np.float64
) -> np.ndarray:
    """Feature matrix (n, dim), spec order: row k is what the store returned for events[k]."""
    return compute_features_with_flags(events, spec, dtype)[0]
