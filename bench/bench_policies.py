"""Policies on held-out time: allow-all, best thresholds, Bayes minimum risk, rules only, PPO.

    .venv/bin/python bench/bench_policies.py --source synthetic            # 3000 entities x 14 days
    .venv/bin/python bench/bench_policies.py --source ulb                  # ULB credit cards, 284,807 rows
    .venv/bin/python bench/bench_policies.py --source csv --path ../shared/data/cards-dev.csv.gz \
        --mapping ../shared/data/cards-dev.yaml                            # any labelled CSV + mapping

What it does: trains exactly as ``decision-platform train`` does (``train_all``: models fit on the
earlier 70% of time, judged on the later 30%) into a temporary registry (SQLite + model files in a temp
dir: var/ is not touched, except that ``--source ulb`` caches the downloaded CSV in var/datasets), with
the rules of config/rules.yaml for the "rules only" row. Then it looks at why the policies differ:

- the training report's comparison (training/yardstick.py): every policy's exact expected total reward
  per entity, paired to the best baseline on the same bootstrap resamples of held-out entities, and which
  policy ``train`` would serve;
- PPO greedy: the PPO policy's most likely action instead of a sample from it (what sampling from a not
  fully confident policy loses);
- the exploration cost: the served policy with the serving exploration floor against the same policy
  without it (what the logged data for off-policy evaluation costs), and the floor's effective sample
  size for evaluating the other policies off-policy on the data it logs;
- disagreements: the rows where the best baseline and PPO (most likely action) differ, by true label,
  with the exact split of the expected total reward difference.

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
from decision_platform.models.baseline_policy import BayesPolicy
from decision_platform.models.policy import serving_distributions
from decision_platform.models.registry import ModelRegistry
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.training import PPO_TIMESTEPS
from decision_platform.training.improvement import IMPROVED
from decision_platform.training.simulator import EntityHistory, evaluate_policy, group_histories
from decision_platform.training.train import (
    PPO_CLONE,
    PPO_POLICY,
    HeldOutRows,
    TrainConfig,
    TrainReport,
    served_choices,
    train_all,
    under_rules,
)
from decision_platform.training.yardstick import (
    Expectation,
    Replay,
    best_thresholds,
    compare,
    expectation,
    threshold_grid,
)

CONFIG = PROJECT_ROOT / "config"
RESULTS = Path(__file__).with_name("policies_results.jsonl")
ACTIONS = ("allow", "throttle", "block")
PPO = PPO_POLICY
SERVED_FLOOR = "served, with the exploration floor"
PPO_GREEDY = "PPO greedy (most likely action)"
ORACLE = "oracle thresholds"
PPO_SERVED = "PPO as served (exploration floor)"
SEEDS = 20  # simulator seeds of the sampled check


def load_data(
    source: str, entities: int, days: float, seed: int, path: Path | None = None, mapping: Path | None = None
) -> tuple[LabelledEvents, Path, str]:
    """(events, feature definitions, source label), as ``decision-platform train --source`` loads them."""
    if source == "synthetic":
        from decision_platform.data import generate

        return (
            generate(n_entities=entities, days=days, seed=seed),
            CONFIG / "features.yaml",
            f"synthetic ({entities} entities x {days:g} days, seed {seed})",
        )
    from decision_platform.data.csv_import import find_ulb_csv, load_csv

    if source == "ulb":
        path = find_ulb_csv(get_settings().model_dir.parent / "datasets")
        mapping = CONFIG / "datasets" / "ulb_creditcard.yaml"
    if path is None or mapping is None:
        raise SystemExit("--source csv needs --path and --mapping")
    features = mapping.with_name(mapping.stem + ".features.yaml")
    return (
        load_csv(path, mapping, progress=True),
        features if features.exists() else CONFIG / "features.yaml",
        f"{source}:{path.name}",
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


def as_served(
    probabilities: np.ndarray, masks: np.ndarray | None, explore: np.ndarray | None = None
) -> np.ndarray:
    """What serving samples from: the policy under the rules' ``masks`` (none: no rule firing) plus the
    exploration floor (on the rows where ``explore`` is true; every row by default)."""
    settings = Settings()
    p = probabilities.astype(np.float64)
    masks = np.ones(p.shape, dtype=bool) if masks is None else masks
    floored = serving_distributions(p, masks, settings.exploration_floor, settings.explore_actions)
    if explore is None:
        return floored
    return np.where(explore[:, None], floored, serving_distributions(p, masks, 0.0, settings.explore_actions))


#: Adaptive floor: explore only where the two best actions' expected rewards (Bayes, from the calibrated
#: risk and the amount) are within this many reward units of each other.
CLOSE = (1.0, 3.0)


def closeness(held: HeldOutRows, rewards: RewardTable) -> np.ndarray:
    """Per row, the expected-reward gap between the best and the second-best action given the risk."""
    bayes = BayesPolicy(rewards.expected_step_values(), ["risk"], np.zeros(0), np.zeros(0))
    value = np.sort(bayes.expected_rewards(held.risk, held.amounts), axis=1)
    return value[:, -1] - value[:, -2]


def support(target: np.ndarray, logging: np.ndarray) -> dict[str, float]:
    """How well data logged by ``logging`` supports evaluating ``target`` off-policy (IPS weights
    w = target(a) / logging(a), a drawn from ``logging``): the expected effective sample size
    (sum w)^2 / sum w^2 in expectation, n mean(E[w])^2 / mean(E[w^2]), as a share of rows; and the
    target's mean probability on actions the logger never takes (no estimator sees those)."""
    logged = logging > 1e-12
    first = np.where(logged, target, 0.0).sum(axis=1)
    second = np.where(logged, target**2 / np.where(logged, logging, 1.0), 0.0).sum(axis=1)
    ess_share = float(first.mean() ** 2 / second.mean()) if second.mean() > 0 else 0.0
    return {"ess_share": ess_share, "unsupported": float(1.0 - first.mean())}


