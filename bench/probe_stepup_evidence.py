"""Probe (issue 14): is "the step-ups this entity has already passed" worth a state feature?

In the simulator (and in production) a step-up (throttle) makes a fraudster give up with p = 0.7 and a good
customer leave with p = 0.1. An entity still transacting after k step-ups has passed k challenges: if its
events share a label, that multiplies the odds that it is a fraudster by ((1 - 0.7) / (1 - 0.1))^k = 3^-k.
Neither the risk model (it never sees actions) nor the myopic Bayes policy uses that evidence. This probe
measures what it is worth, before any state, simulator or serving change:

- ``Bayes + evidence``: per event, the Bayes-minimum-risk action on the risk with its log-odds moved by
  beta x min(k, 3), k = the step-ups the policy itself gave this entity earlier in the episode (so the
  actions are chosen row by row, each entity's episode in order). beta is fitted on the **training** rows
  (a reach-weighted logistic regression of the label on the risk's log-odds and min(k, 3), under the Bayes
  policy's own step-ups; nothing is fitted on held-out time); ``theory`` uses log 3^-1 instead.
- ``thresholds + evidence``: the best thresholds (as train searched them) on the same moved risk.

Every policy is judged as ``bench_policies.py`` judges them (exact expectations in the simulator on the
later 30% of time, under the rules' masks, paired bootstrap CIs over entities). A deterministic policy
whose action depends on its own earlier actions is still evaluated exactly: along an episode its actions
are fixed until the episode ends.

    .venv/bin/python bench/probe_stepup_evidence.py --source synthetic --seed 0
    .venv/bin/python bench/probe_stepup_evidence.py --source csv \\
        --path ../shared/data/cards-dev.csv.gz --mapping ../shared/data/cards-dev.yaml
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression

from bench_policies import CONFIG, load_data
from decision_platform.core.rewards import RewardTable
from decision_platform.models.registry import ModelRegistry
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.training.train import BAYES, HeldOutRows, TrainConfig, train_all
from decision_platform.training.yardstick import Replay, compare, expectation

#: Step-ups counted as evidence at most (the fit's column too).
CAP = 3
BASELINES = ("allow-all", BAYES, "rules only")


def evidence_actions(
    rows: HeldOutRows,
    rewards: RewardTable,
    beta: float,
    thresholds: tuple[float, float] | None = None,
    masks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One-hot (n, 3) actions in row order, and each row's step-ups so far (k), choosing row by row."""
    replay = Replay.of(rows.entity_ids, rows.labels, rows.amounts)
    risk = np.clip(rows.risk[replay.order], 1e-9, 1 - 1e-9)
    logit, amounts = np.log(risk / (1 - risk)), rows.amounts[replay.order]
    allowed = None if masks is None else masks[replay.order]
    g0, g1, b0, b1 = (np.asarray(v, dtype=np.float64) for v in rewards.expected_step_values())
    actions = np.zeros(len(risk), dtype=np.int64)
    ks = np.zeros(len(risk), dtype=np.int64)
    k, entity = 0, -1
    for i in range(len(risk)):
        if replay.group[i] != entity:
            k, entity = 0, replay.group[i]
        ks[i] = k
        p = 1.0 / (1.0 + np.exp(-(logit[i] + beta * min(k, CAP))))
        if thresholds is None:
            value = (1 - p) * (g0 + g1 * amounts[i]) + p * (b0 + b1 * amounts[i])
        else:  # the thresholds' order of preference: their action first, then the milder ones
            chosen = 2 if p >= thresholds[1] else 1 if p >= thresholds[0] else 0
            value = -np.abs(np.arange(3) - chosen) - 0.5 * (np.arange(3) > chosen)
        if allowed is not None:
            value = np.where(allowed[i], value, -np.inf)
        actions[i] = int(np.argmax(value))
        k += actions[i] == 1
    one_hot = np.zeros((len(risk), 3))
    one_hot[replay.order, actions] = 1.0
    steps = np.zeros(len(risk), dtype=np.int64)
    steps[replay.order] = ks
    return one_hot, steps


