"""The running platform: every component built once from Settings and wired together.

Routes, the CLI and the stream worker all get their dependencies from here, so there is one place that
decides which backend serves which part (by URL) and how the pieces connect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from decision_platform.config import Settings
from decision_platform.decision.engine import DecisionEngine
from decision_platform.decision.rules import RuleSet
from decision_platform.events.kafka import EventProducer, ensure_topics
from decision_platform.events.worker import InProcessSink, StreamWorker
from decision_platform.explain.attributions import ReasonBuilder
from decision_platform.explain.llm import open_chat_client
from decision_platform.explain.narrator import Narrator
from decision_platform.explain.ranges import ranges_of_model
from decision_platform.features import FeatureSpec, FeatureStore, open_feature_store
from decision_platform.learning.rewards import RewardTable
from decision_platform.models.bundle import LoadedModels, load_champions
from decision_platform.models.registry import ModelRegistry
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository
from decision_platform.storage.writer import DecisionSpool, DecisionWriter

log = logging.getLogger(__name__)


@dataclass
class Platform:
    settings: Settings
    repository: Repository
    registry: ModelRegistry
    store: FeatureStore
    models: LoadedModels
    rules: RuleSet
    rewards: RewardTable
    writer: DecisionWriter
    engine: DecisionEngine
    #: POST /events: acknowledged by Kafka when a broker is configured, else handled in-process.
    producer: EventProducer | None
    inline_worker: StreamWorker | None
    #: LLM narratives, written by a background thread (template only when DP_LLM_URL is unset).
    narrator: Narrator | None = None

    @classmethod
    def start(cls, settings: Settings) -> Platform:
        """Build everything; the database is migrated to the latest schema first."""
        db = make_engine(settings.database_url, settings.database_schema)
        migrate(db, settings.database_schema)
        repository = Repository(db)
        registry = ModelRegistry(repository, settings.model_dir)
        models = load_champions(registry)
        spec = models.spec or FeatureSpec.load(settings.features_path)
        store = open_feature_store(settings.feature_store_url, spec, settings.feature_store_timeout_s)
        rules = RuleSet.load(settings.rules_path, spec.names)
        rewards = RewardTable.load(settings.rewards_path)
        spool = DecisionSpool(settings.spool_dir)
        writer = DecisionWriter(repository, spool, settings.db_batch_size)
        # Normal ranges stored with the risk model: reason codes say what is typical (older artifacts: none).
        risk_record = registry.repository.get_model(models.versions["risk"]) if models.risk else None
        ranges = ranges_of_model(settings.model_dir, risk_record)
        reasons = ReasonBuilder.for_models(
            models.risk, models.anomaly, ranges, rules, settings.attribution_steps
        )
        engine = DecisionEngine(settings, spec, store, models, rules, writer, reasons=reasons)
        narrator = Narrator(settings, repository, open_chat_client(settings), ranges).start()
        if models.errors:
            log.warning("serving with fallbacks for: %s", models.errors)
        producer, inline_worker = None, None
        if settings.kafka_bootstrap_servers:
            try:
                ensure_topics(settings)
            except Exception as exc:  # the broker may come later: decisions must not wait for it
                log.warning("could not check the Kafka topics (%s); POST /events answers 503 meanwhile", exc)
            producer = EventProducer(settings)
        else:
            inline_worker = StreamWorker(settings, engine, store, InProcessSink())
        return cls(
            settings,
            repository,
            registry,
            store,
            models,
            rules,
            rewards,
            writer,
            engine,
            producer,
            inline_worker,
            narrator,
        )

    def close(self) -> None:
        if self.narrator is not None:
            self.narrator.close()
        if self.producer is not None:
            self.producer.close()
        self.writer.close()
        self.store.close()
        self.repository.engine.dispose()
