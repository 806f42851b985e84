"""Events held as columns: how a data set of a million events fits in memory.

A pydantic ``Event`` with its attribute dict costs ~4 KB of Python objects: the 413k payments of the
card data set took 1.2 GB before a feature was computed. As columns (numpy arrays; text as codes into
a vocabulary) the same events take ~300 bytes each. `EventColumns` is a ``Sequence[Event]``: indexing
builds the one `Event` asked for, iterating builds them one at a time, so code written for a list of
events (offline features, replay, the rules) runs unchanged without ever holding them all.

Attribute columns keep each value's exact type (a float stays the same float, an int the same int, so
features computed from a rebuilt event are the same bits); a column whose values mix types is kept as
Python objects, correct and only as large as before.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from decision_platform.core.events import Event

AttributeValue = bool | int | float | str

FLOAT, INT, BOOL, TEXT, OBJECT = "float", "int", "bool", "text", "object"


@dataclass(frozen=True, eq=False)
class AttributeColumn:
    """One attribute over every event. Missing values: NaN (float), ``present`` False (int, bool),
    code -1 (text), None (object). Stored floats are finite (the event contract), so NaN is free."""

    name: str
    kind: str
    values: np.ndarray
    present: np.ndarray | None = None
    vocabulary: np.ndarray | None = None

    def value(self, i: int) -> AttributeValue | None:
        if self.kind == FLOAT:
            v = self.values[i]
            return None if v != v else float(v)  # NaN is the only value unequal to itself
        if self.kind == TEXT:
            code = self.values[i]
            return None if code < 0 else str(self.vocabulary[code])  # type: ignore[index]
        if self.kind == OBJECT:
            return self.values[i]
        if not self.present[i]:  # type: ignore[index]
            return None
        return bool(self.values[i]) if self.kind == BOOL else int(self.values[i])

    def take(self, indices: np.ndarray) -> AttributeColumn:
        present = self.present[indices] if self.present is not None else None
        return AttributeColumn(self.name, self.kind, self.values[indices], present, self.vocabulary)

    @property
    def nbytes(self) -> int:
        extra = (self.present.nbytes if self.present is not None else 0) + (
            self.vocabulary.nbytes if self.vocabulary is not None else 0
        )
        return int(self.values.nbytes) + extra


class EventColumns(Sequence[Event]):
    """Time-ordered or not, a fixed set of events as arrays; ``events[i]`` is a rebuilt `Event`."""

    def __init__(
        self,
        event_ids: np.ndarray,
        entity_codes: np.ndarray,
        entities: np.ndarray,
        timestamps: np.ndarray,
        type_codes: np.ndarray,
        event_types: np.ndarray,
        amounts: np.ndarray,
        attributes: Sequence[AttributeColumn],
    ) -> None:
        n = len(event_ids)
        for name, column in (
            ("entity_codes", entity_codes),
            ("timestamps", timestamps),
            ("type_codes", type_codes),
            ("amounts", amounts),
            *((f"attribute {a.name!r}", a.values) for a in attributes),
        ):
            if len(column) != n:
                raise ValueError(f"{name} has {len(column)} rows, event_ids {n}")
        self.event_ids = event_ids
        self.entity_codes = entity_codes
        self.entities = entities
        #: Event times (epoch seconds, float64).
        self.timestamps = timestamps
        self.type_codes = type_codes
        self.event_types = event_types
        #: Amounts (float64); NaN where the event has none.
        self.amounts = amounts
        self.attributes = list(attributes)

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> EventColumns:
        builder = EventColumnsBuilder()
        for e in events:
            builder.append(e.event_id, e.entity_id, e.timestamp, e.event_type, e.amount, e.attributes)
        return builder.build()

    def __len__(self) -> int:
        return len(self.event_ids)

    @overload
    def __getitem__(self, index: int) -> Event: ...

    @overload
    def __getitem__(self, index: slice) -> EventColumns: ...

    def __getitem__(self, index: int | slice) -> Event | EventColumns:
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"event index {index} out of range for {n} events")
        return self._event(i % n)

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same events (a list of events included), event by event."""
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return NotImplemented if not isinstance(other, Sequence) else False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: equal by value, not hashable

    def __iter__(self) -> Iterator[Event]:
        for i in range(len(self)):
            yield self._event(i)

    def _event(self, i: int) -> Event:
        amount = self.amounts[i]
        # Validated when they became columns (an Event, or a loader that checks every cell).
        return make_event(
            str(self.event_ids[i]),
            str(self.entities[self.entity_codes[i]]),
            float(self.timestamps[i]),
            str(self.event_types[self.type_codes[i]]),
            None if amount != amount else float(amount),
            self.attributes_at(i),
        )

    def attributes_at(self, i: int) -> dict[str, AttributeValue]:
        out: dict[str, AttributeValue] = {}
        for column in self.attributes:
            value = column.value(i)
            if value is not None:
                out[column.name] = value
        return out

    def take(self, indices: np.ndarray | Sequence[int]) -> EventColumns:
        """The events at integer positions ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return EventColumns(
            self.event_ids[idx],
            self.entity_codes[idx],
            self.entities,
            self.timestamps[idx],
            self.type_codes[idx],
            self.event_types,
            self.amounts[idx],
            [a.take(idx) for a in self.attributes],
        )

    def entity_ids(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Each event's entity id (str array), of ``rows`` (a mask, indices or slice) or of all."""
        return self.entities[self.entity_codes[rows]]

    def entity_keys(self) -> np.ndarray:
        """Each event's entity as an int32 key that sorts and compares as its id does: what grouping by
        entity needs, in 4 bytes an event instead of a fixed-width string's 4 bytes a character."""
        rank = np.empty(len(self.entities), dtype=np.int32)
        rank[np.argsort(self.entities, kind="stable")] = np.arange(len(self.entities), dtype=np.int32)
        return rank[self.entity_codes]

    def amounts_or_zero(self) -> np.ndarray:
        return np.nan_to_num(self.amounts, nan=0.0)

    @property
    def nbytes(self) -> int:
        arrays = (self.event_ids, self.entity_codes, self.entities, self.timestamps, self.type_codes)
        return sum(int(a.nbytes) for a in (*arrays, self.amounts)) + sum(a.nbytes for a in self.attributes)


