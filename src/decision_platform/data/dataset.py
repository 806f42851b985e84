"""Labelled event histories: what training, replay and evaluation read.

A `LabelledEvents` is one time-ordered list of events plus, per event, the ground truth (1 = fraud /
bad) and which scenario produced it. Keeping the label next to the event, not inside its attributes,
means a model can never see the answer by accident: replaying `events` into the platform is exactly
what production traffic looks like.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from decision_platform.core.events import Event

#: Fields every bulk-built event sets; shared so that a million events do not hold a million sets.
EVENT_FIELDS = frozenset({"event_id", "entity_id", "timestamp", "event_type", "amount", "attributes"})


def make_event(
    event_id: str,
    entity_id: str,
    timestamp: float,
    event_type: str,
    amount: float | None,
    attributes: dict[str, bool | int | float | str],
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


@dataclass(frozen=True, eq=False)
class LabelledEvents:
    """Events sorted by timestamp, with a label (int8, 1 = bad) and a scenario name for each."""

    events: list[Event]
    labels: np.ndarray
    scenarios: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.events)
        if self.labels.shape != (n,) or self.scenarios.shape != (n,):
            raise ValueError(
                f"labels {self.labels.shape} and scenarios {self.scenarios.shape} must both have "
                f"shape ({n},), one per event"
            )
        if self.labels.dtype != np.int8:
            raise ValueError(f"labels must be int8, got {self.labels.dtype}")
        if n > 1 and np.any(np.diff(self.timestamps()) < 0):
            raise ValueError("events must be sorted by timestamp")

    @classmethod
    def from_unsorted(cls, events: list[Event], labels: np.ndarray, scenarios: np.ndarray) -> LabelledEvents:
        """Sort by timestamp (stable: equal times keep their input order) and wrap."""
        ts = np.fromiter((e.timestamp for e in events), dtype=np.float64, count=len(events))
        order = np.argsort(ts, kind="stable")
        return cls(
            events=[events[i] for i in order],
            labels=np.asarray(labels, dtype=np.int8)[order],
            scenarios=np.asarray(scenarios, dtype=str)[order],
        )

    def __len__(self) -> int:
        return len(self.events)

    def timestamps(self) -> np.ndarray:
        """Event times (epoch seconds, float64), in order."""
        return np.fromiter((e.timestamp for e in self.events), dtype=np.float64, count=len(self.events))

    def entity_ids(self) -> list[str]:
        """The distinct entity ids, sorted."""
        return sorted({e.entity_id for e in self.events})

    def by_entity(self) -> dict[str, np.ndarray]:
        """Indices of each entity's events, in time order: one simulator episode per entity."""
        groups: dict[str, list[int]] = {}
        for i, event in enumerate(self.events):
            groups.setdefault(event.entity_id, []).append(i)
        return {entity: np.asarray(idx, dtype=np.int64) for entity, idx in groups.items()}

    def subset(self, indices: np.ndarray | list[int]) -> LabelledEvents:
        """The events at `indices` (integer positions or a boolean mask), keeping time order."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.sort(idx.astype(np.int64, copy=False))
        return LabelledEvents(
            events=[self.events[i] for i in idx], labels=self.labels[idx], scenarios=self.scenarios[idx]
        )

    def time_split(self, fraction: float) -> tuple[LabelledEvents, LabelledEvents]:
        """Split at one timestamp: about `fraction` of the events before it, the rest held out.

        Every event of the first part is strictly earlier than every event of the second (events at the
        cut time all go to the second part), so a model trained on the first part has seen nothing from
        the period it is evaluated on. Entities may appear in both parts, as they do in production.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction}")
        ts = self.timestamps()
        if len(ts) == 0:
            return self, self
        cut = ts[min(round(fraction * len(ts)), len(ts) - 1)]
        k = int(np.searchsorted(ts, cut, side="left"))  # first event at the cut time
        return self.subset(np.arange(k)), self.subset(np.arange(k, len(ts)))

    def summary(self) -> dict[str, Any]:
        """Counts a person checks before training: size, time span, fraud rate, scenario mix."""
        n = len(self.events)
        fraud = int(self.labels.sum()) if n else 0
        fraud_entities = {e.entity_id for e, y in zip(self.events, self.labels, strict=True) if y}
        ts = self.timestamps()
        per_scenario: Counter[str] = Counter(self.scenarios.tolist())
        fraud_per_scenario: Counter[str] = Counter(self.scenarios[self.labels == 1].tolist())
        return {
            "events": n,
            "entities": len({e.entity_id for e in self.events}),
            "fraud_events": fraud,
            "fraud_rate": fraud / n if n else 0.0,
            "fraud_entities": len(fraud_entities),
            "start": _iso(ts[0]) if n else None,
            "end": _iso(ts[-1]) if n else None,
            "scenarios": dict(sorted(per_scenario.items())),
            "fraud_by_scenario": dict(sorted(fraud_per_scenario.items())),
        }


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(float(seconds), tz=UTC).isoformat().replace("+00:00", "Z")