def fitted_beta(training: HeldOutRows, rewards: RewardTable) -> float:
    """The evidence's weight on the training rows: how the label's log-odds move with min(k, CAP) at the
    same risk, each row weighted by the chance the Bayes policy's episode reaches it."""
    actions, steps = evidence_actions(training, rewards, 0.0)
    replay = Replay.of(training.entity_ids, training.labels, training.amounts)
    reached = np.zeros(len(steps))
    reached[replay.order] = expectation(actions, replay, rewards).reached
    risk = np.clip(training.risk, 1e-9, 1 - 1e-9)
    x = np.column_stack([np.log(risk / (1 - risk)), np.minimum(steps, CAP)])
    fit = LogisticRegression(C=1e4, max_iter=1000).fit(x, training.labels.astype(int), sample_weight=reached)
    return float(fit.coef_[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=("synthetic", "ulb", "csv"), default="synthetic")
    parser.add_argument("--path", type=Path)
    parser.add_argument("--mapping", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--entities", type=int, default=3000)
    parser.add_argument("--days", type=float, default=14.0)
    parser.add_argument("--timesteps", type=int, default=50_000, help="PPO steps (PPO is shown beside)")
    parser.add_argument("--cache", type=Path, help="pickle of the trained run's rows: reused if it exists")
    args = parser.parse_args()
    console = Console(width=160)
    rewards = RewardTable.load(CONFIG / "rewards.yaml")
    if args.cache and args.cache.exists():
        held, training = pickle.loads(args.cache.read_bytes())
    else:
        data, features, _ = load_data(
            args.source, args.entities, args.days, args.seed, args.path, args.mapping
        )
        with tempfile.TemporaryDirectory(prefix="probe-stepups-") as tmp:
            engine = make_engine(f"sqlite:///{Path(tmp) / 'registry.db'}")
            migrate(engine)
            report = train_all(
                data,
                features,
                rewards,
                ModelRegistry(Repository(engine), Path(tmp) / "models"),
                TrainConfig(ppo_timesteps=args.timesteps, seed=args.seed),
                promote=False,
                source=args.source,
                rules=CONFIG / "rules.yaml",
            )
            engine.dispose()
        held, training = report.heldout, report.training
        assert held is not None and training is not None
        if args.cache:
            args.cache.write_bytes(pickle.dumps((held, training)))
    sim = rewards.simulation
    theory = float(
        np.log((1 - sim.fraud_gives_up_probability_on_throttle) / (1 - sim.abandon_probability_on_throttle))
    )
    beta = fitted_beta(training, rewards)
    thresholds_name = next(name for name in held.probabilities if name.startswith("risk thresholds"))
    thresholds = tuple(float(t) for t in thresholds_name.split()[-1].split("/"))
    policies = dict(held.probabilities)
    policies[f"Bayes + evidence (beta {beta:+.2f}, fitted)"] = evidence_actions(
        held, rewards, beta, None, held.masks
    )[0]
    policies[f"Bayes + evidence (beta {theory:+.2f}, theory)"] = evidence_actions(
        held, rewards, theory, None, held.masks
    )[0]
    policies[f"thresholds + evidence (beta {beta:+.2f})"] = evidence_actions(
        held, rewards, beta, thresholds, held.masks
    )[0]
    replay = Replay.of(held.entity_ids, held.labels, held.amounts)
    expectations = {name: expectation(p, replay, rewards) for name, p in policies.items()}
    baselines = [name for name in policies if name in BASELINES or name == thresholds_name]
    best = max(baselines, key=lambda name: expectations[name].per_entity["reward"].sum())
    to_best, to_bayes = compare(expectations, best), compare(expectations, BAYES)
    table = Table(
        title=f"{args.source} seed {args.seed}: reward per entity, held-out time (best baseline: {best})"
    )
    for column in ("policy", "per entity", "- best baseline", "- Bayes", "good throttled", "fraud $ lost"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for name in policies:
        c, b = to_best[name], to_bayes[name]
        table.add_row(
            name,
            f"{c.per_entity.value:.3f}",
            f"{c.per_entity_diff.value:+.3f} [{c.per_entity_diff.low:+.3f}, {c.per_entity_diff.high:+.3f}]",
            f"{b.per_entity_diff.value:+.3f} [{b.per_entity_diff.low:+.3f}, {b.per_entity_diff.high:+.3f}]",
            f"{c.good_throttled:,.0f}",
            f"{c.fraud_amount_lost:,.0f}",
        )
    console.print(table)
    steps = evidence_actions(held, rewards, beta, None, held.masks)[1]
    console.print(f"held-out rows after >= 1 step-up of Bayes + evidence: {(steps > 0).mean():.1%}")


if __name__ == "__main__":
    main()
