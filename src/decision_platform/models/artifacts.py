"""A model artifact on disk: the model's own files plus the feature definitions it was trained on.

Serving loads artifacts (models/bundle.py) without importing any training code; training and retraining
write them with these functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

import numpy as np

from decision_platform.models.anomaly import AnomalyModel
from decision_platform.models.baseline_policy import Policy
from decision_platform.models.policy import PPO_ZIP
from decision_platform.models.ranges import save_population_ranges
from decision_platform.models.risk import RiskModel

#: The feature definitions (a copy of features.yaml) inside every artifact directory.
SPEC_FILE = "features.yaml"


class SavesZip(Protocol):
    """What is saved beside a policy: SB3's PPO (its zip lets retraining warm-start from the champion)."""

    def save(self, path: Path) -> None: ...


def save_artifact(
    model: AnomalyModel | RiskModel,
    directory: Path,
    spec_path: Path,
    range_rows: np.ndarray | None = None,
    range_labels: np.ndarray | None = None,
) -> None:
    model.save(directory)
    shutil.copyfile(spec_path, directory / SPEC_FILE)
    if isinstance(model, RiskModel) and range_rows is not None and range_labels is not None:
        save_population_ranges(directory, range_rows, range_labels, [*model.input_names, "risk"])


def save_policy_artifact(model: Policy, ppo: SavesZip | None, directory: Path, spec_path: Path) -> None:
    """A policy artifact: the served policy, SB3's zip when it is a PPO actor (None for a baseline served
    as the policy: retraining then clones its behaviour before fine-tuning), the feature definitions."""
    model.save(directory)
    if ppo is not None:
        ppo.save(directory / PPO_ZIP)
    shutil.copyfile(spec_path, directory / SPEC_FILE)
