"""The retraining report's picture: champion vs candidate, estimates with their CIs, safety vs limits.

matplotlib's object API (``Figure``), not pyplot: no global state, no GUI backend, safe in any thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from decision_platform.learning.retrain import RetrainReport

COLOURS = {"champion": "#4c72b0", "candidate": "#dd8452"}


def plot_retrain(report: RetrainReport, path: Path) -> None:
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    value, safety = figure.subplots(1, 2, width_ratios=[3, 2])
    policies = [report.champion, report.candidate]
    names = list(report.champion.estimates)
    x = np.arange(len(names))
    width = 0.38
    for i, policy in enumerate(policies):
        est = [policy.estimates[n] for n in names]
        centre = np.array([e.value for e in est])
        errors = np.array([[e.value - e.ci_low for e in est], [e.ci_high - e.value for e in est]])
        value.bar(
            x + (i - 0.5) * width,
            centre,
            width,
            yerr=errors,
            capsize=4,
            color=COLOURS[policy.name],
            label=f"{policy.name} ({policy.version})",
        )
    value.set_xticks(x, names)
    value.axhline(0, color="grey", linewidth=0.8)
    value.set_ylabel("estimated reward per decision")
    verdict = "promoted" if report.promoted else "passed the gate" if report.gate.passed else "refused"
    value.set_title(
        f"Off-policy estimates on {report.candidate.decisions} held-out decisions "
        f"(ESS {report.candidate.effective_sample_size:.0f}): candidate {verdict}",
        fontsize=10,
    )
    value.legend(fontsize=8, loc="lower right")

    labels = ["good users blocked", "fraud allowed"]
    y = np.arange(len(labels))
    for i, policy in enumerate(policies):
        safety.barh(
            y + (i - 0.5) * width,
            [policy.good_block_rate, policy.fraud_allow_rate],
            width,
            color=COLOURS[policy.name],
            label=policy.name,
        )
    for row, limit in zip(
        y, (report.limits["good_block_rate"], report.limits["fraud_allow_rate"]), strict=True
    ):
        safety.vlines(limit, row - 0.45, row + 0.45, colors="red", linestyles="dashed")
    safety.set_yticks(y, labels)
    safety.xaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    safety.set_title("Safety on labelled held-out decisions (red: the gate's limits)", fontsize=10)
    safety.legend(fontsize=8)
    figure.savefig(path, dpi=110)
