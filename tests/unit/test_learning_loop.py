"""The learning loop closed on synthetic traffic (embedded backends; the PostgreSQL twin is in integration/).

A deliberately poor champion (allow almost everything) serves a synthetic stream with generous
exploration; outcomes follow from the ground truth; retraining must then (1) estimate values that the
ground truth confirms, (2) refuse a worse candidate, (3) promote a better one, whose version the next
decisions carry.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from decision_platform.config import Settings
from decision_platform.learning.logged import load_logged
from decision_platform.learning.outcomes import NO_OUTCOME, impute_missing_outcomes
from decision_platform.learning.retrain import RetrainError, judge, retrain
from decision_platform.models.baseline_policy import Policy
from decision_platform.models.policy import PolicyModel
from decision_platform.models.scoring import ScoringChain
from decision_platform.serving.platform import Platform
from decision_platform.storage.repository import OutcomeStatus
from tests.conftest import decision_row
from tests.loop import expected_reward, loop_config, register_allow_all_champion, serve_with_outcomes


@pytest.fixture(scope="module")
def served(
    trained: tuple[str, object], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Settings, dict[int, int], str]:
    """A platform whose allow-all champion served ~2,400 synthetic events, every outcome reported."""
    tmp = tmp_path_factory.mktemp("loop")
    settings = _settings(trained, tmp)
    platform = Platform.start(settings)
    poor = register_allow_all_champion(platform.registry)
    platform.close()
    platform = Platform.start(settings)
    assert platform.models.versions["policy"] == poor
    truth = serve_with_outcomes(platform)
    platform.close()
    return settings, truth, poor


def _settings(trained: tuple[str, object], tmp: object) -> Settings:
    import uuid
    from pathlib import Path

    from decision_platform.storage.database import make_engine, migrate
    from decision_platform.storage.repository import Repository
    from tests.conftest import CONFIG_DIR, copy_registry

    tmp = Path(str(tmp))
    settings = Settings(
        database_url=f"sqlite:///{tmp / 'loop.db'}",
        feature_store_url=f"memory://{uuid.uuid4().hex}",
        model_dir=trained[1],  # type: ignore[arg-type]
        spool_dir=tmp / "spool",
        config_dir=CONFIG_DIR,
        policy_seed=0,
        # Generous exploration over every action: the logs then support any candidate (see test 1).
        exploration_floor=0.2,
        explore_actions=(0, 1, 2),
    )
    engine = make_engine(settings.database_url)
    migrate(engine)
    copy_registry(str(trained[0]), Repository(engine))
    engine.dispose()
    return settings


def test_estimators_find_the_true_value_of_policies_on_served_decisions(
    served: tuple[Settings, dict[int, int], str],
) -> None:
    """The ground truth of any policy on the logged states is known here (the labels, and the outcome
    probabilities of rewards.yaml): IPS and DR must cover it with their CIs, and agree with each other."""
    settings, truth, _ = served
    platform = Platform.start(settings)
    try:
        models = platform.models
        logged = load_logged(platform.repository, models.spec.names)  # type: ignore[union-attr]
        assert len(logged) == len(truth) and logged.has_reward.all()
        train = logged.created_at < np.quantile(logged.created_at, 0.6)
        champion = ScoringChain(models.anomaly, models.risk, models.policy)  # type: ignore[arg-type]
        cautious = ScoringChain(models.anomaly, models.risk, _threshold_policy(models.policy, 0.1))  # type: ignore[arg-type]
        champ, cand, _, _ = judge(champion, cautious, logged, train, ~train, settings, loop_config())
        test = logged.subset(~train & ~logged.fell_back)
        for estimate, models_ in ((champ, champion), (cand, cautious)):
            target = models_.serving_probabilities(
                test.features, test.masks, settings.exploration_floor, settings.explore_actions
            )
            truth = np.array(
                [
                    [expected_reward(platform.rewards, int(label), a, amount) for a in range(3)]
                    for label, amount in zip(test.labels, test.amounts, strict=True)
                ]
            )
            true_value = float((target * truth).sum(axis=1).mean())
            for name in ("IPS", "DR"):
                e = estimate.estimates[name]
                assert e.ci_low <= true_value <= e.ci_high, (estimate.name, name, e, true_value)
        # The cautious policy throttles risky events the allow-all champion lets through: truly better.
        assert cand.estimates["DR"].value > champ.estimates["DR"].value
    finally:
        platform.close()


def _threshold_policy(template: Policy, throttle_above: float) -> PolicyModel:
    """Throttle when risk (the last state column) exceeds a threshold, else allow; a steep logistic."""
    k = len(template.state_names)
    w = np.zeros((k, 3))
    w[-1, 1] = 200.0
    return PolicyModel(
        [w],
        [np.array([0.0, -200.0 * throttle_above, -50.0])],
        "Tanh",
        template.state_names,
        template.scaler_mean,
        template.scaler_std,
    )


def test_a_worse_candidate_is_refused_with_the_reasons(served: tuple[Settings, dict[int, int], str]) -> None:
    settings, _, _ = served
    platform = Platform.start(settings)
    try:
        models = platform.models
        logged = load_logged(platform.repository, models.spec.names)  # type: ignore[union-attr]
        train = logged.created_at < np.quantile(logged.created_at, 0.6)
        cautious = ScoringChain(models.anomaly, models.risk, _threshold_policy(models.policy, 0.1))  # type: ignore[arg-type]
        allow_all = ScoringChain(models.anomaly, models.risk, models.policy)  # type: ignore[arg-type]
        # Judge the allow-all policy as a candidate against the cautious one as champion.
        _, _, _, gate = judge(cautious, allow_all, logged, train, ~train, settings, loop_config())
        assert not gate.passed
        failed = {c.name for c in gate.checks if not c.passed}
        assert "better with confidence (DR)" in failed
        assert any("lower bound must exceed" in f for f in gate.failures)
        # The absolute fraud limit refuses on its own (the loop tests run with a looser one: loop.py).
        _, _, _, strict = judge(
            cautious, allow_all, logged, train, ~train, settings, loop_config(max_fraud_allow_rate=0.01)
        )
        assert "fraud let through" in {c.name for c in strict.checks if not c.passed}
    finally:
        platform.close()


def test_retrain_promotes_a_better_policy_and_new_decisions_carry_it(
    served: tuple[Settings, dict[int, int], str],
) -> None:
    settings, _, poor = served
    # The logs were collected with generous exploration; candidates are judged as they would serve in
    # production: the default floor, never a random block.
    production = settings.model_copy(update={"exploration_floor": 0.01, "explore_actions": (0, 1)})
    platform = Platform.start(settings)
    try:
        report = retrain(production, platform.registry, loop_config(), platform.rewards)
    finally:
        platform.close()
    assert report.data["with_outcome"] == report.data["decisions"] >= 2000
    assert report.champion.version == poor
    # The risk model refit on outcome labels is used only if it ranks held-out labels no worse.
    risk = report.risk
    assert risk["train_bad"] > 10 and "candidate_pr_auc" in risk
    better = risk["candidate_pr_auc"] >= risk["champion_pr_auc"]
    assert risk["refit"] == better == ("risk" in report.versions)
    assert report.difference["DR"].ci_low > 0, report.gate.failures
    assert report.gate.passed and report.promoted, report.gate.failures
    assert report.candidate.good_block_rate <= loop_config().gate.max_good_block_rate
    # The report: JSON with every figure, and the plot.
    import json
    from pathlib import Path

    saved = json.loads(Path(report.files["json"]).read_text())
    assert saved["gate"]["passed"] is True and saved["candidate"]["version"] == report.versions["policy"]
    assert Path(report.files["png"]).stat().st_size > 10_000

    platform = Platform.start(settings)
    try:
        assert platform.models.versions["policy"] == report.versions["policy"]
        if "risk" in report.versions:
            assert platform.models.versions["risk"] == report.versions["risk"]
        decision = platform.engine.decide("after-retrain")
        assert decision.response["model_versions"]["policy"] == report.versions["policy"]
        # Promoted, so the next retrain starts from it (with its own SB3 zip).
        assert platform.registry.repository.get_model(poor)["status"] == "retired"  # type: ignore[index]
    finally:
        platform.close()


def test_missing_outcomes_are_imputed_after_the_horizon_and_a_real_one_replaces_them(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> None:
    platform = start_platform(make_settings())
    repo = platform.repository
    old = datetime.now(UTC) - timedelta(hours=100)
    repo.insert_decisions(
        [
            decision_row(1, created_at=old, action=2, risk=0.9, amount=50.0),
            decision_row(2, created_at=old, action=2, risk=0.1, amount=50.0),
            decision_row(3, created_at=old, action=0, risk=0.1),
            decision_row(4, created_at=datetime.now(UTC), action=0),  # within the horizon: left alone
        ]
    )
    repo.record_outcome(3, "success", 1.0)  # has its outcome: left alone
    config = loop_config().outcomes.model_copy(update={"default_reward": -0.5})
    repo.insert_decisions([decision_row(5, created_at=old, action=1)])
    summary = impute_missing_outcomes(repo, platform.rewards, config)
    assert (summary.blocked_bad, summary.blocked_good, summary.default_reward) == (1, 1, 1)
    logged = load_logged(repo, ["amount"])
    by_id = dict(zip(logged.ids.tolist(), range(len(logged)), strict=True))
    assert logged.outcomes[by_id[1]] == "fraud" and logged.labels[by_id[1]] == 1
    assert logged.rewards[by_id[1]] == platform.rewards.reward("fraud", 2, 50.0)
    assert logged.outcomes[by_id[2]] == "false_positive" and logged.rewards[by_id[2]] == -20.0
    assert logged.outcomes[by_id[5]] == NO_OUTCOME and logged.rewards[by_id[5]] == -0.5
    assert logged.labels[by_id[5]] == -1  # no label for the risk model
    imputed = dict(zip(logged.ids.tolist(), logged.imputed.tolist(), strict=True))
    assert imputed == {1: True, 2: True, 3: False, 4: False, 5: True}
    # Running again imputes nothing new.
    assert impute_missing_outcomes(repo, platform.rewards, config).total == 0
    # A real outcome arriving late replaces the imputed one (and is a creation, not a conflict).
    result = repo.record_outcome(5, "success", 0.52)
    assert result.status is OutcomeStatus.CREATED
    again = load_logged(repo, ["amount"])
    assert again.outcomes[by_id[5]] == "success" and not again.imputed[by_id[5]]
    assert repo.record_outcome(5, "fraud", 1.0).status is OutcomeStatus.CONFLICT


def test_retrain_without_outcomes_says_what_to_do(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> None:
    settings = make_settings()
    platform = start_platform(settings)
    for i in range(20):
        platform.engine.decide(f"no-outcome-{i}")
    with pytest.raises(RetrainError, match=r"post outcomes|too little"):
        retrain(settings, platform.registry, loop_config(), platform.rewards)


def test_retrain_with_nowhere_to_write_its_report_says_so_before_any_work(
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
    trained: tuple[str, Path],
    tmp_path: Path,
) -> None:
    """The report is written last -- after training, registering and promoting: a reports directory (beside
    DP_MODEL_DIR) that is a file, or on a full or read-only disk, stopped retrain there with a traceback,
    the candidate registered and maybe promoted. Now it is checked first: one line naming the directory."""
    shutil.copytree(trained[1], tmp_path / "models")
    taken = tmp_path / "reports"
    taken.write_text("a file where the reports directory should be")
    settings = make_settings(model_dir=tmp_path / "models")
    assert settings.reports_dir == taken
    platform = start_platform(settings)
    before = platform.registry.repository.list_models()
    with pytest.raises(RetrainError, match=rf"cannot write to {taken}: (File exists|Not a directory)"):
        retrain(settings, platform.registry, loop_config(), platform.rewards)
    assert platform.registry.repository.list_models() == before
