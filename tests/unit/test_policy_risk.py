"""Out-of-fold risk for the states the policy learns from (TrainConfig.policy_risk_folds)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from decision_platform.config import PROJECT_ROOT
from decision_platform.core.rewards import RewardTable
from decision_platform.data import generate
from decision_platform.features import FeatureSpec
from decision_platform.models.registry import ModelRegistry
from decision_platform.models.risk import RiskConfig
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.training import train as train_module
from decision_platform.training.train import (
    BAYES,
    TrainConfig,
    entity_folds,
    out_of_fold_risk,
    split_in_time,
    train_all,
)

CONFIG_DIR = PROJECT_ROOT / "config"
REWARDS = RewardTable.load(CONFIG_DIR / "rewards.yaml")


def test_entity_folds_deal_each_entity_whole_into_one_fold() -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 40, size=1000)
    rows = keys != 7  # entity 7 has no row in the part being cut
    fold = entity_folds(keys, rows, 3, seed=1)
    for key in np.unique(keys[rows]):
        assert len(np.unique(fold[keys == key])) == 1
    assert set(fold[keys == 7]) == {-1}
    per_fold = np.bincount([fold[keys == key][0] for key in np.unique(keys[rows])], minlength=3)
    assert per_fold.max() - per_fold.min() <= 1


def test_out_of_fold_risk_never_scores_a_row_with_a_model_that_saw_its_entity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each fold's rows are scored by a baseline and a net both fit on rows of other entities only."""
    spec = FeatureSpec.load(CONFIG_DIR / "features.yaml")
    split = split_in_time(generate(n_entities=60, days=3, seed=4), spec, 0.3, "synthetic")
    fits: list[dict[str, Any]] = []

    def fake_baseline(x: np.ndarray, y: np.ndarray, seed: int = 0) -> SimpleNamespace:
        fits.append({"baseline_rows": len(x), "baseline_labels": np.asarray(y).copy()})
        return SimpleNamespace(predict_proba=lambda rows: np.full((len(rows), 2), 0.5))

    def fake_net(split_: Any, rows: np.ndarray, *args: Any, **kwargs: Any) -> SimpleNamespace:
        model = len(fits) - 1  # the net of the fold whose baseline was just fit
        fits[model]["rows"] = rows.copy()
        return SimpleNamespace(predict=lambda x: np.full(len(x), float(model), dtype=np.float32))

    monkeypatch.setattr(train_module, "fit_gradient_boosting", fake_baseline)
    monkeypatch.setattr(train_module, "_fit_risk_net", fake_net)
    anomaly = np.zeros(len(split.labels), dtype=np.float32)
    scores = out_of_fold_risk(split, spec.names, anomaly, TrainConfig(), 3)

    assert len(fits) == 3
    assert np.isnan(scores[split.test]).all()
    assert np.isfinite(scores[split.train]).all()
    keys = split.entity_keys
    for i, fit in enumerate(fits):
        rows = fit["rows"]
        # The baseline (the net's teacher) saw exactly the net's rows, all training rows.
        assert fit["baseline_rows"] == rows.sum()
        assert np.array_equal(fit["baseline_labels"], split.labels[rows])
        assert not (rows & split.test).any()
        scored = split.train & (scores == i)
        assert scored.any()
        # No row it scores, and no row of an entity it scores, was among the rows it was fit on.
        assert not np.isin(keys[rows], keys[scored]).any()
        # It was fit on every other training row.
        assert np.array_equal(rows, split.train & ~np.isin(keys, keys[scored]))


@pytest.mark.parametrize("folds", [2])
def test_out_of_fold_risk_moves_only_the_policy_s_training_states(tmp_path: Path, folds: int) -> None:
    """The served risk model, the baselines and the held-out states are those of the in-sample run;
    only the training rows' risk the policy learns from differs."""

    def run(policy_risk_folds: int) -> Any:
        engine = make_engine(f"sqlite:///{tmp_path / f'registry-{policy_risk_folds}.db'}")
        migrate(engine)
        try:
            return train_all(
                generate(n_entities=120, days=4, seed=3),
                CONFIG_DIR / "features.yaml",
                REWARDS,
                ModelRegistry(Repository(engine), tmp_path / f"models-{policy_risk_folds}"),
                TrainConfig(
                    anomaly_trees=20,
                    risk=RiskConfig(epochs=2, members=1, refit=False),
                    ppo_timesteps=0,
                    clone_epochs=1,
                    policy_risk_folds=policy_risk_folds,
                    seed=3,
                ),
            )
        finally:
            engine.dispose()

    before, after = run(0), run(folds)
    assert TrainConfig().policy_risk_folds in (0, folds)
    assert before.risk_metrics == after.risk_metrics
    assert np.array_equal(before.heldout.risk, after.heldout.risk)
    assert np.array_equal(before.training.risk, after.training.risk)
    values = {c.name: c.per_entity.value for c in before.policies}
    for c in after.policies:
        if c.name != "PPO policy":
            assert c.per_entity.value == values[c.name], c.name
    assert np.array_equal(before.heldout.probabilities[BAYES], after.heldout.probabilities[BAYES])
    assert "policy_risk_s" in after.timings and "policy_risk_s" not in before.timings
    assert set(after.ppo["policy_risk"]) == {"training", "validation"}
    assert "policy_risk" not in before.ppo
