"""Component behaviour: anomaly serving path, ids, durable spool, rewards."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sklearn.ensemble import IsolationForest

from decision_platform.config import PROJECT_ROOT
from decision_platform.core.ids import DecisionIdGenerator, id_timestamp
from decision_platform.core.rewards import RewardTable
from decision_platform.models.anomaly import AnomalyModel
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.storage.spool import Spool
from decision_platform.storage.writer import SPOOLED, STORED, DecisionWriter
from tests.conftest import decision_record


def test_vectorised_isolation_forest_matches_scikit_learn(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.lognormal(size=(3000, 12))
    x[:30] *= 20
    forest = IsolationForest(n_estimators=60, random_state=3).fit(x.astype(np.float32))
    model = AnomalyModel.from_sklearn(forest, [f"f{i}" for i in range(12)])
    model.save(tmp_path)
    loaded = AnomalyModel.load(tmp_path)
    np.testing.assert_allclose(loaded.score(x), -forest.score_samples(x), rtol=1e-12)
    assert loaded.score(x[:30]).mean() > loaded.score(x[30:]).mean()  # outliers score higher


def test_decision_ids_unique_across_threads() -> None:
    generator = DecisionIdGenerator(node_id=5)
    out: list[list[int]] = []

    def work() -> None:
        out.append([generator.next_id() for _ in range(5000)])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for chunk in out for i in chunk]
    assert len(set(ids)) == len(ids) == 20000
    assert all(chunk == sorted(chunk) for chunk in out)
    assert abs(id_timestamp(ids[0]) - datetime.now(UTC).timestamp()) < 5


def test_database_outage_spools_durably_and_replays_without_duplicates(tmp_path: Path) -> None:
    db_path = tmp_path / "db.sqlite"
    engine = make_engine(f"sqlite:///{db_path}")
    migrate(engine)
    repository = Repository(engine)
    writer = DecisionWriter(repository, Spool(tmp_path / "spool"), batch_size=16, probe_interval_s=0.05)
    assert writer.write(decision_record(1)) == STORED

    # The database goes away: writes land in the spool, and are still acknowledged.
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE decisions RENAME TO decisions_away"))
    assert writer.write(decision_record(2)) == SPOOLED
    assert writer.write(decision_record(3)) == SPOOLED
    assert list((tmp_path / "spool").glob("segment-*.jsonl"))
    assert writer.find_decision(2).id == 2  # readable from the spool meanwhile

    # It comes back: the spool is replayed in the background, once, with no new write to trigger it.
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE decisions_away RENAME TO decisions"))
    assert writer.wait_replayed(10)
    assert writer.write(decision_record(4)) == STORED
    writer.close()
    with engine.connect() as connection:
        ids = [r[0] for r in connection.execute(sa.text("SELECT id FROM decisions ORDER BY id"))]
    assert ids == [1, 2, 3, 4]
    assert not list((tmp_path / "spool").iterdir())


def test_rewards_follow_the_table() -> None:
    table = RewardTable.load(PROJECT_ROOT / "config" / "rewards.yaml")
    assert table.reward("chargeback", 0, 100.0) == pytest.approx(-115.0)
    assert table.reward("success", 0, 100.0) > table.reward("success", 1, 100.0)
    assert table.reward("fraud", 2, 100.0) > table.reward("fraud", 0, 100.0)
    with pytest.raises(ValueError, match="no outcome can follow"):
        RewardTable.model_validate({"outcomes": {"x": {"allow": {}}}})


def test_risk_fast_path_agrees_with_torch(trained: tuple[str, Path]) -> None:
    import torch

    from decision_platform.models.risk import RiskModel

    directory = next((trained[1] / "risk").iterdir())
    model = RiskModel.load(directory)
    rng = np.random.default_rng(0)
    rows = np.abs(rng.normal(size=(20, len(model.input_names)))) * rng.choice([1, 10, 100], size=(20, 1))
    numeric = torch.from_numpy(model.encoder.encode_numeric(rows).astype(np.float32))
    categories = torch.from_numpy(model.encoder.categories(rows))
    with torch.no_grad():
        mean_logit = torch.stack([net(numeric, categories) for net in model.nets]).mean(dim=0)
        expected = torch.sigmoid(mean_logit / model.temperature).numpy()
    np.testing.assert_allclose(model.predict(rows), expected, rtol=1e-4, atol=1e-6)
    for row, want in zip(rows, expected, strict=True):  # one row at a time: the serving case
        assert float(model.predict(row)[0]) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
        assert float(model.explain(row)[0][0]) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
