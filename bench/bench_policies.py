"""Policies compared on held-out (later) time: allow-all, best fixed risk thresholds, rules only, PPO.

    .venv/bin/python bench/bench_policies.py --source synthetic            # 3000 entities x 14 days
    .venv/bin/python bench/bench_policies.py --source ulb                  # ULB credit cards, 284,807 rows

What it does: trains exactly as ``decision-platform train`` does (``train_all``: models fit on the
earlier 70% of time, judged on the later 30%) into a temporary registry (SQLite + model files in a temp
dir: var/ is not touched, except that ``--source ulb`` caches the downloaded CSV in var/datasets), with
the rules of config/rules.yaml for the "rules only" row. Then it looks at why the policies differ:

- paired differences: every policy against the best threshold policy on the same bootstrap resamples
  of held-out entities and the same simulator draws (a 95% CI on the difference, not two overlapping
  CIs);
- PPO greedy: the PPO policy's most likely action instead of a sample from it (the exploration cost:
  what sampling from a not fully confident policy loses);
- disagreements: the rows where the threshold policy and PPO (greedy) pick different actions, by true
  label, with the expected immediate reward of each choice; and the entities with at least one such row,
  replayed under both policies (so that what blocking or stepping up does to the rest of an episode
  counts).

Output: the rich tables, a markdown summary on stdout (pasted into bench/POLICIES.md), and a JSON line in
bench/policies_results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform as host
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from decision_platform.cli.progress import RichProgress
from decision_platform.cli.train import report_tables
from decision_platform.config import PROJECT_ROOT, Settings, get_settings
from decision_platform.core.rewards import RewardTable
from decision_platform.data import LabelledEvents
from decision_platform.models.policy import serving_distribution
from decision_platform.models.registry import ModelRegistry
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.training import PPO_TIMESTEPS
from decision_platform.training.simulator import (
    EntityHistory,
    PolicyReport,
    evaluate_policy,
    group_histories,
    reward_arrays,
)
from decision_platform.training.train import (
    HeldOutRows,
    TrainConfig,
    TrainReport,
    _report_dict,
    threshold_probabilities,
    train_all,
)

CONFIG = PROJECT_ROOT / "config"
RESULTS = Path(__file__).with_name("policies_results.jsonl")
ACTIONS = ("allow", "throttle", "block")
PPO = "PPO policy"
PPO_GREEDY = "PPO greedy (most likely action)"
ORACLE = "oracle thresholds"
PPO_SERVED = "PPO as served (exploration floor)"
SEEDS = 20  # simulator seeds of the sampled check


def load_data(source: str, entities: int, days: float, seed: int) -> tuple[LabelledEvents, Path, str]:
    """(events, feature definitions, source label), as ``decision-platform train --source`` loads them."""
    if source == "synthetic":
        from decision_platform.data import generate

        return (
            generate(n_entities=entities, days=days, seed=seed),
            CONFIG / "features.yaml",
            f"synthetic ({entities} entities x {days:g} days, seed {seed})",
        )
    from decision_platform.data.csv_import import find_ulb_csv, load_csv

    path = find_ulb_csv(get_settings().model_dir.parent / "datasets")
    mapping = CONFIG / "datasets" / "ulb_creditcard.yaml"
    return (
        load_csv(path, mapping, progress=True),
        mapping.with_name("ulb_creditcard.features.yaml"),
        f"ulb:{path.name}",
    )


# --- analysis on the held-out rows


def _row_histories(held: HeldOutRows) -> list[EntityHistory]:
    """Held-out histories whose 'state' is the row number, so any per-row policy can be replayed."""
    rows = np.arange(len(held.labels), dtype=np.float64)[:, None]
    return group_histories(held.entity_ids, rows, held.labels, held.amounts)


def _by_row(probabilities: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda states: probabilities[states[:, 0].astype(np.int64)]


def greedy(probabilities: np.ndarray) -> np.ndarray:
    return np.eye(3, dtype=np.float32)[probabilities.argmax(axis=1)]


def as_served(probabilities: np.ndarray) -> np.ndarray:
    """What serving samples from with no rule firing: the policy plus the exploration floor."""
    settings = Settings()
    mask = (True, True, True)
    return np.array(
        [
            serving_distribution(p, mask, settings.exploration_floor, settings.explore_actions)
            for p in probabilities.astype(np.float64)
        ]
    )


def expected_immediate_reward(labels: np.ndarray, amounts: np.ndarray, rewards: RewardTable) -> np.ndarray:
    """(n, 3): a row's expected reward for each action, over the simulator's chance, this step only."""
    sim = rewards.simulation
    names, base, per_amount = reward_arrays(rewards)
    o = {n: i for i, n in enumerate(names)}
    amounts = amounts[:, None]

    def value(outcome: str) -> np.ndarray:  # (n, 3): the outcome's reward for each action
        return base[o[outcome]][None, :] + per_amount[o[outcome]][None, :] * amounts

    give_up, abandon = sim.fraud_gives_up_probability_on_throttle, sim.abandon_probability_on_throttle
    fraud = value("chargeback")
    fraud[:, 1] = give_up * value("fraud")[:, 1] + (1 - give_up) * value("chargeback")[:, 1]
    fraud[:, 2] = value("fraud")[:, 2]
    good = value("success")
    good[:, 1] = abandon * value("abandoned")[:, 1] + (1 - abandon) * value("success")[:, 1]
    good[:, 2] = value("false_positive")[:, 2]
    return np.where(labels.astype(bool)[:, None], fraud, good)


@dataclass(frozen=True)
class Layout:
    """The replay order of the held-out rows: by entity, time order kept inside each (as the simulator)."""

    order: np.ndarray  # replay position -> held-out row
    group: np.ndarray  # replay position -> entity index
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, held: HeldOutRows) -> Layout:
        order = np.argsort(held.entity_ids, kind="stable")
        ids = held.entity_ids[order]
        new = np.r_[True, ids[1:] != ids[:-1]]
        starts = np.flatnonzero(new)
        return cls(order, np.cumsum(new) - 1, starts, np.r_[starts[1:], len(ids)])


@dataclass(frozen=True)
class Expectation:
    """A policy's exact expected outcomes in the simulator (no sampling noise), in replay order.

    The replay is open-loop, so the only randomness is whether each step is reached: the product of
    the earlier steps' chances not to end the episode (block: ends; throttle: a good user abandons, a
    fraudster gives up, with the rewards.yaml probabilities). E[reward] = sum of P(reached) x E[step].
    """

    reached: np.ndarray  # (n,) P(the step happens)
    step_reward: np.ndarray  # (n,) E[reward of the step | reached]
    per_entity: dict[str, np.ndarray]  # expected totals per entity


def expectation(
    probabilities: np.ndarray, held: HeldOutRows, layout: Layout, rewards: RewardTable
) -> Expectation:
    sim = rewards.simulation
    p = probabilities[layout.order].astype(np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    bad = held.labels[layout.order].astype(bool)
    amounts = held.amounts[layout.order]
    immediate = expected_immediate_reward(bad, amounts, rewards)
    give_up, abandon = sim.fraud_gives_up_probability_on_throttle, sim.abandon_probability_on_throttle
    survive = np.where(bad[:, None], [1.0, 1.0 - give_up, 0.0], [1.0, 1.0 - abandon, 0.0])
    step_reward = (p * immediate).sum(axis=1)
    step_survive = (p * survive).sum(axis=1)
    reached = np.empty_like(step_survive)
    for a, b in zip(layout.starts, layout.ends, strict=True):
        reached[a] = 1.0
        reached[a + 1 : b] = np.cumprod(step_survive[a : b - 1])
    good = ~bad
    weights = {
        "reward": reached * step_reward,
        "decisions": reached,
        "fraud_reached": reached * bad,
        "fraud_stopped": reached * bad * (p[:, 2] + p[:, 1] * give_up),
        "fraud_amount_lost": reached * bad * (p[:, 0] + p[:, 1] * (1 - give_up)) * amounts,
        "good_throttled": reached * good * p[:, 1],
        "good_blocked": reached * good * p[:, 2],
        "good_abandoned": reached * good * p[:, 1] * abandon,
    }
    n = len(layout.starts)
    return Expectation(
        reached,
        step_reward,
        {k: np.bincount(layout.group, weights=w, minlength=n) for k, w in weights.items()},
    )


def compare(
    expectations: dict[str, Expectation], reference: str, seed: int, n_bootstrap: int = 2000
) -> dict[str, dict[str, float]]:
    """Per policy: totals, reward per decision and per entity with 95% CIs (bootstrap over entities),
    and the paired differences to ``reference`` (same resamples for every policy)."""
    n = len(next(iter(expectations.values())).per_entity["reward"])
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_bootstrap)])
    weights = weights.astype(np.float64)

    def metrics(ex: Expectation) -> tuple[np.ndarray, np.ndarray, float, float]:
        reward, decisions = ex.per_entity["reward"], ex.per_entity["decisions"]
        boot_reward, boot_decisions = weights @ reward, weights @ decisions
        return boot_reward / boot_decisions, boot_reward / n, reward.sum() / decisions.sum(), reward.sum() / n

    ref = metrics(expectations[reference])
    out = {}
    for name, ex in expectations.items():
        per_decision, per_entity, point_decision, point_entity = metrics(ex)
        row = {k: float(v.sum()) for k, v in ex.per_entity.items()}
        for metric, boot, point, ref_boot, ref_point in (
            ("per_decision", per_decision, point_decision, ref[0], ref[2]),
            ("per_entity", per_entity, point_entity, ref[1], ref[3]),
        ):
            diff = boot - ref_boot
            row |= {
                metric: float(point),
                f"{metric}_ci_low": float(np.percentile(boot, 2.5)),
                f"{metric}_ci_high": float(np.percentile(boot, 97.5)),
                f"{metric}_diff": float(point - ref_point),
                f"{metric}_diff_ci_low": float(np.percentile(diff, 2.5)),
                f"{metric}_diff_ci_high": float(np.percentile(diff, 97.5)),
            }
        out[name] = row
    return out


def threshold_grid(training_risk: np.ndarray) -> list[float]:
    """The grid ``best_threshold_policy`` searches: fixed steps and upper quantiles of the training risk."""
    quantiles = np.quantile(training_risk, [0.8, 0.9, 0.95, 0.98, 0.99, 0.995])
    fixed = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    return [*sorted({float(v) for v in [*fixed, *quantiles]}), 1.01]


def thresholds_by_total(rows: HeldOutRows, rewards: RewardTable, grid: list[float]) -> tuple[float, float]:
    """The throttle / block thresholds with the most expected total reward on ``rows``."""
    layout = Layout.of(rows)
    states = rows.risk[:, None]
    best, best_value = (1.01, 1.01), -np.inf
    for t_throttle in grid:
        for t_block in grid:
            if t_block < t_throttle:
                continue
            probabilities = threshold_probabilities(0, t_throttle, t_block)(states)
            value = expectation(probabilities, rows, layout, rewards).per_entity["reward"].sum()
            if value > best_value:
                best, best_value = (t_throttle, t_block), value
    return best


def decompose(
    held: HeldOutRows,
    layout: Layout,
    reference: tuple[str, np.ndarray, Expectation],
    other: tuple[str, np.ndarray, Expectation],
) -> list[dict[str, Any]]:
    """The expected total reward difference other - reference, split exactly over the rows: rows where
    the two policies' most likely actions differ (by true label and the two actions), then the rows where
    they agree (which still differ in how likely they are to be reached, and by a stochastic policy's
    other actions). Each row: expected reward = P(reached) x E[step reward]."""
    (_, p_ref, e_ref), (_, p_other, e_other) = reference, other
    a_ref, a_other = p_ref[layout.order].argmax(axis=1), p_other[layout.order].argmax(axis=1)
    bad = held.labels[layout.order].astype(bool)
    risk = held.risk[layout.order]
    v_ref, v_other = e_ref.reached * e_ref.step_reward, e_other.reached * e_other.step_reward
    cells = []
    for label in (False, True):
        for a in range(3):
            for b in range(3):
                sel = (bad == label) & (a_ref == a) & (a_other == b)
                if a == b or not sel.any():
                    continue
                cells.append(
                    {
                        "label": "fraud" if label else "good",
                        "reference": ACTIONS[a],
                        "other": ACTIONS[b],
                        "rows": int(sel.sum()),
                        "mean_risk": float(risk[sel].mean()),
                        "reached_reference": float(e_ref.reached[sel].sum()),
                        "reached_other": float(e_other.reached[sel].sum()),
                        "reward_reference": float(v_ref[sel].sum()),
                        "reward_other": float(v_other[sel].sum()),
                    }
                )
    for label in (False, True):
        sel = (bad == label) & (a_ref == a_other)
        cells.append(
            {
                "label": "fraud" if label else "good",
                "reference": "same",
                "other": "same",
                "rows": int(sel.sum()),
                "mean_risk": float(risk[sel].mean()) if sel.any() else 0.0,
                "reached_reference": float(e_ref.reached[sel].sum()),
                "reached_other": float(e_other.reached[sel].sum()),
                "reward_reference": float(v_ref[sel].sum()),
                "reward_other": float(v_other[sel].sum()),
            }
        )
    return cells


def sampled_check(
    held: HeldOutRows, policies: dict[str, np.ndarray], rewards: RewardTable, seeds: range
) -> dict[str, dict[str, float]]:
    """The simulator's own (sampled) reward per decision over several seeds: mean and sd. Checks the
    exact expectations above and shows how much one draw (the training report's) can move."""
    histories = _row_histories(held)
    out = {}
    for name, probabilities in policies.items():
        values = [
            evaluate_policy(name, _by_row(probabilities), histories, rewards, seed=seed, n_bootstrap=1)
            for seed in seeds
        ]
        per_decision = [r.reward_per_decision for r in values]
        out[name] = {"mean": float(np.mean(per_decision)), "sd": float(np.std(per_decision))}
    return out


def analyse(report: TrainReport, rewards: RewardTable, seed: int) -> dict[str, Any]:
    held = report.heldout
    assert held is not None
    layout = Layout.of(held)
    threshold_name = next(p.name for p in report.policies if p.name.startswith("risk thresholds"))
    policies = dict(held.probabilities)
    policies[PPO_GREEDY] = greedy(policies[PPO])
    policies[PPO_SERVED] = as_served(policies[PPO])
    assert report.training is not None
    grid = threshold_grid(report.training.risk)
    # The same search as the training report's, but maximising total reward instead of reward per decision
    # (fair: chosen on the training part); and the same on the held-out part itself (an upper bound).
    by_total = "thresholds by total reward {:.3g}/{:.3g}".format(
        *thresholds_by_total(report.training, rewards, grid)
    )
    oracle = "{} {:.3g}/{:.3g}".format(ORACLE, *thresholds_by_total(held, rewards, grid))
    for name in (by_total, oracle):
        t_throttle, t_block = (float(v) for v in name.rsplit(" ", 1)[1].split("/"))
        policies[name] = threshold_probabilities(0, t_throttle, t_block)(held.risk[:, None])
    expectations = {name: expectation(p, held, layout, rewards) for name, p in policies.items()}
    ppo_p = policies[PPO]
    action_share = {
        name: [float(v) for v in np.bincount(prob.argmax(axis=1), minlength=3) / len(prob)]
        for name, prob in policies.items()
    }
    differ = policies[threshold_name].argmax(axis=1) != ppo_p.argmax(axis=1)
    return {
        "threshold_policy": threshold_name,
        "oracle_policy": oracle,
        "thresholds_by_total": by_total,
        "entities": len(layout.starts),
        "expected": compare(expectations, threshold_name, seed),
        "exploration_cost": compare(
            {
                PPO_GREEDY: expectations[PPO_GREEDY],
                PPO: expectations[PPO],
                PPO_SERVED: expectations[PPO_SERVED],
            },
            PPO_GREEDY,
            seed,
        ),
        "ppo_confidence": {
            "mean_max_probability": float(ppo_p.max(axis=1).mean()),
            "rows_below_0.9": float((ppo_p.max(axis=1) < 0.9).mean()),
        },
        "action_share": action_share,
        "disagreement_rows": int(differ.sum()),
        "disagreement_entities": len(np.unique(held.entity_ids[differ])),
        "decomposition": decompose(
            held,
            layout,
            (threshold_name, policies[threshold_name], expectations[threshold_name]),
            (PPO, ppo_p, expectations[PPO]),
        ),
        "sampled_check": sampled_check(
            held, {k: v for k, v in policies.items() if k != PPO_SERVED}, rewards, range(seed, seed + SEEDS)
        ),
    }


# --- output


def _ci(value: float, low: float, high: float, signed: bool = False) -> str:
    f = "+.3f" if signed else ".3f"
    return f"{value:{f}} [{low:{f}}, {high:{f}}]"


def _diff(e: dict[str, float], metric: str = "per_entity") -> str:
    return _ci(e[f"{metric}_diff"], e[f"{metric}_diff_ci_low"], e[f"{metric}_diff_ci_high"], signed=True)


def markdown(run: dict[str, Any], reports: list[PolicyReport]) -> str:
    a = run["analysis"]
    rm = run["risk_metrics"]
    lines = [
        f"**{run['data_label']}** · {run['data']['events']:,} events; trained on the first "
        f"{run['data']['train_rows']:,}, judged on the last {run['data']['test_rows']:,} (30% of time, "
        f"{a['entities']:,} entities) · risk model held-out ROC-AUC {rm['roc_auc']:.3f}, PR-AUC "
        f"{rm['pr_auc']:.3f}, base rate {rm['base_rate']:.3%} · PPO {run['timesteps']:,} steps · seed "
        f"{run['seed']} · run {run['wall_s'] / 60:.1f} min · commit `{run['git_commit']}`",
        "",
        "As the training report prints it (one simulator draw; CI: bootstrap over entities):",
        "",
        "| policy | reward / decision [95% CI] | fraud caught / reached | fraud $ lost "
        "| good users throttled | good users blocked | decisions |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        lines.append(
            f"| {r.name} | {_ci(r.reward_per_decision, r.ci_low, r.ci_high)} "
            f"| {r.fraud_stopped:,}/{r.fraud_events:,} ({r.fraud_caught_rate:.0%}) "
            f"| {r.fraud_amount_lost:,.0f} | {r.good_throttled:,} | {r.good_blocked:,} | {r.decisions:,} |"
        )
    lines += [
        "",
        "Exact expectations (no simulator draw: every step weighted by its probability of being reached), "
        "95% CIs by bootstrap over entities, differences to the best threshold policy paired (same "
        "resamples):",
        "",
        "| policy | reward / decision | - best threshold | total reward / entity | - best threshold "
        "| fraud caught / reached | fraud $ lost | good throttled | good blocked | good abandoned "
        "| decisions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = [r.name for r in reports]
    for name, e in a["expected"].items():
        label = name if name in names else f"{name} †"
        diffs = [
            "—" if name == a["threshold_policy"] else _diff(e, m) for m in ("per_decision", "per_entity")
        ]
        caught = e["fraud_stopped"] / e["fraud_reached"] if e["fraud_reached"] else 0.0
        lines.append(
            f"| {label} | {_ci(e['per_decision'], e['per_decision_ci_low'], e['per_decision_ci_high'])} "
            f"| {diffs[0]} | {_ci(e['per_entity'], e['per_entity_ci_low'], e['per_entity_ci_high'])} "
            f"| {diffs[1]} | {e['fraud_stopped']:,.1f}/{e['fraud_reached']:,.1f} ({caught:.0%}) "
            f"| {e['fraud_amount_lost']:,.0f} | {e['good_throttled']:,.1f} | {e['good_blocked']:,.1f} "
            f"| {e['good_abandoned']:,.1f} | {e['decisions']:,.0f} |"
        )
    hits = ", ".join(f"{k} {v:,}" for k, v in run["rules"]["hits"].items() if v)
    cost = a["exploration_cost"]
    lines += [
        "",
        "† diagnostics, not among the four policies: PPO greedy = PPO's most likely action instead of a "
        "sample; PPO as served = PPO with the serving exploration floor (no rule firing); thresholds by "
        "total reward = the training report's threshold search on the same training part, maximising "
        "expected total reward instead of reward per decision (a fair baseline); oracle thresholds = the "
        "same search on the held-out part itself (an upper bound for fixed thresholds, not a fair "
        "policy).",
        "",
        f"- Rules that fired on held-out events (rules only; counted on every row, reached or not): "
        f"{hits or 'none'}. Rules reading a model score: "
        + (", ".join(f"{k} ({', '.join(v)})" for k, v in run["rules"]["model_based"].items()) or "none")
        + ".",
        f"- Exploration cost (exact, per entity, paired): PPO sampled - PPO greedy {_diff(cost[PPO])}; "
        f"PPO as served - PPO greedy {_diff(cost[PPO_SERVED])}. PPO's mean probability of its most likely "
        f"action: {a['ppo_confidence']['mean_max_probability']:.3f} "
        f"({a['ppo_confidence']['rows_below_0.9']:.1%} of rows below 0.9).",
        f"- Sampled check (the simulator's own replay, reward / decision over {SEEDS} seeds, mean ± sd): "
        + "; ".join(f"{name} {v['mean']:.3f} ± {v['sd']:.3f}" for name, v in a["sampled_check"].items())
        + ".",
        "- Most likely action, share of held-out rows (allow / throttle / block): "
        + "; ".join(
            f"{name} " + " / ".join(f"{s:.1%}" for s in share) for name, share in a["action_share"].items()
        )
        + ".",
        "",
        f"Where the best threshold policy and PPO differ ({a['disagreement_rows']:,} rows of "
        f"{a['disagreement_entities']:,} entities disagree on the most likely action). Exact split of the "
        "expected total reward difference; a row counts P(reached) x E[step reward]:",
        "",
        "| true label | threshold | PPO | rows | mean risk | reached: threshold / PPO "
        "| reward: threshold | reward: PPO | PPO - threshold |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    total = 0.0
    for c in a["decomposition"]:
        delta = c["reward_other"] - c["reward_reference"]
        total += delta
        lines.append(
            f"| {c['label']} | {c['reference']} | {c['other']} | {c['rows']:,} | {c['mean_risk']:.3f} "
            f"| {c['reached_reference']:,.1f} / {c['reached_other']:,.1f} | {c['reward_reference']:,.1f} "
            f"| {c['reward_other']:,.1f} | {delta:+,.1f} |"
        )
    lines.append(f"| **total** | | | | | | | | **{total:+,.1f}** |")
    return "\n".join(lines)


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=("synthetic", "ulb"), default="synthetic")
    parser.add_argument("--timesteps", type=int, default=PPO_TIMESTEPS, help="PPO steps (train's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--entities", type=int, default=3000, help="synthetic: entities")
    parser.add_argument("--days", type=float, default=14.0, help="synthetic: days")
    parser.add_argument("--no-save", action="store_true", help="do not append to policies_results.jsonl")
    args = parser.parse_args(argv)

    console = Console(width=160)
    started = time.perf_counter()
    data, features_path, label = load_data(args.source, args.entities, args.days, args.seed)
    console.print(f"data: {data.summary()}")
    rewards = RewardTable.load(CONFIG / "rewards.yaml")
    with tempfile.TemporaryDirectory(prefix="bench-policies-") as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'registry.db'}")
        migrate(engine)
        try:
            with RichProgress(console) as progress:
                report = train_all(
                    data,
                    features_path,
                    rewards,
                    ModelRegistry(Repository(engine), Path(tmp) / "models"),
                    TrainConfig(ppo_timesteps=args.timesteps, seed=args.seed),
                    progress=progress,
                    promote=False,
                    source=args.source,
                    rules=CONFIG / "rules.yaml",
                )
        finally:
            engine.dispose()
    for table in report_tables(report):
        console.print(table)
    with console.status("analysing: paired bootstrap, PPO greedy, disagreements"):
        t0 = time.perf_counter()
        analysis = analyse(report, rewards, args.seed)
        analysis_s = time.perf_counter() - t0
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    run = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": args.source,
        "data_label": label,
        "timesteps": args.timesteps,
        "seed": args.seed,
        "git_commit": _git("rev-parse", "--short", "HEAD") or None,
        "git_dirty_files": len(dirty.splitlines()) if dirty else 0,
        "nproc": len(__import__("os").sched_getaffinity(0)),
        "python": host.python_version(),
        "data": report.data,
        "risk_metrics": report.risk_metrics,
        "policies": [
            {"name": r.name, **_report_dict(r), "fraud_stopped": r.fraud_stopped} for r in report.policies
        ],
        "rules": report.rules,
        "analysis": analysis,
        "timings": report.timings | {"analysis_s": analysis_s},
        "wall_s": time.perf_counter() - started,
    }
    text = markdown(run, report.policies)
    console.print()
    print(text)
    if not args.no_save:
        with RESULTS.open("a", encoding="utf-8") as out:
            out.write(json.dumps(run, default=float) + "\n")
        console.print(f"\nappended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
