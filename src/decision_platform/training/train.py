"""Training the three models from a labelled data set, with a time-ordered split.

Features are computed by ``features.offline`` from the same definitions (features.yaml) the Lua script
uses online, over the whole stream in time order (so held-out rows see their real history); models are
fit on the earlier part and judged on the later part of time only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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

from decision_platform.core.events import Event
from decision_platform.core.rewards import RewardTable
from decision_platform.data import LabelledEvents
from decision_platform.features import FeatureSpec, compute_features
from decision_platform.models.anomaly import AnomalyModel
from decision_platform.models.artifacts import save_artifact, save_policy_artifact
from decision_platform.models.policy import PolicyModel, imitate
from decision_platform.models.registry import ModelRegistry
from decision_platform.models.risk import RiskModel
from decision_platform.rules.ruleset import BASE_VARIABLES, RuleSet, RuleTally, Tier
from decision_platform.training import PPO_TIMESTEPS
from decision_platform.training.simulator import (
    EntityHistory,
    FraudSimulatorEnv,
    PolicyReport,
    evaluate_policy,
    group_histories,
)


@dataclass(frozen=True)
class TrainConfig:
    test_fraction: float = 0.3
    anomaly_trees: int = 100
    risk_epochs: int = 12
    ppo_timesteps: int = PPO_TIMESTEPS
    seed: int = 0


@dataclass
class TrainReport:
    versions: dict[str, str]
    risk_metrics: dict[str, float]
    policies: list[PolicyReport]
    timings: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    #: The rules-only baseline: rules file, events each rule fired on, rules reading model scores.
    rules: dict[str, Any] = field(default_factory=dict)
    #: The held-out rows (time order) with every policy's action probabilities, for further analysis.
    heldout: HeldOutRows | None = None
    #: The training rows (time order; no probabilities), e.g. to fit other baselines the same way.
    training: HeldOutRows | None = None


@dataclass(frozen=True, eq=False)
class HeldOutRows:
    """Rows of one part of time, in time order: what the policies saw and the (n, 3) probabilities each
    gave (held-out part; the training part carries none)."""

    entity_ids: np.ndarray
    labels: np.ndarray
    amounts: np.ndarray
    anomaly: np.ndarray
    risk: np.ndarray
    probabilities: dict[str, np.ndarray]


def progress_bars(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


class PPOProgress(BaseCallback):
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


RULES_ONLY = "rules only"


@dataclass(frozen=True)
class RulesOnlyResult:
    """The rules-only action of each event, and how often each rule fired / could not be evaluated."""

    actions: np.ndarray  # (n,) int8: 0 allow, 1 throttle, 2 block
    hits: dict[str, int]
    errors: dict[str, int]
    #: Rules reading a model score (anomaly, risk): with them "rules only" is partly model-based.
    model_based: dict[str, list[str]]


def rules_only_actions(
    rules: RuleSet,
    events: Sequence[Event],
    features: np.ndarray,
    feature_names: Sequence[str],
    anomaly: np.ndarray,
    risk: np.ndarray,
    on_progress: Callable[[int], None] | None = None,
) -> RulesOnlyResult:
    """Per event, the action the rules leave when the policy proposes allow.

    That is allow, unless a block rule fired (block) or a floor rule fired (throttle, the allowed action
    nearest to allow, as ``serving_distribution`` picks it); cap rules cannot change an allow. Each rule
    sees the facts ``DecisionEngine._decide_row`` gives it: every feature by name, amount, entity_id,
    event_type, attributes, anomaly, risk (and the rule lists, which ``RuleSet.evaluate`` adds). Hits
    and errors are tallied here, not in the serving metrics of the process.
    """
    n = len(events)
    needed = rules.variables
    feature_columns = {
        name: features[:, j].tolist()
        for j, name in enumerate(feature_names)
        if name in needed and name not in BASE_VARIABLES  # event facts and scores win over a feature
    }
    event_facts: dict[str, Callable[[], Sequence[Any]]] = {
        "amount": lambda: [float(e.amount or 0.0) for e in events],
        "entity_id": lambda: [e.entity_id for e in events],
        "event_type": lambda: [e.event_type for e in events],
        "attributes": lambda: [dict(e.attributes) for e in events],
        "anomaly": lambda: np.asarray(anomaly, dtype=np.float64).tolist(),
        "risk": lambda: np.asarray(risk, dtype=np.float64).tolist(),
    }
    columns = {**feature_columns, **{name: event_facts[name]() for name in needed & BASE_VARIABLES}}
    tally = RuleTally(rule.name for rule in rules.rules)
    actions = np.zeros(n, dtype=np.int8)
    step = 2000
    for i in range(n):
        mask = rules.evaluate({name: column[i] for name, column in columns.items()}, tally).mask
        actions[i] = 0 if mask[0] else 1 if mask[1] else 2
        if on_progress is not None and (i + 1) % step == 0:
            on_progress(step)
    if on_progress is not None and n % step:
        on_progress(n % step)
    scores = {"anomaly", "risk"}
    model_based = {
        rule.name: sorted(names & scores)
        for rule in rules.rules
        for names in (rules.variables_of(rule.name),)
        if names & scores and rule.tier is not Tier.CAP
    }
    return RulesOnlyResult(actions, tally.hits, tally.errors, model_based)


def best_threshold_policy(
    histories: list[EntityHistory], rewards: RewardTable, risk_index: int, seed: int
) -> tuple[float, float]:
    """Grid-search the throttle / block thresholds that maximise reward on training histories.

    The grid has fixed probabilities and the upper quantiles of the risk itself: a model that ranks well
    but is calibrated on a different base rate may put every fraud below the first fixed step.
    """
    risk = np.concatenate([h.states[:, risk_index] for h in histories])
    quantiles = np.quantile(risk, [0.8, 0.9, 0.95, 0.98, 0.99, 0.995]) if len(risk) else []
    fixed = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    grid = [*sorted({float(v) for v in [*fixed, *quantiles]}), 1.01]
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


def new_ppo(env: DummyVecEnv, seed: int) -> PPO:
    """PPO as the platform trains it: short rollouts and a small MLP (the state is ~20 numbers), a low
    learning rate because it starts from a behaviour-cloned or champion actor it should refine, not erase."""
    return PPO(
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
        seed=seed,
        device="cpu",
        verbose=0,
    )


def train_all(
    data: LabelledEvents,
    spec_path: Path,
    rewards: RewardTable,
    registry: ModelRegistry,
    config: TrainConfig = TrainConfig(),
    console: Console | None = None,
    promote: bool = True,
    source: str = "synthetic",
    rules: RuleSet | Path | None = None,
) -> TrainReport:
    """Fit anomaly, risk and policy; register them (as champions when ``promote``); report.

    The held-out comparison has four policies: allow-all, the best fixed risk thresholds (fit on the
    training part), rules only (``rules``: a rule set or rules file, by default the configured
    rules.yaml) and the PPO policy.
    """
    console = console or Console()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    timings: dict[str, float] = {}
    spec = FeatureSpec.load(spec_path)
    if not isinstance(rules, RuleSet):
        if rules is None:
            from decision_platform.config import get_settings

            rules = get_settings().rules_path
        rules_source = str(rules)
        rules = RuleSet.load(Path(rules), spec.names)
    else:
        rules_source = "RuleSet"
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

    with progress_bars(console) as progress:
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
        epochs = RiskModel.effective_epochs(int(train.sum()), config.risk_epochs)
        task = progress.add_task("risk: pytorch classifier", total=epochs)
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
        ppo = new_ppo(env, config.seed)
        imitate(ppo, states[train], baseline(states[train]).argmax(axis=1), seed=config.seed)
        task = progress.add_task("policy: PPO in the simulator", total=config.ppo_timesteps)
        ppo.learn(config.ppo_timesteps, callback=PPOProgress(lambda n: progress.advance(task, n)))
        policy_model = PolicyModel.from_sb3(ppo, state_names, scaler.mean[:-1], scaler.std[:-1])
        timings["policy_s"] = time.perf_counter() - t0

        # --- the rules-only baseline: what the rules do to a policy that always proposes allow
        t0 = time.perf_counter()
        test_rows = np.flatnonzero(test)
        task = progress.add_task("rules only: CEL rules on held-out events", total=len(test_rows))
        rules_only = rules_only_actions(
            rules,
            [events[i] for i in test_rows],
            x[test],
            spec.names,
            anomaly[test],
            risk[test],
            on_progress=lambda n: progress.advance(task, n),
        )
        timings["rules_s"] = time.perf_counter() - t0
        # Same grouping as test_histories, so every policy meets the same random draws row by row.
        rules_histories = group_histories(
            entity_ids[test], rules_only.actions[:, None].astype(np.float32), y[test], amounts[test]
        )

        # --- held-out comparison
        task = progress.add_task("evaluating policies on held-out time", total=4)
        progress.advance(task)
        threshold_name = f"risk thresholds {t_throttle:.3g}/{t_block:.3g}"
        reports = [
            evaluate_policy(
                "allow-all",
                lambda s: np.tile([1.0, 0.0, 0.0], (len(s), 1)),
                test_histories,
                rewards,
                seed=config.seed,
            ),
            evaluate_policy(
                threshold_name,
                threshold_probabilities(risk_index, t_throttle, t_block),
                test_histories,
                rewards,
                seed=config.seed,
            ),
        ]
        progress.advance(task)
        reports.append(
            evaluate_policy(
                RULES_ONLY,
                lambda s: np.eye(3)[s[:, 0].astype(np.int64)],
                rules_histories,
                rewards,
                seed=config.seed,
            )
        )
        progress.advance(task)
        reports.append(
            evaluate_policy(
                "PPO policy", policy_model.probabilities, test_histories, rewards, seed=config.seed
            )
        )
        progress.advance(task)
    heldout = HeldOutRows(
        entity_ids=entity_ids[test],
        labels=y[test],
        amounts=amounts[test],
        anomaly=anomaly[test],
        risk=risk[test],
        probabilities={
            "allow-all": np.tile(np.array([1.0, 0.0, 0.0], dtype=np.float32), (int(test.sum()), 1)),
            threshold_name: threshold_probabilities(risk_index, t_throttle, t_block)(states[test]),
            RULES_ONLY: np.eye(3, dtype=np.float32)[rules_only.actions],
            "PPO policy": policy_model.probabilities(states[test]).astype(np.float32),
        },
    )
    training = HeldOutRows(entity_ids[train], y[train], amounts[train], anomaly[train], risk[train], {})
    rules_info = {
        "source": rules_source,
        "hits": rules_only.hits,
        "errors": rules_only.errors,
        "model_based": rules_only.model_based,
        "rows": int(test.sum()),
    }

    policy_metrics = {r.name: _report_dict(r) for r in reports}
    status = "champion" if promote else "challenger"
    versions = {
        "anomaly": registry.register(
            "anomaly",
            lambda d: save_artifact(anomaly_model, d, spec_path),
            window,
            {"roc_auc_heldout": risk_metrics["anomaly_roc_auc"], "trees": config.anomaly_trees},
            status,
        ),
        "risk": registry.register(
            "risk",
            # With the normal ranges of its inputs and of the risk itself, read by explanations.
            lambda d: save_artifact(
                risk_model, d, spec_path, np.column_stack([risk_inputs, risk])[train], y[train]
            ),
            window,
            risk_metrics,
            status,
        ),
        "policy": registry.register(
            "policy",
            lambda d: save_policy_artifact(policy_model, ppo, d, spec_path),
            window,
            {
                "heldout": policy_metrics,
                "timesteps": config.ppo_timesteps,
                "thresholds": {"throttle": t_throttle, "block": t_block},
                "rules_only": {"source": rules_source, "hits": rules_only.hits},
            },
            status,
        ),
    }
    timings["total_s"] = time.perf_counter() - started
    return TrainReport(versions, risk_metrics, reports, timings, window, rules_info, heldout, training)


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
        title="Expected reward per decision on held-out entities (simulator, rewards.yaml units)",
        caption=f"{RULES_ONLY}: allow unless a rule blocks or steps up. At serving the rules apply on "
        "top of every policy.",
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
