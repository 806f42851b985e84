"""Settings of the learning loop, from config/learning.yaml (validated: a typo fails at load, not later)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from decision_platform.core.rewards import MAX_REWARD
from decision_platform.core.strict_yaml import load_yaml_file

#: The longest outcome horizon: ten years (an infinite one was a timedelta OverflowError deep in retrain).
MAX_HORIZON_HOURS = 10 * 365 * 24


class _Section(BaseModel):
    # No NaN or infinity anywhere: a NaN default reward made every estimate NaN, a NaN margin no gate at all.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class OutcomeSettings(_Section):
    horizon_hours: float = Field(72.0, gt=0, le=MAX_HORIZON_HOURS)
    default_reward: float = Field(0.0, ge=-MAX_REWARD, le=MAX_REWARD)  # as every reward of rewards.yaml
    blocked_label_threshold: float = Field(0.5, gt=0, lt=1)


class TrainingSettings(_Section):
    holdout_fraction: float = Field(0.3, gt=0, lt=1)
    risk_epochs: int = Field(8, ge=1)
    ppo_timesteps: int = Field(20_000, ge=0)
    min_bad_labels: int = Field(20, ge=1)


class GateSettings(_Section):
    estimator: Literal["IPS", "SNIPS", "DR"] = "DR"
    min_decisions: int = Field(300, ge=1)
    min_effective_sample_size: float = Field(50.0, ge=1)
    min_improvement: float = 0.0
    max_good_block_rate: float = Field(0.02, ge=0, le=1)
    max_fraud_allow_rate: float = Field(0.5, ge=0, le=1)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    bootstrap: int = Field(1000, ge=100)


class LearningConfig(_Section):
    outcomes: OutcomeSettings = OutcomeSettings()
    training: TrainingSettings = TrainingSettings()
    gate: GateSettings = GateSettings()

    @classmethod
    def load(cls, path: Path) -> LearningConfig:
        return cls.model_validate(load_yaml_file(Path(path)) or {})
