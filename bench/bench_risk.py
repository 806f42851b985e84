"""The risk model against gradient boosting, one change at a time, on held-out (later) time.

    .venv/bin/python bench/bench_risk.py --source synthetic
    .venv/bin/python bench/bench_risk.py --source ulb
    .venv/bin/python bench/bench_risk.py --source csv --path ../shared/data/cards-dev.csv.gz \\
        --mapping ../shared/data/cards-dev.yaml [--categorical ProductCD,R_emaildomain,DeviceInfo]

Features are computed and split exactly as ``decision-platform train`` does (``split_in_time`` +
``fit_anomaly``: the earlier 70% of time trains, the later 30% judges). Then, on the same inputs:

- the baseline: scikit-learn HistGradientBoosting with default settings (what ``train`` fits too);
- the seed's model: one signed-log standardisation, a (64, 32) MLP, fixed epochs, no early stopping;
- quantile transform only (PLE with 1 bin) on the (256, 128) net with dropout, early stopping and refit;
- + PLE with 8 bins; + distillation from the baseline (soft targets, 30% labels);
- + integer-valued attributes embedded by value too (one net);
- the default, as ``train`` fits it: that, with the logits of 2 nets (seeds) averaged.

``--categorical`` adds category codes of those attributes to the feature definitions for this run
(``event_fields.categorical_attributes``) to measure their embeddings. Output: a rich table, a markdown
table for bench/RISK.md, and a JSON line in bench/risk_results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform as host
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.table import Table

from decision_platform.cli.progress import RichProgress
from decision_platform.config import PROJECT_ROOT
from decision_platform.data import LabelledEvents
from decision_platform.features import FeatureSpec
from decision_platform.models.preprocessing import Standardizer
from decision_platform.models.risk import RiskConfig, RiskModel
from decision_platform.training.baseline import classifier_metrics, fit_gradient_boosting
from decision_platform.training.train import TrainConfig, fit_anomaly, split_in_time, value_inputs

CONFIG = PROJECT_ROOT / "config"
RESULTS = Path(__file__).with_name("risk_results.jsonl")
METRICS = ("roc_auc", "pr_auc", "brier", "recall_at_1%", "recall_at_5%")


def load(args: argparse.Namespace) -> tuple[LabelledEvents, Path, str]:
    if args.source == "synthetic":
        from decision_platform.data import generate

        data = generate(n_entities=args.entities, days=args.days, seed=args.seed)
        return data, CONFIG / "features.yaml", f"synthetic ({args.entities} entities x {args.days:g} days)"
    from decision_platform.data.csv_import import find_ulb_csv, load_csv

    if args.source == "ulb":
        path = find_ulb_csv(PROJECT_ROOT / "var" / "datasets")
        mapping = CONFIG / "datasets" / "ulb_creditcard.yaml"
    else:
        path, mapping = Path(args.path), Path(args.mapping)
    features = mapping.with_name(mapping.name.replace(".yaml", ".features.yaml"))
    return load_csv(path, mapping, progress=True), features, f"{args.source}:{path.name}"


def with_categorical(spec_path: Path, attributes: list[str], directory: Path) -> Path:
    """A copy of the feature definitions with ``attributes`` as categorical event fields."""
    spec = yaml.safe_load(spec_path.read_text())
    spec.setdefault("event_fields", {})["categorical_attributes"] = attributes
    out = directory / "features.yaml"
    out.write_text(yaml.safe_dump(spec))
    return out


def seed_model(x: np.ndarray, y: np.ndarray, epochs: int = 12) -> np.ndarray:
    """The seed's risk model, rebuilt for comparison: signed-log standardisation, (64, 32) ReLU MLP,
    Adam 2e-3, fixed epochs on the first 80%, temperature on the last 20% (ranking unaffected)."""
    torch.manual_seed(0)
    cut = int(len(x) * 0.8)
    scaler = Standardizer.fit(x[:cut])
    z = torch.from_numpy(scaler.transform(x))
    t = torch.from_numpy(y.astype(np.float32))
    net = torch.nn.Sequential(
        torch.nn.Linear(z.shape[1], 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 1),
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-5)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(0)
    for _ in range(RiskModel.effective_epochs(len(x), epochs)):
        order = torch.randperm(cut, generator=generator)
        for start in range(0, cut, 512):
            idx = order[start : start + 512]
            optimiser.zero_grad()
            loss_fn(net(z[idx]).squeeze(-1), t[idx]).backward()
            optimiser.step()
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=("synthetic", "ulb", "csv"), default="synthetic")
    parser.add_argument("--path")
    parser.add_argument("--mapping")
    parser.add_argument("--categorical", default="", help="attributes to embed, comma separated")
    parser.add_argument("--entities", type=int, default=3000)
    parser.add_argument("--days", type=float, default=14)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="only the baseline and the default model")
    args = parser.parse_args()
    console = Console()
    data, spec_path, source = load(args)
    with tempfile.TemporaryDirectory() as tmp:
        categorical = [a for a in args.categorical.split(",") if a]
        if categorical:
            spec_path = with_categorical(spec_path, categorical, Path(tmp))
        spec = FeatureSpec.load(spec_path)
        with RichProgress(console) as progress:
            split = split_in_time(data, spec, 0.3, source, progress)
            anomaly = fit_anomaly(split, spec.names, TrainConfig(), progress, spec.categorical_names)
    names = [*spec.names, "anomaly"]
    codes = [i for i, n in enumerate(spec.names) if n in set(spec.categorical_names)]
    x = RiskModel.inputs(split.features, anomaly.scores)
    y = split.labels
    train, test = split.train, split.test
    rows: list[dict[str, Any]] = []

    def record(name: str, scores: np.ndarray, started: float) -> None:
        metrics = classifier_metrics(y[test], scores)
        rows.append({"model": name, **metrics, "fit_s": round(time.perf_counter() - started, 1)})
        console.print(f"{name}: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in METRICS))

    started = time.perf_counter()
    baseline = fit_gradient_boosting(x[train], y[train], args.seed)
    teacher = baseline.predict_proba(x)[:, 1]
    record("gradient boosting (HistGB defaults) -- baseline", teacher[test], started)

    values = value_inputs(x[train], spec.names)

    def ours(
        name: str, config: RiskConfig, distill: bool, by_value: bool = True, seed: int = 0
    ) -> np.ndarray:
        started = time.perf_counter()
        model = RiskModel.fit(
            x[train],
            y[train],
            names,
            config,
            codes,
            teacher[train] if distill else None,
            seed=seed,
            values=values if by_value else [],
        )
        scores = model.predict(x)
        record(name, scores[test], started)
        return scores

    if not args.quick:
        started = time.perf_counter()
        net = seed_model(x[train], y[train])
        scaler = Standardizer.fit(x[train][: int(train.sum() * 0.8)])
        with torch.no_grad():
            seed_scores = torch.sigmoid(net(torch.from_numpy(scaler.transform(x[test])))).numpy().ravel()
        record("seed model: signed-log + (64, 32) MLP", seed_scores, started)
        one = RiskConfig(members=1)
        ours("quantile transform (PLE 1 bin), wider net, early stopping", replace(one, bins=1), False, False)
        ours("+ PLE 8 bins", one, distill=False, by_value=False)
        ours("+ distillation from the baseline", one, distill=True, by_value=False)
        ours(f"+ integer attributes embedded by value ({len(values)} inputs)", one, distill=True)
    default = RiskConfig()
    ours(f"+ {default.members} nets averaged: the default, as train fits it", default, distill=True)

    table = Table(
        title=f"Risk on held-out time: {source} ({int(test.sum()):,} rows, {y[test].mean():.2%} bad)"
    )
    for column in ("model", *METRICS, "fit_s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(row["model"], *(f"{row[m]:.4f}" for m in METRICS), f"{row['fit_s']:.0f}")
    console.print(table)
    print("| model | ROC-AUC | PR-AUC | Brier | recall@1% | recall@5% | fit s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['model']} | " + " | ".join(f"{row[m]:.4f}" for m in METRICS) + f" | {row['fit_s']:.0f} |"
        )
    line = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
        "categorical": categorical,
        "rows": {"train": int(train.sum()), "test": int(test.sum())},
        "machine": f"{host.machine()} {host.processor() or ''}".strip(),
        "results": rows,
    }
    with RESULTS.open("a") as out:
        out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
