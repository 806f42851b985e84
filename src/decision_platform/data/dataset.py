"""Labelled event histories: what training, replay and evaluation read.

A `LabelledEvents` is one time-ordered list of events plus, per event, the ground truth (1 = fraud /
bad) and which scenario produced it. Keeping the label next to the event, not inside its attributes,
means a model can never see the answer by accident: replaying `events` into the platform is exactly
what production traffic looks like.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from decision_platform.core.events import Event
from decision_platform.data.columns import EventColumns


@dataclass(frozen=True, eq=False)
class LabelledEvents:
    """Events sorted by timestamp, with a label (int8, 1 = bad) and a scenario name for each.

    ``events`` is held as columns (`EventColumns`, ~300 bytes an event instead of ~4 KB of objects);
    a list of events given is converted. It reads like a list: ``events[i]`` is an `Event`.
    """

    events: EventColumns
    labels: np.ndarray
    scenarios: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.events, EventColumns):
            object.__setattr__(self, "events", EventColumns.from_events(self.events))
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
    def from_unsorted(
        cls, events: EventColumns | Sequence[Event], labels: np.ndarray, scenarios: np.ndarray
    ) -> LabelledEvents:
        """Sort by timestamp (stable: equal times keep their input order) and wrap."""
        columns = events if isinstance(events, EventColumns) else EventColumns.from_events(events)
        order = np.argsort(columns.timestamps, kind="stable")
        return cls(
            events=columns.take(order),
            labels=np.asarray(labels, dtype=np.int8)[order],
            scenarios=np.asarray(scenarios, dtype=str)[order],
        )

    def __len__(self) -> int:
        return len(self.events)

    def timestamps(self) -> np.ndarray:
        """Event times (epoch seconds, float64), in order."""
        return self.events.timestamps

    def entity_ids(self) -> list[str]:
        """The distinct entity ids, sorted."""
        return sorted(str(e) for e in self.events.entities[np.unique(self.events.entity_codes)])

    def by_entity(self) -> dict[str, np.ndarray]:
        """Indices of each entity's events, in time order: one simulator episode per entity."""
        codes = self.events.entity_codes
        order = np.argsort(codes, kind="stable")
        present, starts = np.unique(codes[order], return_index=True)
        groups = np.split(order.astype(np.int64), starts[1:]) if len(order) else []
        # First-seen order, as a dict built by walking the events would have it.
        first = [int(group[0]) for group in groups]
        entities = self.events.entities
        return {
            str(entities[present[k]]): groups[k] for k in sorted(range(len(groups)), key=first.__getitem__)
        }

    def subset(self, indices: np.ndarray | list[int]) -> LabelledEvents:
        """The events at `indices` (integer positions or a boolean mask), keeping time order."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.sort(idx.astype(np.int64, copy=False))
        return LabelledEvents(
            events=self.events.take(idx), labels=self.labels[idx], scenarios=self.scenarios[idx]
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
        codes = self.events.entity_codes
        ts = self.timestamps()
        per_scenario: Counter[str] = Counter(self.scenarios.tolist())
        fraud_per_scenario: Counter[str] = Counter(self.scenarios[self.labels == 1].tolist())
        return {
            "events": n,
            "entities": len(np.unique(codes)),
            "fraud_events": fraud,
            "fraud_rate": fraud / n if n else 0.0,
            "fraud_entities": len(np.unique(codes[self.labels == 1])),
            "start": _iso(ts[0]) if n else None,
            "end": _iso(ts[-1]) if n else None,
            "scenarios": dict(sorted(per_scenario.items())),
            "fraud_by_scenario": dict(sorted(fraud_per_scenario.items())),
        }


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(float(seconds), tz=UTC).isoformat().replace("+00:00", "Z")
