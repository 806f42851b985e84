"""Normal ranges of every model input, so that a value can be read against what is typical.

"14 events in the last minute" means little to an auditor; "14 events in the last minute; typical: 1 to 2"
says why it matters. Population ranges are percentiles of the *legitimate* training rows, computed when
the risk model is trained and stored beside it (``ranges.json``, hashed with the artifact). Older
artifacts have no such file: explanations then state values without ranges.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RANGES_FILE = "ranges.json"
#: Stored percentiles; "typical" is the 5th..95th of legitimate traffic.
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
_LOW, _MEDIAN, _HIGH = PERCENTILES.index(5), PERCENTILES.index(50), PERCENTILES.index(95)
#: Inputs whose raw value reads nothing (time of day is on a circle): no range is shown for them.
NO_RANGE = frozenset({"hour_sin", "hour_cos"})


@dataclass(frozen=True)
class Typical:
    low: float
    high: float
    scope: str  # "population" (training rows) or "entity" (this entity's recent decisions)

    def as_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "scope": self.scope}


class FeatureRanges:
    """Percentiles of each named input; ``names`` follow the risk model's inputs (+ ``risk``)."""

    def __init__(self, names: list[str], percentiles: np.ndarray, rows: int) -> None:
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.percentiles = np.asarray(percentiles, dtype=np.float64)  # (n_names, len(PERCENTILES))
        self.rows = rows

    @classmethod
    def fit(cls, rows: np.ndarray, names: list[str], where: np.ndarray | None = None) -> FeatureRanges:
        """Percentiles of each column of ``rows`` (of the rows ``where`` is true, if given), one column
        at a time: a training set is never copied whole."""
        rows = np.asarray(rows)
        if where is not None:
            where = np.asarray(where, dtype=bool)
        used = len(rows) if where is None else int(where.sum())
        if rows.ndim != 2 or rows.shape[1] != len(names) or used == 0:
            raise ValueError("ranges: rows must be a non-empty (n, len(names)) matrix")
        percentiles = [
            np.percentile((rows[:, j] if where is None else rows[where, j]).astype(np.float64), PERCENTILES)
            for j in range(rows.shape[1])
        ]
        return cls(names, np.array(percentiles), used)

    @property
    def medians(self) -> np.ndarray:
        return self.percentiles[:, _MEDIAN]

    @property
    def lows(self) -> np.ndarray:
        return self.percentiles[:, _LOW]

    @property
    def highs(self) -> np.ndarray:
        return self.percentiles[:, _HIGH]

    def typical(self, name: str) -> Typical | None:
        i = self.index.get(name)
        if i is None or name in NO_RANGE:
            return None
        return Typical(float(self.lows[i]), float(self.highs[i]), "population")

    def save(self, directory: Path) -> None:
        payload = {
            "percentiles": list(PERCENTILES),
            "rows": self.rows,
            "source": "legitimate training rows",
            "ranges": {n: self.percentiles[i].tolist() for i, n in enumerate(self.names)},
        }
        (Path(directory) / RANGES_FILE).write_text(json.dumps(payload, indent=1), "utf-8")

    @classmethod
    def load(cls, directory: Path | str) -> FeatureRanges | None:
        """The ranges stored with a risk artifact, or None (older artifact, or unreadable)."""
        path = Path(directory) / RANGES_FILE
        if not path.exists():
            return None
        try:
            payload = json.loads(path.read_text("utf-8"))
            if list(payload["percentiles"]) != list(PERCENTILES):
                raise ValueError(f"percentiles {payload['percentiles']}")
            names = list(payload["ranges"])
            return cls(names, np.asarray([payload["ranges"][n] for n in names]), int(payload["rows"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            return None


def save_population_ranges(directory: Path, rows: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    """Write ``ranges.json`` from training rows: legitimate ones only (label 0), all if there are too few."""
    good = np.asarray(labels) == 0
    FeatureRanges.fit(rows, names, good if good.sum() >= 20 else None).save(directory)


def entity_typical(history: np.ndarray) -> Typical | None:
    """This entity's own range of one input over its recent decisions (5th..95th), when there are enough."""
    values = np.asarray(history, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 5:
        return None
    low, high = np.percentile(values, [5, 95])
    return Typical(float(low), float(high), "entity")


def ranges_of_model(model_dir: Path, record: Mapping[str, Any] | None) -> FeatureRanges | None:
    """The ranges stored with a registered risk model (``record`` from the registry), if any. The
    artifact's hash was checked when the model itself was loaded; this reads the same directory."""
    if record is None:
        return None
    return FeatureRanges.load(Path(model_dir) / record["artifact_path"])
