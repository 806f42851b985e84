"""Feature scaling of the policy's state.

Counts and amounts are heavy-tailed (a card-testing burst has 100x the usual count), so every value is
first squashed with a signed log, then standardised with statistics of the training rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, ignore: Sequence[int] = ()) -> Standardizer:
        """Statistics of the training rows; ``ignore``d columns always scale to 0 (an infinite std)."""
        x = np.atleast_2d(x)
        # Column by column, in float64: no copy of the whole training set, float32 rows summed exactly.
        columns = (signed_log(x[:, j].astype(np.float64)) for j in range(x.shape[1]))
        moments = np.array([(z.mean(), z.std()) for z in columns]).reshape(-1, 2)
        mean, std = moments[:, 0].copy(), moments[:, 1].copy()
        std = np.where(std < 1e-9, 1.0, std)
        std[list(ignore)] = np.inf
        mean[list(ignore)] = 0.0
        return cls(mean=mean, std=std)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((signed_log(np.asarray(x, dtype=np.float64)) - self.mean) / self.std).astype(np.float32)
