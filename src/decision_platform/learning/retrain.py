"""Offline retraining from real outcomes, judged off-policy before it may act (DESIGN.md §8).

    impute missing outcomes -> load decisions ⋈ outcomes -> split in time
      -> refit the risk model on the labels outcomes reveal (earlier part)
      -> PPO warm-started from the champion, in a simulator built from the logged histories
      -> PPO against the baselines `train` uses (allow-all, thresholds, Bayes minimum risk, rules only)
         in total reward per entity on the labelled later part: the candidate is PPO only if it earns
         at least the best of them, else that baseline
      -> IPS / SNIPS / DR of candidate and champion on the later part, with safety figures
      -> gate -> register the candidate (challenger), promote it only if the gate passes

Why a time split: the candidate must be judged on decisions it was not trained on, in the order the
future will come. Why the champion's anomaly model is kept: it is unsupervised and outcomes say nothing
new about it; refitting it would change every state the policy sees for no measured gain.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from decision_platform.config import Settings
from decision_platform.core.rewards import RewardTable
from decision_platform.learning.config import LearningConfig
from decision_platform.learning.evaluation import (
    GateResult,
    PolicyEstimate,
    check_gate,
    estimate_policy,
)
from decision_platform.learning.logged import LoggedDecisions, load_logged
from decision_platform.learning.ope import Estimate, evaluate_difference, fit_reward_model
from decision_platform.learning.outcomes import impute_missing_outcomes
from decision_platform.models.artifacts import SPEC_FILE, save_artifact, save_policy_artifact
from decision_platform.models.baseline_policy import BayesPolicy, Policy, ThresholdPolicy
from decision_platform.models.bundle import LoadedModels, load_champions
from decision_platform.models.policy import PPO_ZIP, PolicyModel, imitate
from decision_platform.models.registry import ModelRegistry, UnwritableDirectoryError, check_writable
from decision_platform.models.risk import RiskModel
from decision_platform.models.scoring import ScoringChain
from decision_platform.models.threads import one_torch_thread
from decision_platform.training.progress import SILENT, Progress
from decision_platform.training.simulator import FraudSimulatorEnv, group_histories
from decision_platform.training.train import (
    ALLOW_ALL,
    BAYES,
    PPO_POLICY,
    RULES_ONLY,
    Baselines,
    PPOProgress,
    RulesOnlyResult,
    Verdict,
    judge_policies,
    new_ppo,
    served_choices,
    under_rules,
)
from decision_platform.training.yardstick import Replay, best_thresholds


class RetrainError(RuntimeError):
    """Retraining cannot start (no champions, too little logged data): the message says what to do."""


@dataclass
class RetrainReport:
    started_at: str
    window: dict[str, Any]
    data: dict[str, int]
    imputed: dict[str, int]
    risk: dict[str, Any]
    champion: PolicyEstimate
    candidate: PolicyEstimate
    #: candidate - champion per estimator, paired bootstrap CI: what the gate reads.
    difference: dict[str, Estimate]
    gate: GateResult
    #: PPO and the baselines in the simulator of the labelled held-out histories; which one is the candidate.
    baselines: Verdict | None = None
    limits: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    promoted: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        skip = ("champion", "candidate", "difference", "gate", "baselines")
        out = {k: v for k, v in self.__dict__.items() if k not in skip}
        out["difference"] = {k: asdict(v) for k, v in self.difference.items()}
        out["champion"] = self.champion.as_dict()
        out["candidate"] = self.candidate.as_dict()
        out["gate"] = self.gate.as_dict()
        if self.baselines is not None:
            out["baselines"] = {
                "candidate": self.baselines.served,
                "best_baseline": self.baselines.best_baseline,
                "policies": {k: c.as_dict() for k, c in self.baselines.comparisons.items()},
            }
        return out


def _champions(registry: ModelRegistry) -> tuple[LoadedModels, Path]:
    loaded = load_champions(registry)
    if not loaded.complete:
        raise RetrainError(f"no complete champion set to start from ({loaded.errors}); run `train` first")
    policy_record = registry.champion("policy")
    assert policy_record is not None
    return loaded, registry.verified_path(policy_record)


def _time_split(logged: LoggedDecisions, holdout_fraction: float) -> tuple[np.ndarray, float]:
    cut = float(np.quantile(logged.created_at, 1.0 - holdout_fraction))
    return logged.created_at < cut, cut


def _refit_risk(
    champion: RiskModel,
    inputs: np.ndarray,
    logged: LoggedDecisions,
    train: np.ndarray,
    holdout: np.ndarray,
    config: LearningConfig,
    seed: int,
) -> tuple[RiskModel, dict[str, Any]]:
    """The risk model refit on the labels of the earlier part, or the champion's when labels are too few."""
    labelled = logged.labels >= 0
    fit_rows = train & labelled
    bad = int((logged.labels[fit_rows] == 1).sum())
    info: dict[str, Any] = {"train_labels": int(fit_rows.sum()), "train_bad": bad}
    if bad < config.training.min_bad_labels or bad == fit_rows.sum():
        info["refit"] = False
        info["why_not"] = f"{bad} bad labels in the training part (need >= {config.training.min_bad_labels})"
        candidate = champion
    else:
        candidate = RiskModel.fit(
            inputs[fit_rows],
            logged.labels[fit_rows],
            champion.input_names,
            replace(champion.config, epochs=config.training.risk_epochs),
            categorical=champion.encoder.code_inputs,
            values=champion.encoder.value_inputs,
            seed=seed,
        )
        info["refit"] = True
    rows = holdout & labelled
    y = logged.labels[rows]
    if len(set(y.tolist())) > 1:
        for name, model in (("champion", champion), ("candidate", candidate)):
            p = model.predict(inputs[rows])
            info[f"{name}_roc_auc"] = float(roc_auc_score(y, p))
            info[f"{name}_pr_auc"] = float(average_precision_score(y, p))
        # Outcome labels are few and biased (blocked events rarely get one): a refit that ranks the
        # held-out labels worse than the champion does is not used.
        if candidate is not champion and info["candidate_pr_auc"] < info["champion_pr_auc"]:
            info["refit"] = False
            info["why_not"] = (
                f"the refit ranks held-out labels worse (PR-AUC {info['candidate_pr_auc']:.3f} vs the "
                f"champion's {info['champion_pr_auc']:.3f}): the champion's risk model is kept"
            )
            candidate = champion
    return candidate, info