#: Fields every bulk-built event sets; shared so that a million events do not hold a million sets.
EVENT_FIELDS = frozenset({"event_id", "entity_id", "timestamp", "event_type", "amount", "attributes"})


def make_event(
    event_id: str,
    entity_id: str,
    timestamp: float,
    event_type: str,
    amount: float | None,
    attributes: dict[str, AttributeValue],
) -> Event:
    """Build an `Event` without validation, for bulk paths whose values are already known valid.

    Validation costs more than the rest of loading; callers guarantee the schema holds (and the tests
    re-validate samples), so this is only a faster constructor, never a way around the contract.
    """
    return Event.model_construct(
        EVENT_FIELDS,  # type: ignore[arg-type]  # pydantic only reads it
        event_id=event_id,
        entity_id=entity_id,
        timestamp=timestamp,
        event_type=event_type,
        amount=amount,
        attributes=attributes,
    )


class _Buffer:
    """One attribute's values while loading, typed by the first value seen; typed arrays hold no object
    per value. A value of another type turns the buffer into a list of Python objects."""

    def __init__(self, name: str, kind: str, rows_before: int) -> None:
        self.name, self.kind = name, kind
        self.values: array | list = array(_TYPECODES[kind])
        self.vocabulary: dict[str, int] = {}  # text: value -> code
        self.present = bytearray()  # int, bool: 1 where the event has a value
        self.rows = 0
        self.pad(rows_before)

    def pad(self, rows: int) -> None:
        """Missing values up to ``rows`` rows."""
        missing = rows - self.rows
        if missing <= 0:
            return
        if self.kind == OBJECT:
            self.values.extend([None] * missing)  # type: ignore[arg-type]
        elif self.kind == FLOAT:
            self.values.extend(array("d", [float("nan")]) * missing)  # type: ignore[arg-type]
        elif self.kind == TEXT:
            self.values.extend(array("i", [-1]) * missing)  # type: ignore[arg-type]
        else:
            self.values.extend(array(_TYPECODES[self.kind], [0]) * missing)  # type: ignore[arg-type]
            self.present.extend(bytes(missing))
        self.rows = rows

    def add(self, value: AttributeValue) -> None:
        if self.kind != OBJECT and _kind(value) != self.kind:
            self._to_objects()
        if self.kind == FLOAT:
            self.values.append(value)  # type: ignore[arg-type]
        elif self.kind == TEXT:
            code = self.vocabulary.get(value)  # type: ignore[arg-type]
            if code is None:
                code = self.vocabulary[value] = len(self.vocabulary)  # type: ignore[index]
            self.values.append(code)  # type: ignore[arg-type]
        elif self.kind == OBJECT:
            self.values.append(value)  # type: ignore[arg-type]
        else:
            self.values.append(int(value))  # type: ignore[arg-type]
            self.present.append(1)
        self.rows += 1

    def _to_objects(self) -> None:
        column = self.column()
        self.values = [column.value(i) for i in range(self.rows)]
        self.kind = OBJECT

    def column(self) -> AttributeColumn:
        if self.kind == OBJECT:
            values = np.empty(self.rows, dtype=object)
            values[:] = self.values
            return AttributeColumn(self.name, OBJECT, values)
        if self.kind == FLOAT:
            return AttributeColumn(self.name, FLOAT, np.frombuffer(self.values, dtype=np.float64).copy())
        if self.kind == TEXT:
            vocabulary = np.asarray(list(self.vocabulary), dtype=str)
            codes = np.frombuffer(self.values, dtype=np.int32).copy()
            return AttributeColumn(self.name, TEXT, codes, vocabulary=vocabulary)
        dtype = np.int64 if self.kind == INT else np.int8
        present = np.frombuffer(bytes(self.present), dtype=np.uint8).astype(bool)
        return AttributeColumn(self.name, self.kind, np.frombuffer(self.values, dtype=dtype).copy(), present)