def decompose(
    held: HeldOutRows,
    replay: Replay,
    reference: tuple[np.ndarray, Expectation],
    other: tuple[np.ndarray, Expectation],
) -> list[dict[str, Any]]:
    """The expected total reward difference other - reference, split exactly over the rows: rows where
    the two policies' most likely actions differ (by true label and the two actions), then the rows where
    they agree (which still differ in how likely they are to be reached, and by a stochastic policy's
    other actions). Each row: expected reward = P(reached) x E[step reward]."""
    (p_ref, e_ref), (p_other, e_other) = reference, other
    a_ref, a_other = p_ref[replay.order].argmax(axis=1), p_other[replay.order].argmax(axis=1)
    bad = replay.labels
    risk = held.risk[replay.order]
    v_ref, v_other = e_ref.reached * e_ref.step_reward, e_other.reached * e_other.step_reward

    def cell(sel: np.ndarray, label: bool, ref: str, oth: str) -> dict[str, Any]:
        return {
            "label": "fraud" if label else "good",
            "reference": ref,
            "other": oth,
            "rows": int(sel.sum()),
            "mean_risk": float(risk[sel].mean()) if sel.any() else 0.0,
            "reached_reference": float(e_ref.reached[sel].sum()),
            "reached_other": float(e_other.reached[sel].sum()),
            "reward_reference": float(v_ref[sel].sum()),
            "reward_other": float(v_other[sel].sum()),
        }

    cells = [
        cell(sel, label, ACTIONS[a], ACTIONS[b])
        for label in (False, True)
        for a in range(3)
        for b in range(3)
        if a != b
        for sel in ((bad == label) & (a_ref == a) & (a_other == b),)
        if sel.any()
    ]
    cells += [cell((bad == label) & (a_ref == a_other), label, "same", "same") for label in (False, True)]
    return cells


def sampled_check(
    held: HeldOutRows, policies: dict[str, np.ndarray], rewards: RewardTable, seeds: range
) -> dict[str, dict[str, float]]:
    """The simulator's own (sampled) total reward per entity over several seeds: mean and sd. Checks
    the exact expectations and shows how much one draw can move."""
    histories = _row_histories(held)
    out = {}
    for name, probabilities in policies.items():
        values = [
            evaluate_policy(name, _by_row(probabilities), histories, rewards, seed=seed, n_bootstrap=1)
            for seed in seeds
        ]
        per_entity = [r.reward_per_decision * r.decisions / len(histories) for r in values]
        out[name] = {"mean": float(np.mean(per_entity)), "sd": float(np.std(per_entity))}
    return out