@one_torch_thread()
def _train_policy(
    champion: Policy,
    champion_dir: Path,
    states: np.ndarray,
    logged: LoggedDecisions,
    train: np.ndarray,
    rewards: RewardTable,
    timesteps: int,
    seed: int,
    progress: Progress = SILENT,
) -> tuple[PolicyModel, PPO]:
    """PPO warm-started from the champion, trained in the simulator of the logged histories."""
    rows = train & (logged.labels >= 0)
    zip_path = champion_dir / PPO_ZIP
    # A PPO champion's network may read more than the state (the Bayes step values, PolicyModel.inputs):
    # its zip observes that, and the candidate keeps the same inputs. A cloned baseline reads the state.
    warm = zip_path.is_file()
    actor = champion if warm and isinstance(champion, PolicyModel) else None
    observe = actor.inputs if actor is not None else np.atleast_2d
    histories = group_histories(
        logged.entity_ids[rows], observe(states[rows]), logged.labels[rows], logged.amounts[rows]
    )
    if not histories:
        raise RetrainError("no labelled decisions in the training part: post outcomes first")
    env = DummyVecEnv([lambda: FraudSimulatorEnv(histories, rewards) for _ in range(4)])
    env.seed(seed)
    if warm:
        ppo = PPO.load(zip_path, env=env, device="cpu", seed=seed)
    else:
        # A champion without its SB3 zip (a baseline served as the policy, or a hand-made one) cannot be
        # warm-started from weights: its behaviour on these states is cloned into a new actor instead.
        ppo = new_ppo(env, seed)
        imitate(ppo, states[rows], champion.probabilities(states[rows]).argmax(axis=1), seed=seed)
    if timesteps > 0:
        task = "policy: PPO from the champion, logged histories"
        progress.start(task, timesteps)
        ppo.learn(timesteps, callback=PPOProgress(lambda n: progress.advance(task, n)))
    spec = actor.input_spec if actor is not None else {}
    candidate = PolicyModel.from_sb3(
        ppo, champion.state_names, champion.scaler_mean, champion.scaler_std, **spec
    )
    return candidate, ppo


