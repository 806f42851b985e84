"""Rewards of outcomes, from config/rewards.yaml (one table shared by serving, simulator and OPE)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

ACTION_NAMES = ("allow", "throttle", "block")


class RewardCell(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: float = 0.0
    per_amount: float = 0.0


class SimulationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    abandon_probability_on_throttle: float = Field(0.1, ge=0, le=1)
    fraud_gives_up_probability_on_throttle: float = Field(0.7, ge=0, le=1)
    reward_scale: float = Field(0.05, gt=0)


class RewardTable(BaseModel):
    """``reward(outcome, action, amount) = base + per_amount * amount`` for every (outcome, action)."""

    model_config = ConfigDict(extra="forbid")
    outcomes: dict[str, dict[str, RewardCell]]
    simulation: SimulationSettings = SimulationSettings()

    @model_validator(mode="after")
    def _every_action_priced(self) -> RewardTable:
        for outcome, cells in self.outcomes.items():
            missing = set(ACTION_NAMES) - set(cells)
            if missing:
                raise ValueError(f"rewards.yaml: outcome {outcome!r} has no reward for {sorted(missing)}")
        return self

    @classmethod
    def load(cls, path: Path) -> RewardTable:
        return cls.model_validate(yaml.safe_load(Path(path).read_text("utf-8")))

    @property
    def outcome_names(self) -> list[str]:
        return list(self.outcomes)

    def reward(self, outcome: str, action: int, amount: float | None) -> float:
        cell = self.outcomes[outcome][ACTION_NAMES[action]]
        return cell.base + cell.per_amount * float(amount or 0.0)