def analyse(report: TrainReport, rewards: RewardTable, seed: int) -> dict[str, Any]:
    held, training = report.heldout, report.training
    assert held is not None and training is not None
    replay = Replay.of(held.entity_ids, held.labels, held.amounts)
    policies = dict(held.probabilities)
    # The warm start's teacher (fitted policy iteration) and the cloned actor before any PPO update.
    policies.update(report.diagnostics)
    served = report.served
    policies[PPO_GREEDY] = greedy(policies[PPO])
    # The best thresholds on the held-out part itself: an upper bound for fixed thresholds, not a policy.
    grid = threshold_grid(training.risk)
    served_under = served_choices(held.masks) if held.masks is not None else None
    oracle = "{} {:.3g}/{:.3g}".format(
        ORACLE, *best_thresholds(held.risk, replay, rewards, grid, served_under)
    )
    t_throttle, t_block = (float(v) for v in oracle.rsplit(" ", 1)[1].split("/"))
    oracle_p = np.eye(3)[np.where(held.risk >= t_block, 2, np.where(held.risk >= t_throttle, 1, 0))]
    policies[oracle] = oracle_p if held.masks is None else under_rules(oracle_p, held.masks)
    served_p = policies[served]
    policies[SERVED_FLOOR] = as_served(served_p, held.masks)
    gap = closeness(held, rewards)
    adaptive = {
        f"{SERVED_FLOOR} where the gap < {d:g}": as_served(served_p, held.masks, gap < d) for d in CLOSE
    }
    expectations = {name: expectation(p, replay, rewards) for name, p in {**policies, **adaptive}.items()}
    action_share = {
        name: [float(v) for v in np.bincount(prob.argmax(axis=1), minlength=3) / len(prob)]
        for name, prob in policies.items()
    }
    best = report.best_baseline
    differ = policies[best].argmax(axis=1) != policies[PPO].argmax(axis=1)
    ppo_p = policies[PPO]
    return {
        "best_baseline": best,
        "served": served,
        "oracle_policy": oracle,
        "entities": replay.entities,
        "expected": {
            k: c.as_dict() for k, c in compare({k: expectations[k] for k in policies}, best, seed).items()
        },
        "exploration_cost": {
            k: c.as_dict()
            for k, c in compare(
                {k: expectations[k] for k in (served, SERVED_FLOOR, *adaptive)}, served, seed
            ).items()
        },
        "explored_rows": {k: float((gap < d).mean()) for k, d in zip(adaptive, CLOSE, strict=True)},
        "support": {
            logger: {
                name: support(np.asarray(p, dtype=np.float64), logged)
                for name, p in policies.items()
                if name not in (SERVED_FLOOR, served)
            }
            for logger, logged in {SERVED_FLOOR: policies[SERVED_FLOOR], **adaptive}.items()
        },
        "ppo_confidence": {
            "mean_max_probability": float(ppo_p.max(axis=1).mean()),
            "rows_below_0.9": float((ppo_p.max(axis=1) < 0.9).mean()),
        },
        "action_share": action_share,
        "disagreement_rows": int(differ.sum()),
        "disagreement_entities": len(np.unique(held.entity_ids[differ])),
        "decomposition": decompose(
            held, replay, (policies[best], expectations[best]), (ppo_p, expectations[PPO])
        ),
        "sampled_check": sampled_check(
            held,
            {k: v for k, v in policies.items() if k in (best, PPO)},
            rewards,
            range(seed, seed + SEEDS),
        ),
    }


# --- output


def _ci(i: dict[str, float], signed: bool = False) -> str:
    f = "+.3f" if signed else ".3f"
    return f"{i['value']:{f}} [{i['low']:{f}}, {i['high']:{f}}]"


def _fine_tuning(info: dict[str, Any]) -> str:
    if not info:
        return "not recorded"
    parts = []
    if "clone_accuracy" in info:
        parts.append(f"cloning accuracy {info['clone_accuracy']:.1%}")
    if "warm_start_validation" in info:
        values, diff = info["warm_start_validation"], info["warm_start_diff"]
        parts.append(
            f"warm start: fitted-Q teacher {values['teacher']:.2f} vs Bayes {values['bayes']:.2f} per "
            f"validation episode (paired {diff[0]:+.2f} [{diff[1]:+.2f}, {diff[2]:+.2f}]), cloned from the "
            f"{info['warm_start_used']}"
        )
    elif "start_validation" in info:
        parts.append(f"warm start's teacher {info['start_validation']:.2f} per validation episode")
    if "sharpening" in info:
        factors = " / ".join(f"{f:g}" for f in info["sharpening_factors"])
        values = ", ".join(f"{v:.2f}" for v in info["sharpening_validation"])
        parts.append(f"clone's logits x {factors}: {values}; kept x{info['sharpening']:g}")
    if "validation" in info:
        values = ", ".join(f"{v:.2f}" for v in info["validation"])
        parts.append(f"actor after each round (0 = the clone) {values}; kept round {info['kept_round']}")
    if "round_diffs" in info:
        diffs = ", ".join(f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]" for d in info["round_diffs"])
        parts.append(f"each round - the clone on validation (kept only with a CI above zero): {diffs}")
    return "; ".join(parts)


