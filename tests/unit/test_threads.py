"""Torch on one intra-op thread while models learn: PPO's and the risk net's small steps slowed ~5-9x
beside other work with two (models/threads.py); the caller's own setting comes back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from stable_baselines3 import PPO

from decision_platform.config import PROJECT_ROOT
from decision_platform.core.rewards import RewardTable
from decision_platform.data import generate
from decision_platform.models.registry import ModelRegistry
from decision_platform.models.risk import RiskConfig, RiskModel
from decision_platform.models.threads import one_torch_thread
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.training.train import TrainConfig, train_all


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_inside_and_the_callers_count_after_even_on_error(two_threads: None) -> None:
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), one_torch_thread():
        raise RuntimeError("a failed fit")
    assert torch.get_num_threads() == 2


def test_train_fits_the_risk_nets_and_ppo_on_one_thread(
    two_threads: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, list[int]] = {"ppo": [], "risk": []}
    learn, fit = PPO.learn, RiskModel._fit

    def counting_learn(self: PPO, *args: object, **kwargs: object) -> PPO:
        seen["ppo"].append(torch.get_num_threads())
        return learn(self, *args, **kwargs)

    def counting_fit(cls: type[RiskModel], *args: object, **kwargs: object) -> RiskModel:
        seen["risk"].append(torch.get_num_threads())
        return fit.__func__(cls, *args, **kwargs)

    monkeypatch.setattr(PPO, "learn", counting_learn)
    monkeypatch.setattr(RiskModel, "_fit", classmethod(counting_fit))
    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    migrate(engine)
    try:
        train_all(
            generate(n_entities=60, days=2, seed=3),
            PROJECT_ROOT / "config" / "features.yaml",
            RewardTable.load(PROJECT_ROOT / "config" / "rewards.yaml"),
            ModelRegistry(Repository(engine), tmp_path / "models"),
            TrainConfig(anomaly_trees=5, risk=RiskConfig(epochs=1), ppo_timesteps=256, ppo_rounds=1, seed=3),
        )
    finally:
        engine.dispose()
    assert seen["ppo"] and set(seen["ppo"]) == {1}
    assert seen["risk"] and set(seen["risk"]) == {1}
    assert torch.get_num_threads() == 2