def against_baselines(
    champion: Policy,
    candidate: PolicyModel,
    states: np.ndarray,
    logged: LoggedDecisions,
    train: np.ndarray,
    holdout: np.ndarray,
    rewards: RewardTable,
    seed: int,
) -> tuple[Verdict, Baselines] | None:
    """The PPO candidate and the same four baselines as ``train`` (allow-all, thresholds searched for
    total reward on the labelled training part, Bayes minimum risk, rules only as logged: the action the
    rules' mask leaves to an allow), each under the logged masks as it would serve, judged in the
    simulator of the labelled held-out histories. None when the held-out part has no labelled decision
    (nothing to replay: the OPE gate alone judges)."""
    fit = train & (logged.labels >= 0)
    if not (holdout & (logged.labels >= 0)).any():
        return None
    risk_index = champion.state_names.index("risk")
    replay = Replay.of(logged.entity_ids[fit], logged.labels[fit], logged.amounts[fit])
    served = served_choices(logged.masks[fit])  # searched under the rules, as judged below
    t_throttle, t_block = best_thresholds(states[fit, risk_index], replay, rewards, served=served)
    names, mean, std = champion.state_names, champion.scaler_mean, champion.scaler_std
    thresholds = ThresholdPolicy(t_throttle, t_block, names, mean, std)
    bayes = BayesPolicy(rewards.expected_step_values(), names, mean, std)
    rows = holdout & (logged.labels >= 0)
    masks = logged.masks[rows]
    rules_actions = np.where(masks[:, 0], 0, np.where(masks[:, 1], 1, 2)).astype(np.int8)
    held = states[rows]
    own = {
        ALLOW_ALL: np.tile([1.0, 0.0, 0.0], (len(held), 1)),
        thresholds.name: thresholds.probabilities(held),
        BAYES: bayes.probabilities(held),
        RULES_ONLY: np.eye(3)[rules_actions],
        PPO_POLICY: candidate.probabilities(held),
    }
    # Every policy as it would serve: under the rules' masks logged with each decision.
    probabilities = {name: under_rules(p, masks) for name, p in own.items()}
    verdict = judge_policies(
        probabilities, logged.entity_ids[rows], logged.labels[rows], logged.amounts[rows], rewards, seed
    )
    return verdict, Baselines(thresholds, bayes, RulesOnlyResult(rules_actions, {}, {}, {}, masks))


def judge(
    champion: ScoringChain,
    candidate: ScoringChain,
    logged: LoggedDecisions,
    train: np.ndarray,
    holdout: np.ndarray,
    settings: Settings,
    config: LearningConfig,
    versions: tuple[str, str] = ("champion", "candidate"),
    seed: int = 0,
) -> tuple[PolicyEstimate, PolicyEstimate, dict[str, Estimate], GateResult]:
    """Both policies as they would serve, estimated on the held-out decisions with a reward; the gate.

    The DR reward model is fit on the training part only, so the held-out estimate does not grade its
    own homework. Decisions that fell back are left out: any policy would have fallen back there too.
    """
    usable = logged.has_reward & ~logged.fell_back
    test = logged.subset(holdout & usable)
    fit = logged.subset(train & usable)
    if len(test) == 0:
        raise RetrainError("no held-out decisions with an outcome: post outcomes (or wait for the horizon)")
    _, _, test_states = champion.scores(test.features)
    _, _, fit_states = champion.scores(fit.features)
    q_hat = _reward_model(fit_states, fit, test_states)
    floor, explore = settings.exploration_floor, settings.explore_actions
    estimates, targets = [], []
    for name, models, version in (
        ("champion", champion, versions[0]),
        ("candidate", candidate, versions[1]),
    ):
        targets.append(models.serving_probabilities(test.features, test.masks, floor, explore))
        estimates.append(estimate_policy(name, version, targets[-1], test, q_hat, config.gate, seed))
    g = config.gate
    difference = evaluate_difference(
        targets[1],
        targets[0],
        test.actions,
        test.propensities,
        test.rewards,
        q_hat,
        g.bootstrap,
        g.confidence,
        seed,
    )
    return estimates[0], estimates[1], difference, check_gate(estimates[0], estimates[1], g, difference)


