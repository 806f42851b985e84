"""The feature definitions computed in Python, for training: the same numbers the online store returns.

Events are processed in the order given (arrival order), exactly as the stream worker feeds them to
windows.lua: duplicates are not counted twice, too-late events get features but are not stored, the
same trims apply. So a model trained on these rows sees what it will see at serving time.

Per entity, events are kept sorted by (event time, event_id) in parallel lists; windows are found by
bisection and aggregated with C-level builtins (sum, max, set) over slices, nested windows extending the
previous one, so the cost per event is one pass over the largest window.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

import numpy as np

from decision_platform.core.events import Event
from decision_platform.features.spec import MISSING, FeatureSpec, distinct_token

STORED, DUPLICATE, LATE = 0, 1, 2


class _Entity:
    """One entity's stored events, sorted by (ts, event_id) like the Redis sorted set."""

    __slots__ = ("amounts", "ids", "known", "tokens", "ts")

    def __init__(self, n_distinct: int) -> None:
        self.ts: list[float] = []
        self.ids: list[str] = []
        self.amounts: list[float] = []
        self.tokens: list[list[str]] = [[] for _ in range(n_distinct)]
        self.known: set[str] = set()

    def position(self, ts: float, event_id: str) -> int:
        pos = bisect_right(self.ts, ts)
        # Equal times are ordered by event_id (ids are ASCII, so str order is Redis' byte order).
        while pos > 0 and self.ts[pos - 1] == ts and self.ids[pos - 1] > event_id:
            pos -= 1
        return pos

    def insert(self, pos: int, ts: float, event_id: str, amount: float, tokens: list[str]) -> None:
        self.ts.insert(pos, ts)
        self.ids.insert(pos, event_id)
        self.amounts.insert(pos, amount)
        for column, token in zip(self.tokens, tokens, strict=True):
            column.insert(pos, token)
        self.known.add(event_id)

    def drop_oldest(self, k: int) -> None:
        if k <= 0:
            return
        self.known.difference_update(self.ids[:k])
        for column in (self.ts, self.ids, self.amounts, *self.tokens):
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
        # Per window, smallest first (each extends the previous one's slice): its length, the raw column
        # of its count (sum and max follow), and the raw column of each attribute's distinct count.
        self._plan = [
            (seconds, 1 + 3 * i, [1 + 3 * nw + a * nw + i for a in range(self._nd)])
            for i, seconds in sorted(enumerate(windows), key=lambda item: item[1])
        ]
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
            entity = self._entities[event.entity_id] = _Entity(self._nd)
        tokens = [distinct_token(event.attributes.get(a)) for a in self._attributes]
        flag = self._store(entity, t, eid, float(event.amount or 0.0), tokens)
        return self._raw(entity, t, "" if flag == LATE else eid), flag

    def read(self, entity_id: str, at: float) -> list[float]:
        """Raw aggregates at time ``at`` without an event (what FeatureStore.read computes)."""
        return self._raw(self._entities.get(entity_id) or _Entity(self._nd), at, "")

    def _store(self, entity: _Entity, t: float, eid: str, amount: float, tokens: list[str]) -> int:
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
        entity.insert(pos, t, eid, amount, tokens)
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
        return raw


def compute_features_with_flags(
    events: Sequence[Event], spec: FeatureSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feature matrix (n, dim) plus boolean ``duplicate`` and ``late`` masks, events in arrival order."""
    windows = OfflineWindows(spec)
    raws: list[list[float]] = []
    flags = np.empty(len(events), dtype=np.int8)
    for k, event in enumerate(events):
        raw, flags[k] = windows.update(event)
        raws.append(raw)
    raw_matrix = np.asarray(raws, dtype=np.float64).reshape(len(events), spec.raw_width)
    timestamps = [e.timestamp for e in events]
    features = spec.assemble(raw_matrix, spec.event_values(timestamps, events))
    return features, flags == DUPLICATE, flags == LATE


def compute_features(events: Sequence[Event], spec: FeatureSpec) -> np.ndarray:
    """Feature matrix (n, dim), float64, spec order: row k is what the store returned for events[k]."""
    return compute_features_with_flags(events, spec)[0]