def _without_rules(judged: dict[str, Any]) -> str:
    if not judged:
        return "not recorded"
    best = judged["best_baseline"]
    return f"best baseline {best}, would serve {judged['served']}; " + "; ".join(
        f"{c['name']} {c['per_entity']['value']:.3f}"
        + ("" if c["name"] == best else f" ({_ci(c['per_entity_diff'], True)})")
        for c in judged["policies"]
    )


def markdown(run: dict[str, Any]) -> str:
    a = run["analysis"]
    rm = run["risk_metrics"]
    best, served = a["best_baseline"], a["served"]
    lines = [
        f"**{run['data_label']}** · {run['data']['events']:,} events; trained on the first "
        f"{run['data']['train_rows']:,}, judged on the last {run['data']['test_rows']:,} (30% of time, "
        f"{a['entities']:,} entities) · risk model held-out ROC-AUC {rm['roc_auc']:.3f}, PR-AUC "
        f"{rm['pr_auc']:.3f}, base rate {rm['base_rate']:.3%} · PPO {run['timesteps']:,} steps, warm start "
        f"{run['warm_start']}{'' if run.get('step_value_inputs') else ' (actor without step values)'} · "
        f"seed {run['seed']} · run {run['wall_s'] / 60:.1f} min · commit "
        f"`{run['git_commit']}`",
        "",
        f"Exact expected outcomes on held-out time, every policy under the rules' masks as served; 95% CIs "
        f"by bootstrap over entities; differences paired to the best baseline (**{best}**). `train` "
        f"serves: **{served}**.",
        "",
        "| policy | total reward / entity | - best baseline | reward / decision | - best baseline "
        "| fraud caught / reached | fraud $ lost | good throttled | good blocked | good abandoned "
        "| decisions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    compared = [p["name"] for p in run["policies"]]
    for name, e in a["expected"].items():
        label = name if name in compared else f"{name} †"
        if name == served:
            label = f"**{label}** (served)"
        diffs = ["—" if name == best else _ci(e[f"{m}_diff"], True) for m in ("per_entity", "per_decision")]
        caught = e["fraud_stopped"] / e["fraud_reached"] if e["fraud_reached"] else 0.0
        lines.append(
            f"| {label} | {_ci(e['per_entity'])} | {diffs[0]} | {_ci(e['per_decision'])} | {diffs[1]} "
            f"| {e['fraud_stopped']:,.1f}/{e['fraud_reached']:,.1f} ({caught:.0%}) "
            f"| {e['fraud_amount_lost']:,.0f} | {e['good_throttled']:,.1f} | {e['good_blocked']:,.1f} "
            f"| {e['good_abandoned']:,.1f} | {e['decisions']:,.0f} |"
        )
    hits = ", ".join(f"{k} {v:,}" for k, v in run["rules"]["hits"].items() if v)
    costs = "; ".join(
        f"{k} {_ci(c['per_entity_diff'], True)}"
        + (f" (explores {a['explored_rows'][k]:.1%} of rows)" if k in a["explored_rows"] else "")
        for k, c in a["exploration_cost"].items()
        if k != served
    )
    supports = [
        f"logged by {logger}: "
        + ", ".join(
            f"{name} {v['ess_share']:.1%}"
            + (f" ({v['unsupported']:.2%} of its mass unsupported)" if v["unsupported"] > 5e-5 else "")
            for name, v in rows.items()
        )
        for logger, rows in a["support"].items()
    ]
    lines += [
        "",
        f"† diagnostics, not among the compared policies: {PPO_GREEDY} = PPO's most likely action instead "
        f"of a sample; {IMPROVED} = PPO's teacher, the Bayes policy improved by fitted policy iteration "
        f"(continuation values, not servable); {PPO_CLONE} = the PPO actor cloned from its warm start "
        f"(logits sharpened as chosen on validation) "
        f"before any PPO update; {ORACLE} = the threshold search run on the held-out part itself (an "
        f"upper bound for fixed thresholds, not a fair policy); {SERVED_FLOOR} = the served policy with "
        "the serving exploration floor (under the rules).",
        "",
        f"- Exploration cost (exact, per entity, paired to {served} without any floor): {costs}. The gap is "
        "the expected-reward difference of the two best actions given the calibrated risk and the amount.",
        "- Off-policy support (expected effective sample size of IPS as a share of rows, per target): "
        + "; ".join(supports)
        + ".",
        f"- Rules that fired on held-out events (rules only; counted on every row, reached or not): "
        f"{hits or 'none'}.",
        "- Without the rules (each policy's own probabilities, the yardstick before the rules' masks; it "
        "decides nothing): " + _without_rules(run.get("without_rules", {})) + ".",
        "- PPO fine-tuning (validation episodes: the last training window of 30% of the entities, never "
        "trained on): " + _fine_tuning(run.get("fine_tuning", {})) + ".",
        "- PPO's mean probability of its most likely action: "
        f"{a['ppo_confidence']['mean_max_probability']:.3f} "
        f"({a['ppo_confidence']['rows_below_0.9']:.1%} of rows below 0.9).",
        f"- Sampled check (the simulator's own replay, total reward / entity over {SEEDS} seeds, mean ± sd): "
        + "; ".join(f"{name} {v['mean']:.3f} ± {v['sd']:.3f}" for name, v in a["sampled_check"].items())
        + ".",
        "- Most likely action, share of held-out rows (allow / throttle / block): "
        + "; ".join(
            f"{name} " + " / ".join(f"{s:.1%}" for s in share) for name, share in a["action_share"].items()
        )
        + ".",
        "",
        f"Where {best} and PPO differ ({a['disagreement_rows']:,} rows of {a['disagreement_entities']:,} "
        "entities disagree on the most likely action). Exact split of the expected total reward "
        "difference; a row counts P(reached) x E[step reward]:",
        "",
        "| true label | best baseline | PPO | rows | mean risk | reached: baseline / PPO "
        "| reward: baseline | reward: PPO | PPO - baseline |",
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
    parser.add_argument("--source", choices=("synthetic", "ulb", "csv"), default="synthetic")
    parser.add_argument("--path", type=Path, help="csv: the labelled CSV (.gz is fine)")
    parser.add_argument("--mapping", type=Path, help="csv: its column mapping (features file beside it)")
    parser.add_argument(
        "--warm-start",
        choices=("improved", "bayes", "thresholds", "none"),
        default="improved",
        help="PPO's cloned start (improved: Bayes + fitted policy iteration, train's default)",
    )
    parser.add_argument("--timesteps", type=int, default=PPO_TIMESTEPS, help="PPO steps (train's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--entities", type=int, default=3000, help="synthetic: entities")
    parser.add_argument("--days", type=float, default=14.0, help="synthetic: days")
    parser.add_argument(
        "--no-step-values",
        action="store_true",
        help="the PPO actor reads its state only, not the Bayes step values (TrainConfig.step_value_inputs)",
    )
    parser.add_argument("--no-save", action="store_true", help="do not append to policies_results.jsonl")
    args = parser.parse_args(argv)

    console = Console(width=160)
    started = time.perf_counter()
    data, features_path, label = load_data(
        args.source, args.entities, args.days, args.seed, args.path, args.mapping
    )
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
                    TrainConfig(
                        ppo_timesteps=args.timesteps,
                        seed=args.seed,
                        warm_start=args.warm_start,
                        step_value_inputs=not args.no_step_values,
                    ),
                    progress=progress,
                    promote=False,
                    source=args.source,
                    rules=CONFIG / "rules.yaml",
                )
        finally:
            engine.dispose()
    for table in report_tables(report):
        console.print(table)
    with console.status("analysing: exploration cost, support, PPO greedy, disagreements"):
        t0 = time.perf_counter()
        analysis = analyse(report, rewards, args.seed)
        analysis_s = time.perf_counter() - t0
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    run = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": args.source,
        "data_label": label,
        "timesteps": args.timesteps,
        "warm_start": args.warm_start,
        "step_value_inputs": not args.no_step_values,
        "fine_tuning": report.ppo,
        "seed": args.seed,
        "git_commit": _git("rev-parse", "--short", "HEAD") or None,
        "git_dirty_files": len(dirty.splitlines()) if dirty else 0,
        "nproc": len(__import__("os").sched_getaffinity(0)),
        "python": host.python_version(),
        "data": report.data,
        "risk_metrics": report.risk_metrics,
        "policies": [c.as_dict() for c in report.policies],
        "without_rules": {
            "best_baseline": report.without_rules.best_baseline,
            "served": report.without_rules.served,
            "policies": [c.as_dict() for c in report.without_rules.comparisons.values()],
        }
        if report.without_rules is not None
        else {},
        "served": report.served,
        "rules": report.rules,
        "analysis": analysis,
        "timings": report.timings | {"analysis_s": analysis_s},
        "wall_s": time.perf_counter() - started,
    }
    text = markdown(run)
    console.print()
    print(text)
    if not args.no_save:
        with RESULTS.open("a", encoding="utf-8") as out:
            out.write(json.dumps(run, default=float) + "\n")
        console.print(f"\nappended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
