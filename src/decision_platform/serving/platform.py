"""The running platform: every component built once from Settings and wired together.

Routes, the CLI and the stream worker all get their dependencies from here, so there is one place that
decides which backend serves which part (by URL) and how the pieces connect.

Models are hot-reloaded: :meth:`Platform.reload_models` swaps a freshly loaded serving set into the
engine, and a :class:`ModelRefresher` thread polls the registry (one small query every
``DP_MODEL_REFRESH_S``) so that a promotion made anywhere (the CLI, an admin call to another API process,
retraining) reaches every serving process within seconds, without a restart.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from threadpoolctl import threadpool_limits

from decision_platform.config import Settings, load_config_file
from decision_platform.core.ids import DecisionIdGenerator
from decision_platform.core.rewards import RewardTable
from decision_platform.core.strict_yaml import read_config_text
from decision_platform.events.kafka import EventProducer, ensure_topics
from decision_platform.explain.attributions import ReasonBuilder
from decision_platform.explain.llm import open_chat_client
from decision_platform.explain.narrator import Narrator
from decision_platform.features import FeatureSpec, FeatureStore, open_feature_store
from decision_platform.models.bundle import LoadedModels, load_champions
from decision_platform.models.ranges import ranges_of_model
from decision_platform.models.registry import ModelRegistry
from decision_platform.observability import metrics
from decision_platform.rules.ruleset import RuleSet
from decision_platform.serving.batcher import DecisionBatcher
from decision_platform.serving.engine import DecisionEngine
from decision_platform.serving.worker import InProcessSink, StreamWorker
from decision_platform.storage.database import make_batch_engine, make_engine, migrate
from decision_platform.storage.errors import is_outage
from decision_platform.storage.partitions import PartitionKeeper
from decision_platform.storage.repository import Repository
from decision_platform.storage.spool import Spool
from decision_platform.storage.writer import DecisionWriter

log = logging.getLogger(__name__)


def read_config_files(
    settings: Settings, spec: FeatureSpec | None = None
) -> tuple[FeatureSpec, RuleSet, RewardTable]:
    """features.yaml (unless ``spec``: the champions' own), rules.yaml and rewards.yaml, read and checked.

    A file that is missing, not YAML, or not valid raises ConfigError naming the file and the problem in
    one line; the CLI checks them before a server or worker starts (exit 2): they were a traceback from
    the application's startup, and uvicorn's exit 3."""
    if spec is None:
        spec = load_config_file(settings.features_path, FeatureSpec.load)
    names = spec.names
    rules = load_config_file(
        settings.rules_path,
        lambda path: RuleSet.from_text(read_config_text(path), names, metrics.RULE_METRICS),
    )
    rewards = load_config_file(settings.rewards_path, RewardTable.load)
    return spec, rules, rewards


@dataclass(frozen=True)
class ReloadResult:
    """What serves after a reload: champion versions, the shadow, load errors; ``applied`` is False when
    the new set was refused (``reason``) and the previous one kept serving."""

    applied: bool
    versions: dict[str, str]
    shadow: dict[str, str]
    errors: dict[str, str]
    shadow_error: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelRefresher:
    """A daemon thread that reloads the platform's models when the registry's champions or shadow change.

    Each poll is one small query (:meth:`Repository.serving_state`); a reload happens only on a change,
    and a change that could not be applied is not retried until the registry changes again.
    """

    def __init__(self, platform: Platform, interval_s: float) -> None:
        self.platform = platform
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-refresher", daemon=True)

    def start(self) -> ModelRefresher:
        self._thread.start()
        return self

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                self.platform.refresh_models()
                failing = False
            except Exception as exc:  # the database may be down for a while: keep serving, keep polling
                if not failing:
                    log.warning("model refresh failed (%s); retrying every %s s", exc, self.interval_s)
                failing = True

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)


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
    #: POST /decide's micro-batches: one decider thread (serving/batcher.py).
    batcher: DecisionBatcher | None = None
    #: Polls the registry and hot-reloads the models (start_model_refresh; the API and worker start it).
    refresher: ModelRefresher | None = None
    #: PostgreSQL: keeps the decision log's day partitions created ahead as the days pass.
    partitions: PartitionKeeper | None = None
    _reload_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: The registry state of the last reload attempt, applied or not (refresh_models compares with it).
    _attempted: frozenset[tuple[str, str, str]] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, settings: Settings) -> Platform:
        """Build everything; the database is migrated to the latest schema first.

        With the database down (or stalled) the platform still starts, degraded: the models come from the
        registry's serving cache, decisions are spooled, and the writer migrates then replays as soon as the
        database answers (storage/writer.py).
        """
        limit_native_threads()
        where = (settings.database_url, settings.database_schema, settings.db_statement_timeout_s)
        db = make_engine(*where)
        migrated = _migrate_within(db, settings, settings.db_write_timeout_s * 5)
        repository = Repository(db, make_batch_engine(*where))
        registry = ModelRegistry(repository, settings.model_dir, _serving_cache(settings))
        models = load_champions(registry)
        spec, rules, rewards = read_config_files(settings, models.spec)
        store = open_feature_store(settings.feature_store_url, spec, settings.feature_store_timeout_s)
        spool = Spool(settings.spool_dir)
        node_id = settings.node_id if settings.node_id is not None else spool.claim_node_id()
        writer = DecisionWriter(
            repository,
            spool,
            settings.db_batch_size,
            write_timeout_s=settings.db_write_timeout_s,
            read_timeout_s=settings.db_read_timeout_s,
            probe_interval_s=settings.db_probe_interval_s,
            threads=settings.db_writer_threads,
            spool_timeout_s=settings.spool_timeout_s,
            on_recover=None
            if migrated
            else lambda: migrate(db, settings.database_schema, settings.db_partitions_ahead_days),
        )
        # Normal ranges stored with the risk model: reason codes say what is typical (older artifacts: none).
        risk_record = registry.serving_record(models.versions["risk"]) if models.risk else None
        ranges = ranges_of_model(settings.model_dir, risk_record)
        reasons = ReasonBuilder.for_models(models.risk, models.anomaly, ranges, rules)
        ids = DecisionIdGenerator(node_id)
        engine = DecisionEngine(settings, spec, store, models, rules, writer, ids=ids, reasons=reasons)
        narrator = Narrator(settings, repository, open_chat_client(settings), ranges, writer).start()
        if models.errors:
            log.warning("serving with fallbacks for: %s", models.errors)
        if models.shadow_version:
            log.info("shadow policy %s: %s", models.shadow_version, models.shadow_error or "loaded")
        producer, inline_worker = None, None
        if settings.kafka_bootstrap_servers:
            try:
                ensure_topics(settings)
            except Exception as exc:  # the broker may come later: decisions must not wait for it
                log.warning("could not check the Kafka topics (%s); POST /events answers 503 meanwhile", exc)
            producer = EventProducer(settings)
        else:
            inline_worker = StreamWorker(settings, engine, store, InProcessSink())
        platform = cls(
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
            DecisionBatcher(engine, settings.api_batch_max, settings.api_batch_wait_ms / 1000.0),
        )
        platform._attempted = models.registry_state
        if db.dialect.name == "postgresql":
            platform.partitions = PartitionKeeper(
                db, settings.db_partitions_ahead_days, settings.db_partition_check_s
            ).start()
        return platform

    # --- hot reload of the models
    def reload_models(self) -> ReloadResult:
        """Load the registry's champions and shadow now and serve them from the next decision on.

        Models whose version did not change are reused, not read again. The new set and the reason
        builder made from it replace the old ones in one assignment (DecisionEngine.swap_models), so
        decisions in flight finish with the set they started with. The swap is refused, and the current
        set kept, when it would make serving worse: a complete set replaced by one with a champion that
        cannot be loaded (a corrupt artifact), or models on other feature definitions than the feature
        store computes (that needs a restart). A shadow that cannot be loaded never blocks a swap.
        """
        with self._reload_lock:
            current = self.engine.models
            new = load_champions(self.registry, reuse=current)
            self._attempted = new.registry_state
            reason = None
            if new.spec is not None and new.spec.names != self.engine.spec.names:
                reason = "the new models use other feature definitions than the feature store; restart"
            elif current.complete and not new.complete:
                reason = f"the new champions cannot all be loaded ({new.errors}); kept the current ones"
            if reason is not None:
                log.error("model reload refused: %s", reason)
                metrics.MODEL_RELOADS.labels(result="refused").inc()
                return self._result(False, current, reason, new)
            if new.risk is current.risk and new.anomaly is current.anomaly:
                reasons = self.engine.reasons
            else:
                reasons, ranges = self._reason_builder(new)
                if self.narrator is not None:
                    self.narrator.ranges = ranges
            self.engine.swap_models(new, reasons)
            self.models = new
            self._retire_metrics(current, new)
            metrics.MODEL_RELOADS.labels(result="applied").inc()
            log.info("serving models %s, shadow %s", new.versions, new.shadow_versions or "none")
            return self._result(True, new)

    def refresh_models(self) -> ReloadResult | None:
        """Reload if the registry's champions or shadow changed since the last attempt (a cheap query).

        The poll is bounded as a request's read is (``DecisionWriter.query``: DatabaseUnavailable at once
        while the database is known to be down, within DP_DB_READ_TIMEOUT_S when it stalls): unbounded, a
        frozen PostgreSQL held the refresher for the whole freeze, and its stop for 5 s."""
        if self.writer.query(self.registry.serving_state) == self._attempted:
            return None
        return self.reload_models()

    def start_model_refresh(self) -> bool:
        """Start polling the registry every ``model_refresh_s`` (0: never); False if not started."""
        if self.refresher is not None or self.settings.model_refresh_s <= 0:
            return False
        self.refresher = ModelRefresher(self, self.settings.model_refresh_s).start()
        return True

    def stop_model_refresh(self) -> None:
        if self.refresher is not None:
            self.refresher.close()
            self.refresher = None

    def _reason_builder(self, models: LoadedModels) -> tuple[ReasonBuilder | None, Any]:
        risk_record = self.registry.serving_record(models.versions["risk"]) if models.risk else None
        ranges = ranges_of_model(self.settings.model_dir, risk_record)
        builder = ReasonBuilder.for_models(models.risk, models.anomaly, ranges, self.rules)
        return builder, ranges

    @staticmethod
    def _retire_metrics(old: LoadedModels, new: LoadedModels) -> None:
        for kind, version in old.versions.items():
            if new.versions.get(kind) != version:
                metrics.MODEL_INFO.labels(kind=kind, version=version).set(0)
        for kind, version in old.shadow_versions.items():
            if new.shadow_versions.get(kind) != version:
                metrics.SHADOW_MODEL_INFO.labels(kind=kind, version=version).set(0)

    @staticmethod
    def _result(
        applied: bool, serving: LoadedModels, reason: str | None = None, attempted: LoadedModels | None = None
    ) -> ReloadResult:
        source = attempted or serving
        return ReloadResult(
            applied,
            dict(serving.versions),
            serving.shadow_versions,
            dict(source.errors),
            source.shadow_error,
            reason,
        )

    def serving(self) -> ReloadResult:
        """What serves now, in the shape of a reload result."""
        return self._result(True, self.engine.models)

    def close(self) -> None:
        self.stop_model_refresh()
        if self.batcher is not None:
            self.batcher.close()
        if self.partitions is not None:
            self.partitions.close()
        if self.narrator is not None:
            self.narrator.close()
        if self.producer is not None:
            self.producer.close()
        self.writer.close()
        self.store.close()
        self.repository.engine.dispose()
        if self.repository.batch_engine is not None:
            self.repository.batch_engine.dispose()


def limit_native_threads() -> None:
    """One BLAS thread per process. The serving matrices are small (a batch of rows through 256-wide
    layers): OpenBLAS's worker threads spin-wait for work, and on 2 cores shared with PostgreSQL, Redis and
    the other requests they made ``RiskModel.explain`` of 16 rows 17x slower (60 ms against 3.6 ms,
    measured with a busy neighbour). Results are the same: each output element is still one dot product."""
    threadpool_limits(limits=1, user_api="blas")


#: The stream worker's young-generation threshold for the cyclic garbage collector (the default is 700).
WORKER_GC_THRESHOLD = 20_000


def settle_heap(young_threshold: int | None = None) -> None:
    """Keep the garbage collector off the hot path of a long-running process; call once it has started.

    Freeze: the libraries and models leave ~350-550k long-lived objects that every full collection walks
    again (~240 ms each in the stream worker, ~200 ms under load in the API: /health p99 at concurrency 32
    went from ~300 ms to ~17 ms when the API froze them).

    ``young_threshold`` (the stream worker: :data:`WORKER_GC_THRESHOLD`): a batch of 500 events keeps ~10k
    container objects alive at once, so at the default 700 the young generation was collected ~250 times
    a second and its survivors promoted, for objects reference counting frees a moment later anyway; at
    20,000 it is collected a few times a run. Stream worker, quiet machine, 30,000 events (bench/README.md,
    s28), freeze and threshold together: 5,182 -> 6,263 events/s, 156 -> 124 µs of CPU an event; cyclic
    garbage still goes, after every 20,000 net allocations. The API keeps the default: there a collection
    of up to 20,000 young objects lands inside some requests (decide p99 at 16 connections 16 -> 20 ms for
    +3-5% throughput)."""
    gc.collect()
    gc.freeze()
    if young_threshold is not None:
        gc.set_threshold(young_threshold, *gc.get_threshold()[1:])


def _serving_cache(settings: Settings) -> Path:
    """Where the registry's serving records are cached, one file per database (and schema)."""
    key = hashlib.sha256(f"{settings.database_url}|{settings.database_schema or ''}".encode()).hexdigest()
    return settings.model_dir / f".serving-{key[:16]}.json"


def _migrate_within(db: sa.Engine, settings: Settings, timeout_s: float) -> bool:
    """Migrate unless the database is down or does not answer in time (then False: start degraded)."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            migrate(db, settings.database_schema, settings.db_partitions_ahead_days)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="migrate", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("the database did not answer within %s s: starting degraded (spooling)", timeout_s)
        return False
    if failure:
        if not is_outage(failure[0]):
            raise failure[0]
        log.warning("the database is unavailable (%s): starting degraded (spooling)", failure[0])
        return False
    return True
