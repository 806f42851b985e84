"""Training the three models from a labelled data set, with a time-ordered split.

Features are computed by ``features.offline`` from the same definitions (features.yaml) the Lua script
uses online, over the whole stream in time order (so held-out rows see their real history); models are
fit on the earlier part and judged on the later part of time only.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv

from decision_platform.data import LabelledEvents
from decision_platform.explain.ranges import save_population_ranges
from decision_platform.features import FeatureSpec, compute_features
from decision_platform.learning.rewards import RewardTable
from decision_platform.models.anomaly import AnomalyModel
from decision_platform.models.policy import PPO_ZIP, PolicyModel, imitate
from decision_platform.models.registry import ModelRegistry
from decision_platform.models.risk import RiskModel
from decision_platform.models.simulator import (
    EntityHistory,
    FraudSimulatorEnv,
    PolicyReport,
    evaluate_policy,
    group_histories,
)

SPEC_FILE = "features.yaml"


@dataclass(frozen=True)
class TrainConfig:
    test_fraction: float = 0.3
    anomaly_trees: int = 100
    risk_epochs: int = 12
    ppo_timesteps: int = 60_000
    seed: int = 0


@dataclass
class TrainReport:
    versions: dict[str, str]
    risk_metrics: dict[str, float]
    policies: list[PolicyReport]
    timings: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


class _PPOProgress(BaseCallback):
    def __init__(self, advance: Callable[[int], None]) -> None:
        super().__init__()
        self._advance = advance

    def _on_step(self) -> bool:
        self._advance(self.training_env.num_envs)
        return True


def threshold_probabilities(
    risk_index: int, t_throttle: float, t_block: float
) -> Callable[[np.ndarray], np.ndarray]:
    """A fixed two-threshold policy on the risk score (column ``risk_index`` of the state)."""

    def probabilities(states: np.ndarray) -> np.ndarray:
        risk = states[:, risk_index]
        action = np.where(risk >= t_block, 2, np.where(risk >= t_throttle, 1, 0))
        return np.eye(3)[action]

    return probabilities


def best_threshold_policy(
    histories: list[EntityHistory], rewards: RewardTable, risk_index: int, seed: int
) -> tuple[float, float]:
    """Grid-search the throttle / block thresholds that maximise reward on training histories."""
    grid = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.01]
    best, best_value = (1.01, 1.01), -np.inf
    for t_throttle in grid:
        for t_block in grid:
            if t_block < t_throttle:
                continue
            report = evaluate_policy(
                "threshold",
                threshold_probabilities(risk_index, t_throttle, t_block),
                histories,
                rewards,
                seed=seed,
                n_bootstrap=1,
            )
            if report.reward_per_decision > best_value:
                best, best_value = (t_throttle, t_block), report.reward_per_decision
    return best


def train_all(
    data: LabelledEvents,
    spec_path: Path,
    rewards: RewardTable,
    registry: ModelRegistry,
    config: TrainConfig = TrainConfig(),
    console: Console | None = None,
    promote: bool = True,
    source: str = "synthetic",
) -> TrainReport:
    """Fit anomaly, risk and policy; register them (as champions when ``promote``); report."""
    console = console or Console()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    timings: dict[str, float] = {}
    spec = FeatureSpec.load(spec_path)
    started = time.perf_counter()

    events = data.events
    with console.status("computing features (offline, same definitions as the online store)"):
        x = compute_features(events, spec)
    timings["features_s"] = time.perf_counter() - started
    y = np.asarray(data.labels, dtype=np.int8)
    amounts = np.asarray([e.amount or 0.0 for e in events])
    timestamps = np.asarray([e.timestamp for e in events])
    entity_ids = np.asarray([e.entity_id for e in events])
    cut_time = float(np.quantile(timestamps, 1.0 - config.test_fraction))
    train = timestamps < cut_time
    test = ~train
    window = {
        "source": source,
        "events": len(events),
        "train_until": cut_time,
        "start": float(timestamps.min()),
        "end": float(timestamps.max()),
        "train_rows": int(train.sum()),
        "test_rows": int(test.sum()),
    }

    with _progress(console) as progress:
        # --- anomaly
        t0 = time.perf_counter()
        task = progress.add_task("anomaly: isolation forest", total=1)
        anomaly_model = AnomalyModel.fit(
            x[train], spec.names, n_estimators=config.anomaly_trees, seed=config.seed
        )
        anomaly = anomaly_model.score(x)
        progress.advance(task)
        timings["anomaly_s"] = time.perf_counter() - t0

        # --- risk
        t0 = time.perf_counter()
        task = progress.add_task("risk: pytorch classifier", total=config.risk_epochs)
        risk_inputs = RiskModel.inputs(x, anomaly)
        risk_model = RiskModel.fit(
            risk_inputs[train],
            y[train],
            [*spec.names, "anomaly"],
            epochs=config.risk_epochs,
            seed=config.seed,
            on_epoch=lambda _epoch, _loss: progress.advance(task),
        )
        risk = risk_model.predict(risk_inputs)
        timings["risk_s"] = time.perf_counter() - t0
        risk_metrics = {
            "roc_auc": float(roc_auc_score(y[test], risk[test])) if len(set(y[test])) > 1 else float("nan"),
            "pr_auc": float(average_precision_score(y[test], risk[test])) if y[test].any() else float("nan"),
            "brier": float(brier_score_loss(y[test], risk[test])),
            "anomaly_roc_auc": float(roc_auc_score(y[test], anomaly[test]))
            if len(set(y[test])) > 1
            else float("nan"),
            "base_rate": float(y[test].mean()),
            "temperature": risk_model.temperature,
        }

        # --- policy
        t0 = time.perf_counter()
        scaler = risk_model.scaler  # the policy sees features scaled exactly like the risk model does
        state_names = [*spec.names, "anomaly", "risk"]
        policy_stub = PolicyModel([], [], "Tanh", state_names, scaler.mean[:-1], scaler.std[:-1])
        states = policy_stub.state(x, anomaly, risk)
        train_histories = group_histories(entity_ids[train], states[train], y[train], amounts[train])
        test_histories = group_histories(entity_ids[test], states[test], y[test], amounts[test])
        risk_index = len(state_names) - 1
        t_throttle, t_block = best_threshold_policy(train_histories, rewards, risk_index, config.seed)
        baseline = threshold_probabilities(risk_index, t_throttle, t_block)
        env = DummyVecEnv([lambda: FraudSimulatorEnv(train_histories, rewards) for _ in range(4)])
        env.seed(config.seed)
        ppo = PPO(
            "MlpPolicy",
            env,
            n_steps=512,
            batch_size=256,
            n_epochs=5,
            gamma=0.95,
            gae_lambda=0.9,
            learning_rate=1e-4,
            ent_coef=0.001,
            policy_kwargs={"net_arch": [64, 64]},
            seed=config.seed,
            device="cpu",
            verbose=0,
        )
        imitate(ppo, states[train], baseline(states[train]).argmax(axis=1), seed=config.seed)
        task = progress.add_task("policy: PPO in the simulator", total=config.ppo_timesteps)
        ppo.learn(config.ppo_timesteps, callback=_PPOProgress(lambda n: progress.advance(task, n)))
        policy_model = PolicyModel.from_sb3(ppo, state_names, scaler.mean[:-1], scaler.std[:-1])
        timings["policy_s"] = time.perf_counter() - t0

        # --- held-out comparison
        task = progress.add_task("evaluating policies on held-out time", total=3)
        progress.advance(task)
        reports = [
            evaluate_policy(
                "allow-all",
                lambda s: np.tile([1.0, 0.0, 0.0], (len(s), 1)),
                test_histories,
                rewards,
                seed=config.seed,
            ),
            evaluate_policy(
                f"risk thresholds {t_throttle:g}/{t_block:g}",
                threshold_probabilities(risk_index, t_throttle, t_block),
                test_histories,
                rewards,
                seed=config.seed,
            ),
        ]
        progress.advance(task)
        reports.append(
            evaluate_policy(
                "PPO policy", policy_model.probabilities, test_histories, rewards, seed=config.seed
            )
        )
        progress.advance(task)

    policy_metrics = {r.name: _report_dict(r) for r in reports}
    status = "champion" if promote else "challenger"
    versions = {
        "anomaly": registry.register(
            "anomaly",
            lambda d: _save(anomaly_model, d, spec_path),
            window,
            {"roc_auc_heldout": risk_metrics["anomaly_roc_auc"], "trees": config.anomaly_trees},
            status,
        ),
        "risk": registry.register(
            "risk",
            # With the normal ranges of its inputs and of the risk itself, read by explanations.
            lambda d: _save(risk_model, d, spec_path, np.column_stack([risk_inputs, risk])[train], y[train]),
            window,
            risk_metrics,
            status,
        ),
        "policy": registry.register(
            "policy",
            lambda d: _save_policy(policy_model, ppo, d, spec_path),
            window,
            {
                "heldout": policy_metrics,
                "timesteps": config.ppo_timesteps,
                "thresholds": {"throttle": t_throttle, "block": t_block},
            },
            status,
        ),
    }
    timings["total_s"] = time.perf_counter() - started
    return TrainReport(versions, risk_metrics, reports, timings, window)


def _save(
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


def _save_policy(model: PolicyModel, ppo: PPO, directory: Path, spec_path: Path) -> None:
    model.save(directory)
    ppo.save(directory / PPO_ZIP)
    shutil.copyfile(spec_path, directory / SPEC_FILE)


def _report_dict(report: PolicyReport) -> dict[str, float]:
    return {
        "reward_per_decision": report.reward_per_decision,
        "ci_low": report.ci_low,
        "ci_high": report.ci_high,
        "fraud_caught_rate": report.fraud_caught_rate,
        "fraud_amount_lost": report.fraud_amount_lost,
        "good_blocked": report.good_blocked,
        "good_throttled": report.good_throttled,
        "decisions": report.decisions,
    }


def report_tables(report: TrainReport) -> list[Table]:
    """Rich tables of the training report: model metrics, then the policy comparison."""
    models = Table(title="Models (held-out = the later part of time)")
    models.add_column("model")
    models.add_column("version")
    models.add_column("held-out metrics")
    rm = report.risk_metrics
    models.add_row(
        "anomaly", report.versions["anomaly"], f"ROC-AUC {rm['anomaly_roc_auc']:.3f} (unsupervised)"
    )
    models.add_row(
        "risk",
        report.versions["risk"],
        f"ROC-AUC {rm['roc_auc']:.3f}  PR-AUC {rm['pr_auc']:.3f}  Brier {rm['brier']:.4f}  "
        f"(base rate {rm['base_rate']:.3%})",
    )
    models.add_row("policy", report.versions["policy"], "see the comparison below")

    policies = Table(
        title="Expected reward per decision on held-out entities (simulator, rewards.yaml units)"
    )
    for column in (
        "policy",
        "reward / decision",
        "95% CI",
        "fraud stopped",
        "fraud $ lost",
        "good blocked",
        "good throttled",
        "decisions",
    ):
        policies.add_column(column, justify="right" if column != "policy" else "left")
    for r in report.policies:
        policies.add_row(
            r.name,
            f"{r.reward_per_decision:.3f}",
            f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
            f"{r.fraud_stopped}/{r.fraud_events} ({r.fraud_caught_rate:.0%})",
            f"{r.fraud_amount_lost:,.0f}",
            str(r.good_blocked),
            str(r.good_throttled),
            str(r.decisions),
        )
    return [models, policies]
