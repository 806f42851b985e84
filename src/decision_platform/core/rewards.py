"""Rewards of outcomes, from config/rewards.yaml (one table shared by serving, simulator and OPE)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from decision_platform.core.actions import ACTION_NAMES


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
    """``reward(outcome, action, amount) = base + per_amount * amount`` for every possible (outcome, action).

    An outcome that lists no reward for an action cannot follow that action (a blocked event cannot be a
    ``success``): :meth:`possible` says so, and :meth:`reward` refuses the pair.
    """

    model_config = ConfigDict(extra="forbid")
    outcomes: dict[str, dict[Literal["allow", "throttle", "block"], RewardCell]]
    simulation: SimulationSettings = SimulationSettings()

    @model_validator(mode="after")
    def _every_action_has_an_outcome(self) -> RewardTable:
        for outcome, cells in self.outcomes.items():
            if not cells:
                raise ValueError(f"rewards.yaml: outcome {outcome!r} can follow no action")
        for action in ACTION_NAMES:
            if not any(action in cells for cells in self.outcomes.values()):
                raise ValueError(f"rewards.yaml: no outcome can follow {action!r}")
        return self

    @classmethod
    def load(cls, path: Path) -> RewardTable:
        return cls.model_validate(yaml.safe_load(Path(path).read_text("utf-8")))

    @property
    def outcome_names(self) -> list[str]:
        return list(self.outcomes)

    def possible(self, outcome: str, action: int) -> bool:
        """Can ``outcome`` follow ``action`` (0 allow, 1 throttle, 2 block)? False for an unknown outcome."""
        return ACTION_NAMES[action] in self.outcomes.get(outcome, {})

    def reward(self, outcome: str, action: int, amount: float | None) -> float:
        """The reward of ``outcome`` after ``action``; KeyError for an unknown outcome, ValueError for an
        outcome that cannot follow the action."""
        cells = self.outcomes[outcome]
        name = ACTION_NAMES[action]
        if name not in cells:
            raise ValueError(
                f"outcome {outcome!r} cannot follow {name!r} (rewards.yaml lists no reward for it)"
            )
        cell = cells[name]
        return cell.base + cell.per_amount * float(amount or 0.0)
