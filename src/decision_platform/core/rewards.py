"""Rewards of outcomes, from config/rewards.yaml (one table shared by serving, simulator and OPE)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from decision_platform.core.actions import ACTION_NAMES
from decision_platform.core.strict_yaml import load_yaml_file

#: Largest reward (or reward per currency unit) a cell may name: beyond it is a typo, and with an amount of up
#: to 1e12 a larger one could make a reward infinite (which POST /outcome cannot answer in JSON).
MAX_REWARD = 1e9


#: The outcomes the learning loop names itself, with the actions each must be priced after: the training
#: simulator turns a label and an action into one of them, the Bayes policy and the policy comparison price
#: them (:meth:`RewardTable.expected_step_values`), retrain imputes a blocked event's as fraud or
#: false_positive. Serving takes any vocabulary; training needs these.
LEARNING_OUTCOMES: dict[str, tuple[str, ...]] = {
    "success": ("allow", "throttle"),
    "abandoned": ("throttle",),
    "false_positive": ("block",),
    "fraud": ("throttle", "block"),
    "chargeback": ("allow", "throttle"),
}


class RewardCell(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: float = Field(0.0, ge=-MAX_REWARD, le=MAX_REWARD, allow_inf_nan=False)
    per_amount: float = Field(0.0, ge=-MAX_REWARD, le=MAX_REWARD, allow_inf_nan=False)


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
        return cls.model_validate(load_yaml_file(Path(path)))

    @classmethod
    def load_for_learning(cls, path: Path) -> RewardTable:
        """:meth:`load`, and a ValueError naming every outcome and action of :data:`LEARNING_OUTCOMES` the
        table lacks (``train`` and ``retrain`` said it with a KeyError traceback from deep inside)."""
        table = cls.load(path)
        missing = [
            f"{outcome}.{action}"
            for outcome, actions in LEARNING_OUTCOMES.items()
            for action in actions
            if action not in table.outcomes.get(outcome, {})
        ]
        if missing:
            raise ValueError(
                f"training prices {', '.join(missing)} (outcome.action: the simulator's outcomes), "
                "which it lacks"
            )
        return table

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

    def expected_step_values(self) -> tuple[list[float], list[float], list[float], list[float]]:
        """Per action (allow, throttle, block), the expected reward of one step as ``base + per_amount *
        amount``, for a good event and for a bad one: ``(good_base, good_per_amount, bad_base,
        bad_per_amount)``.

        The expectation is over the simulator's chance (the ``simulation`` settings), exactly as
        ``training/simulator.py`` turns a label and an action into an outcome: a good event allowed is a
        ``success``, stepped up it is ``abandoned`` with the abandon probability (else a ``success``),
        blocked a ``false_positive``; a bad event allowed is a ``chargeback``, stepped up the fraudster
        gives up (``fraud``) with the give-up probability (else a ``chargeback``), blocked a ``fraud``.
        Both the Bayes-minimum-risk policy and the exact policy comparison read these numbers, so they
        cannot price an action differently from the simulator.
        """
        sim = self.simulation
        abandon, give_up = sim.abandon_probability_on_throttle, sim.fraud_gives_up_probability_on_throttle

        def cell(outcome: str, action: str) -> tuple[float, float]:
            c = self.outcomes[outcome][action]  # type: ignore[index]
            return c.base, c.per_amount

        def mix(p: float, a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
            return p * a[0] + (1 - p) * b[0], p * a[1] + (1 - p) * b[1]

        good = [
            cell("success", "allow"),
            mix(abandon, cell("abandoned", "throttle"), cell("success", "throttle")),
            cell("false_positive", "block"),
        ]
        bad = [
            cell("chargeback", "allow"),
            mix(give_up, cell("fraud", "throttle"), cell("chargeback", "throttle")),
            cell("fraud", "block"),
        ]
        return [g[0] for g in good], [g[1] for g in good], [b[0] for b in bad], [b[1] for b in bad]
