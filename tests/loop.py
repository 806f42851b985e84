"""The closed learning loop, for the unit (SQLite) and integration (PostgreSQL + Redis) tests.

serve decisions with the champion -> outcomes from the ground truth -> retrain -> off-policy evaluation.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from decision_platform.core.rewards import RewardTable
from decision_platform.data import generate
from decision_platform.learning.config import GateSettings, LearningConfig, OutcomeSettings, TrainingSettings
from decision_platform.models.baseline_policy import load_policy
from decision_platform.models.policy import ACTOR, PPO_ZIP, PolicyModel
from decision_platform.models.registry import ModelRegistry
from decision_platform.serving.engine import DecisionRequest
from decision_platform.serving.platform import Platform
from decision_platform.training.simulator import simulate_outcome

ALLOW, THROTTLE, BLOCK = 0, 1, 2


def loop_config(**gate: object) -> LearningConfig:
    """Small enough for a test: a few thousand decisions, a short PPO run."""
    return LearningConfig(
        outcomes=OutcomeSettings(horizon_hours=72),
        training=TrainingSettings(holdout_fraction=0.4, risk_epochs=4, ppo_timesteps=2048, min_bad_labels=10),
        # The absolute fraud limit is looser than production's 50%: the candidate here is the reward-best
        # risk thresholds on 2,400 decisions plus 2,048 PPO steps, and whether it lands under 50% follows
        # the risk model's score distribution (45% with the single-net risk model, 52-64% with today's);
        # the limit itself is checked on the allow-all candidate (test_a_worse_candidate_is_refused...).
        gate=GateSettings(
            **(
                {"min_decisions": 200, "min_effective_sample_size": 30, "bootstrap": 300}
                | {"max_fraud_allow_rate": 0.75}
                | gate
            )
        ),
    )


def register_allow_all_champion(registry: ModelRegistry) -> str:
    """A deliberately poor champion: the current policy's artifact with an actor that (almost) always
    allows, and without the SB3 zip (it was not trained by PPO). Returns its version."""
    record = registry.champion("policy")
    assert record is not None
    source = registry.verified_path(record)
    current = load_policy(source)
    k = len(current.state_names)
    allow_all = PolicyModel(
        [np.zeros((k, 3))],
        [np.array([6.0, 0.0, 0.0])],
        "Tanh",
        current.state_names,
        current.scaler_mean,
        current.scaler_std,
    )

    def write(directory: Path) -> None:
        for path in source.iterdir():
            if path.name not in (ACTOR, PPO_ZIP):
                shutil.copy2(path, directory / path.name)
        allow_all.save(directory)

    return registry.register("policy", write, {"source": "test"}, {}, status="champion")


def expected_reward(rewards: RewardTable, label: int, action: int, amount: float) -> float:
    """E[reward | true label, action]: the ground truth of the simulated outcome's randomness."""
    sim = rewards.simulation
    r = rewards.reward
    if label == 0:
        if action == ALLOW:
            return r("success", ALLOW, amount)
        if action == THROTTLE:
            p = sim.abandon_probability_on_throttle
            return p * r("abandoned", THROTTLE, amount) + (1 - p) * r("success", THROTTLE, amount)
        return r("false_positive", BLOCK, amount)
    if action == ALLOW:
        return r("chargeback", ALLOW, amount)
    if action == THROTTLE:
        p = sim.fraud_gives_up_probability_on_throttle
        return p * r("fraud", THROTTLE, amount) + (1 - p) * r("chargeback", THROTTLE, amount)
    return r("fraud", BLOCK, amount)


def serve_with_outcomes(platform: Platform, entities: int = 150, days: float = 3.0, seed: int = 1) -> dict:
    """Decide a synthetic stream (the stream worker's batch path) and report each decision's outcome as
    the ground truth makes it happen. Returns {decision_id: true label}. Fraud comes in campaigns; the
    defaults give ~2,300 events with fraud in both the training (39) and the held-out (44) part."""
    data = generate(n_entities=entities, days=days, seed=seed)
    rng = np.random.default_rng(seed)
    truth: dict[int, int] = {}
    # The generator's own timestamps, not shifted to now: the time-of-day features, hence every decision,
    # are then the same on every run (window expiry is wall-clock TTL, so old timestamps are fine).
    events, labels = data.events, data.labels
    for start in range(0, len(events), 200):
        chunk = events[start : start + 200]
        decisions = platform.engine.decide_batch([DecisionRequest(e.entity_id, e) for e in chunk])
        for event, label, decision in zip(chunk, labels[start : start + 200], decisions, strict=True):
            record = decision.record
            outcome, _ = simulate_outcome(int(label), record.action, rng, platform.rewards.simulation)
            reward = platform.rewards.reward(outcome, record.action, event.amount)
            platform.repository.record_outcome(record.id, outcome, reward)
            truth[record.id] = int(label)
    return truth


def serve_over_http(
    client: object, rewards: RewardTable, entities: int = 150, days: float = 3.0, seed: int = 1
) -> int:
    """The same loop through the HTTP API: POST /decide per event, then POST /outcome with the outcome
    the ground truth makes happen. Returns the number of decisions."""
    data = generate(n_entities=entities, days=days, seed=seed)
    rng = np.random.default_rng(seed)
    for event, label in zip(data.events, data.labels, strict=True):
        body = {"entity_id": event.entity_id, "event": event.model_dump(mode="json")}
        decision = client.post("/decide", json=body).json()  # type: ignore[attr-defined]
        outcome, _ = simulate_outcome(int(label), decision["action"], rng, rewards.simulation)
        answer = client.post("/outcome", json={"decision_id": decision["decision_id"], "outcome": outcome})  # type: ignore[attr-defined]
        assert answer.status_code == 201, answer.text
    return len(data.events)
