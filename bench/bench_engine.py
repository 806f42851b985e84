"""The decision engine alone, by batch size: CPU per decision and the split by stage.

Trains a small model set (the API bench's size) into a temporary registry on the machine's PostgreSQL
(own schema, dropped at the end), applies N synthetic events to Redis (db 12, this run's entities only),
then decides them with ``DecisionEngine.decide_batch`` in batches of each size, the records going to a
sink that is durable at once: only the engine is timed (features, anomaly, risk + attributions, policy,
reasons, rules + records), not HTTP or the database. What micro-batching buys per decision.

CPU per decision (``time.process_time``) and per stage: the CPU time of the deciding thread between the
engine's own stage laps (``time.thread_time``), which a loaded machine inflates far less than wall time.
``--repeat N`` keeps each batch size's fastest of N passes.

    .venv/bin/python bench/bench_engine.py --batches 1,16,64,500 --decisions 3000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

import psycopg

from decision_platform.config import PROJECT_ROOT, Settings
from decision_platform.core.records import STORED, DecisionRecord, RowStatus
from decision_platform.core.rewards import RewardTable
from decision_platform.data import generate
from decision_platform.learning.replay import shift_to_now
from decision_platform.models.registry import ModelRegistry
from decision_platform.serving import engine as engine_module
from decision_platform.serving.engine import DecisionEngine, DecisionRequest
from decision_platform.serving.platform import Platform
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.training.train import TrainConfig, train_all

PG = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/12"
STAGES = ("anomaly", "risk", "policy", "reasons", "rules")
#: CPU seconds of the deciding thread per stage, summed over the run (see _CpuStopwatch).
STAGE_CPU: dict[str, float] = {}


class _CpuStopwatch(engine_module._Stopwatch):
    """The engine's stopwatch, also noting the thread's CPU time per stage."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu = time.thread_time()

    def lap(self, stage: str) -> None:
        super().lap(stage)
        now = time.thread_time()
        STAGE_CPU[stage] = STAGE_CPU.get(stage, 0.0) + now - self.cpu
        self.cpu = now


engine_module._Stopwatch = _CpuStopwatch  # type: ignore[misc]


class InstantSink:
    """Durable at once: the engine's own cost, without the group commit."""

    def submit_many(self, records: list[DecisionRecord]) -> Future[list[RowStatus]]:
        future: Future[list[RowStatus]] = Future()
        future.set_result([STORED] * len(records))
        return future

    def find_decision_by_event(self, event_id: str) -> DecisionRecord | None:
        return None


def instant_engine(platform: Platform) -> DecisionEngine:
    """The platform's engine (same models, rules, reasons) writing to an :class:`InstantSink`."""
    return DecisionEngine(
        platform.settings,
        platform.engine.spec,
        platform.store,
        platform.models,
        platform.rules,
        InstantSink(),
        reasons=platform.engine.reasons,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,16,64,500")
    parser.add_argument("--decisions", type=int, default=3000, help="decisions per batch size")
    parser.add_argument("--repeat", type=int, default=1, help="passes per batch size; the fastest is kept")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    work = Path(tempfile.mkdtemp(prefix="dp-bench-engine-"))
    schema = f"bench_engine_{uuid.uuid4().hex[:8]}"
    settings = Settings(
        database_url=PG,
        database_schema=schema,
        feature_store_url=REDIS,
        feature_store_timeout_s=10.0,
        model_dir=work / "models",
        spool_dir=work / "spool",
    )
    try:
        db = make_engine(PG, schema)
        migrate(db, schema)
        train_all(
            generate(n_entities=600, days=5, seed=1),
            PROJECT_ROOT / "config" / "features.yaml",
            RewardTable.load(PROJECT_ROOT / "config" / "rewards.yaml"),
            ModelRegistry(Repository(db), settings.model_dir),
            TrainConfig(ppo_timesteps=5000),
        )
        platform = Platform.start(settings)
        run = uuid.uuid4().hex[:6]
        events = shift_to_now(generate(n_entities=500, days=3, seed=11).events)[: args.decisions]
        events = [e.model_copy(update={"entity_id": f"bench-{run}-{e.entity_id}"}) for e in events]
        features = platform.store.update(events)
        engine = instant_engine(platform)
        print(
            f"{len(events)} decisions per batch size; µs per decision: CPU and wall of the whole, "
            "CPU of the deciding thread by stage"
        )
        print(f"{'batch':>6} {'CPU':>7} {'wall':>7} " + " ".join(f"{s:>8}" for s in STAGES))
        for batch in batches:
            best: tuple[float, float, list[float]] | None = None
            for _ in range(args.repeat):
                STAGE_CPU.clear()
                cpu, wall = time.process_time(), time.perf_counter()
                for start in range(0, len(events), batch):
                    requests = [DecisionRequest(e.entity_id, e) for e in events[start : start + batch]]
                    engine.decide_batch(requests, features=features[start : start + batch])
                n = len(events)
                cpu = (time.process_time() - cpu) / n * 1e6
                wall = (time.perf_counter() - wall) / n * 1e6
                split = [STAGE_CPU.get(s, 0.0) / n * 1e6 for s in STAGES]
                if best is None or cpu < best[0]:
                    best = (cpu, wall, split)
            assert best is not None
            cpu, wall, split = best
            print(f"{batch:>6} {cpu:>7.0f} {wall:>7.0f} " + " ".join(f"{v:>8.0f}" for v in split))
        platform.close()
    finally:
        with psycopg.connect(PG, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