def _reward_model(fit_states: np.ndarray, fit: LoggedDecisions, test_states: np.ndarray) -> np.ndarray:
    """q(x, a) on the held-out states from ridge regressions fit on the training part."""
    both = np.vstack([fit_states, test_states])
    actions = np.r_[fit.actions, np.full(len(test_states), -1)]  # held-out rows never fit
    rewards = np.r_[fit.rewards, np.zeros(len(test_states))]
    return fit_reward_model(both, actions, rewards)[len(fit_states) :]


def load_training_data(
    registry: ModelRegistry,
    champions: LoadedModels,
    config: LearningConfig,
    since: datetime | None,
    until: datetime | None,
    progress: Progress = SILENT,
) -> tuple[LoggedDecisions, np.ndarray, float]:
    """Logged decisions with features, cut in time (train mask, cut); RetrainError when too few to learn."""
    assert champions.spec is not None
    with progress.status("loading logged decisions and outcomes"):
        logged = load_logged(registry.repository, champions.spec.names, since, until)
    logged = logged.subset(np.all(np.isfinite(logged.features), axis=1))  # no features: fell back early
    if len(logged) < 10 or not (logged.labels >= 0).any():
        raise RetrainError(
            f"{len(logged)} logged decisions, {int((logged.labels >= 0).sum())} with a labelled outcome: "
            "too little to learn from (replay traffic with --outcomes, or widen --since/--until)"
        )
    train, cut = _time_split(logged, config.training.holdout_fraction)
    return logged, train, cut


def _window(
    logged: LoggedDecisions, train: np.ndarray, cut: float, since: datetime | None, until: datetime | None
) -> dict[str, Any]:
    """The data window the registry records for the candidate's models."""
    return {
        "source": "logged decisions",
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "events": len(logged),
        "start": float(logged.created_at.min()),
        "end": float(logged.created_at.max()),
        "train_until": cut,
        "train_rows": int(train.sum()),
        "test_rows": int((~train).sum()),
    }


def _register_candidate(
    registry: ModelRegistry,
    champions: LoadedModels,
    champion_dir: Path,
    logged: LoggedDecisions,
    train: np.ndarray,
    window: dict[str, Any],
    inputs: np.ndarray,
    risk: tuple[RiskModel, dict[str, Any]],
    policy: tuple[Policy, PPO | None],
    ope_metrics: dict[str, Any],
) -> dict[str, str]:
    """The refit risk model (only if refit) and the policy, as challengers; kind -> version."""
    spec_path = champion_dir / SPEC_FILE
    risk_model, risk_info = risk
    versions: dict[str, str] = {}
    if risk_info["refit"]:
        labelled = train & (logged.labels >= 0)
        range_rows = np.column_stack([inputs, risk_model.predict(inputs)])[labelled]
        versions["risk"] = registry.register(
            "risk",
            lambda d: save_artifact(risk_model, d, spec_path, range_rows, logged.labels[labelled]),
            window,
            {k: v for k, v in risk_info.items() if isinstance(v, float | int | bool)},
        )
    versions["policy"] = registry.register(
        "policy",
        lambda d: save_policy_artifact(policy[0], policy[1], d, spec_path),
        window,
        ope_metrics | {"risk_version": versions.get("risk", champions.versions["risk"])},
    )
    return versions