_TYPECODES = {FLOAT: "d", INT: "q", BOOL: "b", TEXT: "i"}


def _kind(value: AttributeValue) -> str:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return FLOAT
    return TEXT


class EventColumnsBuilder:
    """Appends events field by field into typed buffers (a loader never builds the `Event`)."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._entity_codes = array("i")
        self._entities: dict[str, int] = {}
        self._timestamps = array("d")
        self._type_codes = array("i")
        self._types: dict[str, int] = {}
        self._amounts = array("d")
        self._buffers: dict[str, _Buffer] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def append(
        self,
        event_id: str,
        entity_id: str,
        timestamp: float,
        event_type: str,
        amount: float | None,
        attributes: dict[str, AttributeValue],
    ) -> None:
        n = len(self._ids)
        self._ids.append(event_id)
        code = self._entities.get(entity_id)
        if code is None:
            code = self._entities[entity_id] = len(self._entities)
        self._entity_codes.append(code)
        self._timestamps.append(timestamp)
        type_code = self._types.get(event_type)
        if type_code is None:
            type_code = self._types[event_type] = len(self._types)
        self._type_codes.append(type_code)
        self._amounts.append(float("nan") if amount is None else amount)
        for name, value in attributes.items():
            buffer = self._buffers.get(name)
            if buffer is None:
                buffer = self._buffers[name] = _Buffer(name, _kind(value), n)
            else:
                buffer.pad(n)
            buffer.add(value)

    def build(self) -> EventColumns:
        n = len(self._ids)
        for buffer in self._buffers.values():
            buffer.pad(n)
        return EventColumns(
            np.asarray(self._ids, dtype=str) if n else np.empty(0, dtype="<U1"),
            np.frombuffer(self._entity_codes, dtype=np.int32).copy(),
            np.asarray(list(self._entities), dtype=str) if self._entities else np.empty(0, dtype="<U1"),
            np.frombuffer(self._timestamps, dtype=np.float64).copy(),
            np.frombuffer(self._type_codes, dtype=np.int32).copy(),
            np.asarray(list(self._types), dtype=str) if self._types else np.empty(0, dtype="<U1"),
            np.frombuffer(self._amounts, dtype=np.float64).copy(),
            [b.column() for b in self._buffers.values()],
        )
