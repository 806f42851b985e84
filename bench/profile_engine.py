"""The decision engine on embedded backends, for profiling: CPU per decision and per stage, or cProfile.

Trains the bench's small model set once into ``--cache`` (reused by later runs), decides N synthetic
events (features applied first, records to a sink that is durable at once) in batches of each size.
No PostgreSQL or Redis needed: a quick loop for one lever at a time (bench_engine.py is the reference
run on the real backends). Stage CPU: the deciding thread's time between the engine's stage laps.

    .venv/bin/python bench/profile_engine.py --batches 64,500 --repeat 3
    .venv/bin/python bench/profile_engine.py --batches 500 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

from bench_engine import STAGE_CPU, instant_engine  # also times the engine's stages in CPU
from decision_platform.config import PROJECT_ROOT, Settings
from decision_platform.core.rewards import RewardTable
from decision_platform.data import generate
from decision_platform.learning.replay import shift_to_now
from decision_platform.models.registry import ModelRegistry
from decision_platform.serving.engine import DecisionRequest
from decision_platform.serving.platform import Platform
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.training.train import TrainConfig, train_all


def start(cache: Path) -> Platform:
    database = f"sqlite:///{cache / 'registry.db'}"
    if not (cache / "registry.db").exists():
        cache.mkdir(parents=True, exist_ok=True)
        engine = make_engine(database)
        migrate(engine)
        train_all(
            generate(n_entities=600, days=5, seed=1),
            PROJECT_ROOT / "config" / "features.yaml",
            RewardTable.load(PROJECT_ROOT / "config" / "rewards.yaml"),
            ModelRegistry(Repository(engine), cache / "models"),
            TrainConfig(ppo_timesteps=5000),
        )
        engine.dispose()
    settings = Settings(
        database_url=database,
        feature_store_url="memory://profile",
        model_dir=cache / "models",
        spool_dir=cache / "spool",
        policy_seed=3,
    )
    return Platform.start(settings)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="64,500")
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=1, help="passes per batch size; the fastest is kept")
    parser.add_argument("--profile", action="store_true", help="cProfile each batch size's passes")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dp-profile-engine")
    args = parser.parse_args()
    platform = start(args.cache)
    events = shift_to_now(generate(n_entities=500, days=3, seed=11).events)[: args.decisions]
    features = platform.store.update(events)
    engine = instant_engine(platform)
    requests = [DecisionRequest(e.entity_id, e) for e in events]
    engine.decide_batch(requests[:64], features=features[:64])  # warm
    n = len(requests)
    for batch in [int(b) for b in args.batches.split(",")]:
        profile = cProfile.Profile() if args.profile else None
        best = None
        STAGE_CPU.clear()
        for _ in range(args.repeat):
            cpu = time.process_time()
            if profile is not None:
                profile.enable()
            for begin in range(0, n, batch):
                engine.decide_batch(requests[begin : begin + batch], features=features[begin : begin + batch])
            if profile is not None:
                profile.disable()
            cpu = (time.process_time() - cpu) / n * 1e6
            best = cpu if best is None else min(best, cpu)
        stages = " ".join(f"{k} {v / n / args.repeat * 1e6:.0f}" for k, v in STAGE_CPU.items())
        print(
            f"batch {batch}: CPU {best:.1f} µs/decision (fastest of {args.repeat}); stages (mean): {stages}"
        )
        if profile is not None:
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(40)
            print(out.getvalue())
    platform.close()


if __name__ == "__main__":
    main()