def retrain(
    settings: Settings,
    registry: ModelRegistry,
    config: LearningConfig,
    rewards: RewardTable,
    since: datetime | None = None,
    until: datetime | None = None,
    promote: bool = True,
    timesteps: int | None = None,
    seed: int = 0,
    progress: Progress = SILENT,
) -> RetrainReport:
    """The whole loop; see the module docstring. Raises RetrainError when it cannot start."""
    started = time.perf_counter()
    started_at = datetime.now(UTC)
    timings: dict[str, float] = {}
    for directory in (settings.model_dir, settings.reports_dir):  # the candidate's artifacts, the report
        try:
            check_writable(directory)
        except UnwritableDirectoryError as exc:
            raise RetrainError(str(exc)) from None

    imputation = impute_missing_outcomes(registry.repository, rewards, config.outcomes)
    champions, champion_dir = _champions(registry)
    assert champions.spec and champions.anomaly and champions.risk and champions.policy
    logged, train, cut = load_training_data(registry, champions, config, since, until, progress)
    holdout = ~train
    timings["load_s"] = time.perf_counter() - started

    t0 = time.perf_counter()
    anomaly = champions.anomaly.score(logged.features)
    inputs = RiskModel.inputs(logged.features, anomaly)
    risk_model, risk_info = _refit_risk(champions.risk, inputs, logged, train, holdout, config, seed)
    timings["risk_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    states = champions.policy.state(logged.features, anomaly, risk_model.predict(inputs))
    steps = config.training.ppo_timesteps if timesteps is None else timesteps
    ppo_policy, ppo = _train_policy(
        champions.policy, champion_dir, states, logged, train, rewards, steps, seed, progress
    )
    judged = against_baselines(champions.policy, ppo_policy, states, logged, train, holdout, rewards, seed)
    verdict = judged[0] if judged is not None else None
    # The candidate is PPO only when it earns at least the best baseline; else that baseline is.
    policy: Policy = ppo_policy
    policy_zip: PPO | None = ppo
    if judged is not None and not judged[0].ppo_promoted:
        policy, policy_zip = judged[1].served_as(judged[0].served), None
    timings["policy_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    champ_est, cand_est, difference, gate = judge(
        ScoringChain(champions.anomaly, champions.risk, champions.policy),
        ScoringChain(champions.anomaly, risk_model, policy),
        logged,
        train,
        holdout,
        settings,
        config,
        (champions.versions["policy"], "candidate"),
        seed,
    )
    timings["ope_s"] = time.perf_counter() - t0

    window = _window(logged, train, cut, since, until)
    ope_metrics = {
        "candidate": verdict.served if verdict is not None else PPO_POLICY,
        "baselines": {name: c.as_dict() for name, c in verdict.comparisons.items()} if verdict else {},
        "best_baseline": verdict.best_baseline if verdict is not None else None,
        "ope": cand_est.as_dict(),
        "champion_ope": champ_est.as_dict(),
        "difference": {k: asdict(v) for k, v in difference.items()},
        "gate": gate.as_dict(),
    }
    versions = _register_candidate(
        registry,
        champions,
        champion_dir,
        logged,
        train,
        window,
        inputs,
        (risk_model, risk_info),
        (policy, policy_zip),
        ope_metrics,
    )
    cand_est = PolicyEstimate(**{**cand_est.__dict__, "version": versions["policy"]})
    promoted = promote and gate.passed
    if promoted:
        registry.promote(*versions.values())  # together: the policy's state holds the risk
    timings["total_s"] = time.perf_counter() - started
    report = RetrainReport(
        started_at=started_at.isoformat(),
        window=window,
        data=logged.summary() | {"train": int(train.sum()), "holdout": int(holdout.sum())},
        imputed=asdict(imputation) | {"total": imputation.total},
        risk=risk_info,
        champion=champ_est,
        candidate=cand_est,
        difference=difference,
        gate=gate,
        baselines=verdict,
        limits={
            "good_block_rate": config.gate.max_good_block_rate,
            "fraud_allow_rate": config.gate.max_fraud_allow_rate,
        },
        versions=versions,
        promoted=promoted,
        timings=timings,
    )
    report.files = write_report(report, settings.reports_dir, started_at)
    return report


def write_report(report: RetrainReport, directory: Path, when: datetime) -> dict[str, str]:
    """``retrain-<time>.json`` (everything) and ``.png`` (estimates with CIs, safety vs limits)."""
    from decision_platform.learning.plots import plot_retrain

    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"retrain-{when:%Y%m%dT%H%M%S}"
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    files = {"json": str(json_path), "png": str(png_path)}
    json_path.write_text(json.dumps(report.as_dict() | {"files": files}, indent=2, default=str), "utf-8")
    plot_retrain(report, png_path)
    return files
