"""The decision pipeline: every stage composed in one place.

    features (Redis) -> anomaly -> risk -> policy -> rules -> action -> stored decision

Each stage is a small object with its own interface; the engine only wires them, times them, and
turns any failure into a fallback: rules still apply, the configured safe action is taken, the reason
is recorded and counted. A decision request never raises because a dependency failed.

The models (and the reason builder made from them) are one immutable serving set, swapped in a single
assignment by a hot reload (:meth:`DecisionEngine.swap_models`); a batch reads it once, so decisions in
flight finish with the set they started with. A shadow policy in the set scores the same states and
its choice is logged with the decision, never applied.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from decision_platform.config import Settings
from decision_platform.core.actions import ACTION_NAMES
from decision_platform.core.events import Event
from decision_platform.core.ids import DecisionIdGenerator
from decision_platform.core.records import (
    DUPLICATE,
    FIRST_DAMAGED,
    ID_REUSED,
    ID_TAKEN,
    DecisionRecord,
    RowStatus,
    refusal_message,
)
from decision_platform.explain.attributions import ReasonBuilder
from decision_platform.explain.reasons import template_sentence
from decision_platform.features import FeatureResult, FeatureSpec, FeatureStore, FeatureStoreError
from decision_platform.models.bundle import LoadedModels
from decision_platform.models.policy import serving_distribution, serving_distributions
from decision_platform.models.scoring import ScoringChain
from decision_platform.observability import metrics
from decision_platform.rules.ruleset import BatchFacts, RuleSet, RuleVerdict
from decision_platform.storage.decisions import intact
from decision_platform.storage.errors import DamagedDecisionError

log = logging.getLogger(__name__)

#: ``dp_damaged_rows_total{reader}`` of a retried event's first decision (serving/engine.py first_decision).
RETRY_READER = "retried event"
#: Batches this small are decided row by row: the columns' fixed cost (numpy per rule) is more than the
#: per-row work it saves below ~4 rows (rules + records stage, CPU per decision, same process: 1 row
#: 280 us row by row vs 580 batched; 4 rows 228 vs 210; 16 rows 186 vs 75).
BATCHED_FROM = 4


class StageError(Exception):
    """A stage failed; ``reason`` is the fallback reason recorded on the decision."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DecisionSink(Protocol):
    """Where decided records go (storage/writer.py's DecisionWriter): ``submit_many`` hands a batch's records
    to the group commit and returns at once; its one future resolves once all are durable, with each
    record's status (stored | spooled | duplicate) or the exception that kept it from being durable.
    ``find_decision_by_event``: the first decision of an event."""

    def submit_many(self, records: list[DecisionRecord]) -> Future[list[RowStatus]]: ...

    def find_decision_by_event(self, event_id: str) -> DecisionRecord | None: ...


@dataclass(frozen=True)
class DecisionRequest:
    entity_id: str
    event: Event | None = None


@dataclass(frozen=True)
class ServingSet:
    """What decides: the loaded models and the reason builder made from them, swapped together."""

    models: LoadedModels
    reasons: ReasonBuilder | None


@dataclass
class Decision:
    """The engine's result: the record, the API response derived from it, and where it was stored."""

    record: DecisionRecord
    response: dict[str, Any]
    #: stored | spooled | duplicate (the event had been decided before: ``record`` is that decision) |
    #: one of REFUSED (id_taken, id_reused, first_damaged: ``record`` was refused, never stored; no answer)
    storage: str
    #: What a refused request is told (core.records.refusal_message): the 409's detail, the dead letter's.
    refusal: str = ""


@dataclass
class PendingDecision:
    """A decided record on its way to durability: ``storage`` resolves once its group commit (or the spool)
    has it. Nothing may be answered before that (:meth:`DecisionEngine.finish`)."""

    record: DecisionRecord
    storage: Future[list[RowStatus]]  # the batch's, shared by its decisions
    index: int  # this record's place in the batch
    clock: _BatchClock
    event: Event | None = None  # what was decided on, if an event (withdrawn from the windows if refused)


class _BatchClock:
    """The store and total stages of one batch: the batch's future calls ``done`` from the writer thread,
    which only notes the time it was durable; ``report`` observes the histograms once, from a finishing
    thread. (Observing on the writer thread made it and the decider contend for the histogram's lock: a
    holder preempted by the GIL kept the other waiting for a whole switch interval, 5 ms.)"""

    def __init__(self, started: float, stored_from: float) -> None:
        self.started, self.stored_from = started, stored_from
        self.durable_at: float | None = None
        self._reported = False
        self._lock = threading.Lock()

    def done(self, _future: Future[list[RowStatus]]) -> None:
        with self._lock:
            self.durable_at = time.perf_counter()

    def report(self) -> None:
        with self._lock:
            if self.durable_at is None or self._reported:
                return
            self._reported = True
        metrics.stage_latency("store").observe(self.durable_at - self.stored_from)
        metrics.stage_latency("total").observe(self.durable_at - self.started)


class _Stopwatch:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        metrics.stage_latency(stage).observe(now - self.last)
        self.last = now


class DecisionEngine:
    """Decides one request (the API) or a batch (the stream worker) with the same code.

    Batches share one pipelined feature-store round trip, vectorised model calls and group commits.
    """

    def __init__(
        self,
        settings: Settings,
        spec: FeatureSpec,
        store: FeatureStore,
        models: LoadedModels,
        rules: RuleSet,
        writer: DecisionSink,
        ids: DecisionIdGenerator | None = None,
        reasons: ReasonBuilder | None = None,
    ) -> None:
        self.settings = settings
        #: The models and the reason builder (risk + attributions in one vectorised pass, reason codes;
        #: built from the models if not given), replaced as one by swap_models().
        self._serving = ServingSet(models, reasons)
        self.spec = spec
        self.store = store
        self.rules = rules
        self.writer = writer
        self.ids = ids or DecisionIdGenerator()
        self._rng = np.random.default_rng(settings.policy_seed)
        self._rng_lock = threading.Lock()

    @property
    def models(self) -> LoadedModels:
        return self._serving.models

    @property
    def reasons(self) -> ReasonBuilder | None:
        return self._serving.reasons

    @reasons.setter
    def reasons(self, reasons: ReasonBuilder | None) -> None:
        self._serving = ServingSet(self._serving.models, reasons)

    def swap_models(self, models: LoadedModels, reasons: ReasonBuilder | None) -> None:
        """Serve ``models`` from the next batch on: one attribute assignment (atomic), so no batch ever
        sees new models with the old reason builder or the other way round."""
        self._serving = ServingSet(models, reasons)

    # --- stages
    def _features(
        self, requests: Sequence[DecisionRequest], precomputed: Sequence[FeatureResult] | None
    ) -> list[FeatureResult]:
        """One pipelined update for the events, a read for each request without one."""
        if precomputed is not None:
            return list(precomputed)
        try:
            events = [r.event for r in requests if r.event is not None]
            updated = iter(self.store.update(events) if events else [])
            readers = [r.entity_id for r in requests if r.event is None]
            read = iter(self.store.read_many(readers, time.time()) if readers else [])
            results = [next(updated) if r.event is not None else next(read) for r in requests]
        except Exception as exc:
            metrics.FEATURE_STORE_ERRORS.labels(operation="update").inc()
            log.warning("feature store failed: %s", exc.__class__.__name__)
            raise StageError("feature_store_unavailable") from exc
        kinds: dict[str, int] = {}
        for request, result in zip(requests, results, strict=True):
            if request.event is not None:
                kind = "duplicate" if result.duplicate else "late" if result.late else "applied"
                kinds[kind] = kinds.get(kind, 0) + 1
        for kind, n in kinds.items():
            metrics.FEATURE_EVENTS.labels(result=kind).inc(n)
        damaged = [(r.entity_id, f.error) for r, f in zip(requests, results, strict=True) if f.error]
        if damaged:
            metrics.FEATURE_STORE_ERRORS.labels(operation="entity").inc(len(damaged))
            log.warning("windows of %d entities could not be read, e.g. %s: %s", len(damaged), *damaged[0])
        return results

    @staticmethod
    def _require(serving: ServingSet, kind: str) -> Any:
        model = getattr(serving.models, kind)
        if model is None:
            raise StageError(f"model_unavailable:{kind}")
        return model

    def _reason_builder(self, serving: ServingSet, risk_model: Any) -> ReasonBuilder:
        if serving.reasons is not None and serving.reasons.model is risk_model:
            return serving.reasons
        builder = ReasonBuilder(risk_model, serving.models.anomaly, None, self.rules)
        if self._serving is serving:  # kept for the next batches, unless a reload replaced the set
            self._serving = ServingSet(serving.models, builder)
        return builder

    def _rules_fired(
        self, reasons: ReasonBuilder | None, verdict: RuleVerdict, facts: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Fired rules with the inputs they tested (values and normal ranges), for the record."""
        if reasons is not None:
            return reasons.rules_fired(verdict.fired, facts)
        return [{"name": r.name, "tier": r.tier.value, "description": r.description} for r in verdict.fired]

    def _sample(self, distribution: np.ndarray) -> int:
        with self._rng_lock:
            u = self._rng.random() * float(distribution.sum())
        cumulative = 0.0
        for action in range(3):
            cumulative += float(distribution[action])
            if u < cumulative:
                return action
        return max(a for a in range(3) if distribution[a] > 0)

    def _sample_many(self, distributions: np.ndarray) -> list[int]:
        """:meth:`_sample` of each row, in order: the same rng draws and the same comparisons."""
        with self._rng_lock:
            draws = self._rng.random(len(distributions))
        first = distributions[:, 0]
        second = first + distributions[:, 1]
        third = second + distributions[:, 2]  # distribution.sum() of three: left to right
        u = draws * third
        actions = np.where(u < first, 0, np.where(u < second, 1, np.where(u < third, 2, -1))).tolist()
        for k in [k for k, a in enumerate(actions) if a < 0]:
            actions[k] = max(a for a in range(3) if distributions[k, a] > 0)
        return actions

    def _fallback_action(self, verdict: RuleVerdict) -> int:
        """The safe action, moved to the nearest action the rules allow (block rules still block)."""
        safe = self.settings.safe_action
        allowed = [a for a, ok in enumerate(verdict.mask) if ok]
        return min(allowed, key=lambda a: (abs(a - safe), -a))

    def _score(
        self,
        requests: Sequence[DecisionRequest],
        watch: _Stopwatch,
        features: Sequence[FeatureResult] | None,
        serving: ServingSet,
    ) -> _Scores:
        """Features and model scores for every request; a failure falls the whole batch back."""
        scores = _Scores(len(requests))
        try:
            results = self._features(requests, features)
            scores.features = np.vstack([r.values for r in results])
            watch.lap("features")
            for i, result in enumerate(results):
                if result.error is not None:
                    scores.fallbacks[i] = "entity_windows_unreadable"
            finite = np.all(np.isfinite(scores.features), axis=1)
            if not finite.all():
                for i in np.flatnonzero(~finite):
                    scores.fallbacks[i] = scores.fallbacks[i] or "invalid_features"
                scores.features = np.where(finite[:, None], scores.features, 0.0)
            chain = ScoringChain(
                self._require(serving, "anomaly"),
                self._require(serving, "risk"),
                self._require(serving, "policy"),
            )
            # The risk and its attributions (what the reasons are made of) in one vectorised pass.
            scored = chain.score(scores.features, attributions=True, lap=watch.lap)
            scores.anomaly, scores.risk = scored.anomaly, scored.risk
            scores.probabilities = chain.policy.probabilities(scored.states)
            for i in np.flatnonzero(_unusable_scores(scores.anomaly, scores.risk, scores.probabilities)):
                scores.fallbacks[i] = scores.fallbacks[i] or "invalid_scores"
            # The shadow's time counts in the policy stage: it is part of what a decision costs.
            scores.shadow = self._shadow_probabilities(serving.models, scores)
            watch.lap("policy")
            builder = scores.builder = self._reason_builder(serving, chain.risk)
            attributes = [r.event.attributes if r.event is not None else None for r in requests]
            assert scored.attributions is not None
            scores.reasons = builder.reasons(
                scored.risk_inputs, scored.attributions, scores.anomaly, attributes
            )
            watch.lap("reasons")
        except StageError as exc:
            scores.fail(exc.reason)
        except Exception as exc:  # a model raised: never let it become a 5xx
            log.exception("decision stage failed")
            scores.fail(f"stage_error:{exc.__class__.__name__}")
        return scores

    @staticmethod
    def _shadow_probabilities(models: LoadedModels, scores: _Scores) -> np.ndarray | None:
        """The shadow policy's probabilities for the whole batch, on the features and scores the champion
        saw (its own scaler is inside ``state``); None without a shadow, or if it fails (never raises)."""
        shadow = models.shadow_policy
        if shadow is None or scores.features is None:
            return None
        try:
            return shadow.probabilities(shadow.state(scores.features, scores.anomaly, scores.risk))
        except Exception:
            log.exception("shadow policy %s failed; decisions go on without it", models.shadow_version)
            metrics.SHADOW_ERRORS.labels(stage="score").inc()
            return None

    def _shadow_record(
        self, models: LoadedModels, probabilities: np.ndarray, mask: Sequence[bool], champion_choice: int
    ) -> dict[str, Any]:
        """What the shadow would have done under the same rules and exploration floor (logged only)."""
        distribution = serving_distribution(
            probabilities, mask, self.settings.exploration_floor, self.settings.explore_actions
        )
        action = int(np.argmax(distribution))
        metrics.SHADOW_DECISIONS.labels(agrees="true" if action == champion_choice else "false").inc()
        return {"version": models.shadow_version, "action": action, "probabilities": distribution.tolist()}

    # --- the pipeline
    def decide(self, entity_id: str, event: Event | None = None) -> Decision:
        return self.decide_batch([DecisionRequest(entity_id, event)])[0]

    def decide_batch(
        self, requests: Sequence[DecisionRequest], features: Sequence[FeatureResult] | None = None
    ) -> list[Decision]:
        """Decide every request and wait until each is durable. ``features``: already applied results of
        the requests' events (the stream worker updates windows itself, so that a feature-store outage
        retries the batch)."""
        return self.finish_batch(self.submit_batch(requests, features))

    def submit_batch(
        self, requests: Sequence[DecisionRequest], features: Sequence[FeatureResult] | None = None
    ) -> list[PendingDecision]:
        """Decide every request and hand the records to the group commit without waiting for it: the
        API's decider goes on to the next batch while this one's commit runs (serving/batcher.py)."""
        watch = _Stopwatch()
        serving = self._serving  # read once: a reload meanwhile applies from the next batch
        scores = self._score(requests, watch, features, serving)
        records = self._decide(requests, scores, serving)
        watch.lap("rules")
        decided_ms = (time.perf_counter() - watch.start) * 1000.0
        clock = _BatchClock(watch.start, time.perf_counter())
        for record in records:
            record.latency_ms = decided_ms  # time to decide, before storage (stored with the decision)
        future = self.writer.submit_many(records)
        future.add_done_callback(clock.done)
        return [
            PendingDecision(record, future, i, clock, request.event)
            for i, (record, request) in enumerate(zip(records, requests, strict=True))
        ]

    def finish(self, pending: PendingDecision, timeout_s: float = 60.0) -> Decision:
        """The answer for a durable decision (waits for it; raises what the write path raised: nothing
        durable, nothing acknowledged). A duplicate event is answered with its first decision, whether it
        is in the database or still in the spool."""
        return self.finish_batch([pending], timeout_s)[0]

    def finish_batch(self, pending: Sequence[PendingDecision], timeout_s: float = 60.0) -> list[Decision]:
        """:meth:`finish` of every decision of a batch, in order (raises the first row's failure)."""
        for storage in {id(p.storage): p.storage for p in pending}.values():  # one wait a batch, not a row
            storage.result(timeout=timeout_s)  # durable, or raises what kept the batch from it
        decisions: list[Decision] = []
        for answer in self.answers(pending):
            if isinstance(answer, BaseException):
                raise answer
            decisions.append(self.first_decision(answer) if isinstance(answer, PendingDecision) else answer)
        return decisions

    def answers(self, pending: Sequence[PendingDecision]) -> list[Decision | PendingDecision | BaseException]:
        """The answers of decisions that are already durable, without blocking: each row's Decision, the
        exception that kept it from being durable, or -- a retried event -- the row itself, whose first
        decision :meth:`first_decision` reads (a database or spool read: off an event loop). The decision
        counter is incremented once per (action, decided_by) and each batch's latencies observed once (a
        labelled increment a row was ~6% of the stream worker thread's py-spy samples)."""
        now = time.perf_counter()
        answers: list[Decision | PendingDecision | BaseException] = []
        counts: dict[tuple[int, str], int] = {}
        clocks: dict[int, _BatchClock] = {}
        batches: dict[int, list[RowStatus] | BaseException] = {}  # a batch's future read once, not a row
        for p in pending:
            clocks.setdefault(id(p.clock), p.clock)
            statuses = batches.get(id(p.storage))
            if statuses is None:
                try:
                    statuses = p.storage.result(timeout=0.0)
                except BaseException as error:  # the whole batch's failure
                    statuses = error
                batches[id(p.storage)] = statuses
            stored = statuses if isinstance(statuses, BaseException) else statuses[p.index]
            if isinstance(stored, BaseException):  # the write path's failure is this row's answer
                answers.append(stored)
                continue
            record = p.record
            if stored == DUPLICATE and record.event_id is not None:
                answers.append(p)
                continue
            key = (record.action, record.decided_by)
            counts[key] = counts.get(key, 0) + 1
            total_ms = round((now - p.clock.started) * 1000.0, 3)
            answers.append(Decision(record, record.response(total_ms), stored))
        for clock in clocks.values():
            clock.report()
        for (action, decided_by), n in counts.items():
            metrics.DECISIONS.labels(action=ACTION_NAMES[action], decided_by=decided_by).inc(n)
        return answers

    def first_decision(self, retried: PendingDecision) -> Decision:
        """The answer to a retried event: its first decision (database or spool), else this one's record.

        A first decision stored damaged is refused (FIRST_DAMAGED, counted under "retried event": the
        ``/decide`` retry and the stream's redelivery alike): its row is not what the platform decided
        (an action of 3 was a 500, -1 was answered "block"), and deciding the event again would decide it
        twice. The windows kept the first event (they skip a known id): nothing to withdraw."""
        event_id = retried.record.event_id
        assert event_id is not None, "only an event can be retried"
        first = self.writer.find_decision_by_event(event_id)
        if first is not None and first.entity_id != retried.record.entity_id:
            return self._id_taken(retried)
        if first is not None:
            try:
                intact(first, RETRY_READER)
            except DamagedDecisionError as exc:
                return self._refused(retried, FIRST_DAMAGED, str(exc))
        if first is not None and _other_content(first, retried.record):
            # The windows kept the first event (they skip a known id): nothing to withdraw.
            metrics.EVENT_ID_CONFLICTS.inc()
            return self._refused(retried, ID_REUSED)
        if first is not None:
            return Decision(first, first.response(), DUPLICATE)
        record = retried.record
        metrics.DECISIONS.labels(action=ACTION_NAMES[record.action], decided_by=record.decided_by).inc()
        total_ms = round((time.perf_counter() - retried.clock.started) * 1000.0, 3)
        return Decision(record, record.response(total_ms), DUPLICATE)

    def _id_taken(self, refused: PendingDecision) -> Decision:
        """Another entity's event holds this event's id. Producers that number events per account reuse
        ids across accounts; the decision log keeps one decision per id, so this event cannot have one.
        Its windows took it before the log refused it: it is withdrawn, so the entity's later decisions do
        not count an event that was never decided (best effort: a store failure is counted and logged)."""
        metrics.EVENT_ID_CONFLICTS.inc()
        if refused.event is not None:
            try:
                if self.store.withdraw(refused.event):
                    metrics.FEATURE_EVENTS.labels(result="withdrawn").inc()
            except FeatureStoreError as exc:
                metrics.FEATURE_STORE_ERRORS.labels(operation="withdraw").inc()
                log.warning("withdrawing event %s from the windows failed: %s", refused.record.event_id, exc)
        return self._refused(refused, ID_TAKEN)

    @staticmethod
    def _refused(refused: PendingDecision, storage: str, damage: str = "") -> Decision:
        """``refused``'s own record (never stored) with the words its refusal is told."""
        record = refused.record
        message = refusal_message(storage, record.event_id or "", damage)
        return Decision(record, record.response(), storage, message)

    #: Decide a batch's rows from columns (rules over the batch, facts dicts only for fired rules); False:
    #: row by row, the straightforward way (the reference in tests/unit/test_fast_path.py).
    batched = True

    def _decide(
        self, requests: Sequence[DecisionRequest], scores: _Scores, serving: ServingSet
    ) -> list[DecisionRecord]:
        """Rules, action and record of every row: the same records as :meth:`_decide_one` row by row."""
        if not self.batched or len(requests) < BATCHED_FROM:
            return [self._decide_one(i, request, scores, serving) for i, request in enumerate(requests)]
        n = len(requests)
        names = self.spec.names
        fallbacks = scores.fallbacks
        events = [r.event for r in requests]
        # The stored snapshot, one dict per row (the record's), from one conversion of the matrix.
        matrix = scores.features
        feature_maps = (
            [dict(zip(names, row, strict=True)) for row in matrix.tolist()]
            if matrix is not None
            else [{} for _ in range(n)]
        )
        amounts = [
            float(e.amount or 0.0) if e is not None else float(m.get("amount", 0.0))
            for e, m in zip(events, feature_maps, strict=True)
        ]
        scored = np.array([f is None for f in fallbacks], dtype=bool)
        anomalies = scores.anomaly.tolist() if scores.anomaly is not None else None
        risks = scores.risk.tolist() if scores.risk is not None else None
        for fallback in fallbacks:
            if fallback:
                metrics.FALLBACKS.labels(reason=fallback).inc()
        if scores.anomaly is not None and scored.any():
            metrics.observe_many(metrics.ANOMALY_SCORE, scores.anomaly[scored])
        if scores.risk is not None and scored.any():
            metrics.observe_many(metrics.RISK_SCORE, scores.risk[scored])
        attributes = [dict(e.attributes) if e is not None else {} for e in events]
        verdicts = self.rules.evaluate_batch(
            self._batch_facts(requests, scores, matrix, amounts, attributes, scored)
        )
        builder = scores.builder if scores.builder is not None else serving.reasons
        proposed_all = (
            np.argmax(scores.probabilities, axis=1).tolist() if scores.probabilities is not None else None
        )
        versions = serving.models.versions
        # The served distributions and the sampled actions of the scored rows, over columns (the same
        # numbers as serving_distribution and _sample row by row, and the same draws from the rng).
        live = [i for i in range(n) if not fallbacks[i]] if scores.probabilities is not None else []
        served: dict[int, tuple[list[float], int, int]] = {}
        if live:
            assert scores.probabilities is not None
            distributions = serving_distributions(
                scores.probabilities[live],
                np.array([verdicts[i].mask for i in live], dtype=bool),
                self.settings.exploration_floor,
                self.settings.explore_actions,
            )
            actions = self._sample_many(distributions)
            favoured = distributions.argmax(axis=1).tolist()  # what a draw other than it explored from
            for k, i in enumerate(live):
                served[i] = (distributions[k].tolist(), actions[k], favoured[k])
        records = []
        for i, request in enumerate(requests):
            event, fallback, verdict = events[i], fallbacks[i], verdicts[i]
            anomaly = anomalies[i] if anomalies is not None and not fallback else None
            risk = risks[i] if risks is not None and not fallback else None
            probabilities = (
                scores.probabilities[i] if scores.probabilities is not None and not fallback else None
            )
            reasons = scores.reasons[i] if scores.reasons is not None and not fallback else []
            shadow = None
            favoured = None
            if probabilities is None or proposed_all is None:
                proposed = None
                action, propensity, decided_by = self._fallback_action(verdict), 1.0, "fallback"
            else:
                proposed = proposed_all[i]
                distribution, action, favoured = served[i]
                propensity = distribution[action]
                forced = verdict.forced_action is not None or not verdict.mask[proposed]
                decided_by = "rule" if forced else "policy"
                if scores.shadow is not None:
                    shadow = self._shadow_record(serving.models, scores.shadow[i], verdict.mask, favoured)
            rules_fired: list[dict[str, Any]] = []
            if verdict.fired:  # the inputs the fired rules tested: this row's facts, built only here
                facts: dict[str, Any] = {
                    **feature_maps[i],
                    "amount": amounts[i],
                    "entity_id": request.entity_id,
                    "event_type": event.event_type if event else "",
                    "attributes": attributes[i],
                }
                if anomaly is not None:
                    facts["anomaly"] = anomaly
                if risk is not None:
                    facts["risk"] = risk
                rules_fired = self._rules_fired(builder, verdict, facts)
            records.append(
                self._record(
                    request,
                    verdict,
                    features=feature_maps[i],
                    anomaly=anomaly,
                    risk=risk,
                    probabilities=probabilities,
                    proposed=proposed,
                    action=action,
                    propensity=propensity,
                    decided_by=decided_by,
                    rules_fired=rules_fired,
                    fallback=fallback,
                    versions=versions,
                    reasons=reasons,
                    shadow=shadow,
                    favoured=favoured,
                )
            )
        return records

    def _record(
        self,
        request: DecisionRequest,
        verdict: RuleVerdict,
        *,
        features: dict[str, float],
        anomaly: float | None,
        risk: float | None,
        probabilities: np.ndarray | None,
        proposed: int | None,
        action: int,
        propensity: float,
        decided_by: str,
        rules_fired: list[dict[str, Any]],
        fallback: str | None,
        versions: dict[str, str],
        reasons: list[dict[str, Any]],
        shadow: dict[str, Any] | None,
        favoured: int | None = None,
    ) -> DecisionRecord:
        """The record of one decided request (both paths build it here: the same fields, the same way)."""
        event = request.event
        return DecisionRecord(
            id=self.ids.next_id(),
            entity_id=request.entity_id,
            event_id=event.event_id if event else None,
            created_at=datetime.now(UTC),
            features=features,
            # As sent: an event without an amount is stored without one (its features and rules read 0).
            amount=event.amount if event else None,
            anomaly=anomaly,
            risk=risk,
            probabilities=probabilities.tolist() if probabilities is not None else None,
            proposed_action=proposed,
            action_mask=list(verdict.mask),
            action=action,
            propensity=propensity,
            decided_by=decided_by,
            rules_fired=rules_fired,
            fallback=fallback,
            model_versions=dict(versions),
            reasons=reasons,
            explanation=template_sentence(action, risk, reasons, verdict.fired, fallback, favoured),
            explanation_source="template",
            latency_ms=0.0,
            event_type=event.event_type if event else None,
            attributes=dict(event.attributes) if event else None,
            shadow=shadow,
        )

    def _batch_facts(
        self,
        requests: Sequence[DecisionRequest],
        scores: _Scores,
        matrix: np.ndarray | None,
        amounts: list[float],
        attributes: list[dict[str, Any]],
        scored: np.ndarray,
    ) -> BatchFacts:
        """The rules' facts as columns: each row's are what :meth:`_decide_one` puts in its dict."""
        numbers: dict[str, np.ndarray] = {}
        if matrix is not None:
            numbers.update({name: matrix[:, k] for k, name in enumerate(self.spec.names)})
        numbers["amount"] = np.asarray(amounts, dtype=np.float64)
        present: dict[str, np.ndarray] = {}
        for name, column in (("anomaly", scores.anomaly), ("risk", scores.risk)):
            if column is None:
                if name in numbers:  # a feature of that name stays the fact when there is no score
                    continue
                numbers[name], present[name] = np.zeros(len(requests)), np.zeros(len(requests), dtype=bool)
            elif name in numbers:  # a score shadows a feature of the same name where it exists
                numbers[name] = np.where(scored, column, numbers[name])
            else:
                numbers[name], present[name] = np.asarray(column, dtype=np.float64), scored
        strings = {
            "entity_id": [r.entity_id for r in requests],
            "event_type": [r.event.event_type if r.event is not None else "" for r in requests],
        }
        for name in strings:
            numbers.pop(name, None)
        return BatchFacts(len(requests), numbers, present, strings, attributes)

    def _decide_one(
        self, i: int, request: DecisionRequest, scores: _Scores, serving: ServingSet
    ) -> DecisionRecord:
        """Row i decided the straightforward way: a facts dict of every feature, each rule by CEL (the
        reference the batched :meth:`_decide` is held to: tests/unit/test_fast_path.py)."""
        event = request.event
        fallback = scores.fallbacks[i]
        features = scores.features[i] if scores.features is not None else None
        feature_map = (
            dict(zip(self.spec.names, features.tolist(), strict=True)) if features is not None else {}
        )
        anomaly = float(scores.anomaly[i]) if scores.anomaly is not None and not fallback else None
        risk = float(scores.risk[i]) if scores.risk is not None and not fallback else None
        probabilities = scores.probabilities[i] if scores.probabilities is not None and not fallback else None
        reasons = scores.reasons[i] if scores.reasons is not None and not fallback else []
        if fallback:
            metrics.FALLBACKS.labels(reason=fallback).inc()

        amount = float(event.amount or 0.0) if event else float(feature_map.get("amount", 0.0))
        facts: dict[str, Any] = {
            **feature_map,
            "amount": amount,
            "entity_id": request.entity_id,
            "event_type": event.event_type if event else "",
            "attributes": dict(event.attributes) if event else {},
        }
        if anomaly is not None:
            facts["anomaly"] = anomaly
            metrics.ANOMALY_SCORE.observe(anomaly)
        if risk is not None:
            facts["risk"] = risk
            metrics.RISK_SCORE.observe(risk)
        verdict = self.rules.evaluate(facts)

        proposed = int(np.argmax(probabilities)) if probabilities is not None else None
        shadow, favoured = None, None
        if probabilities is None or proposed is None:
            action, propensity, decided_by = self._fallback_action(verdict), 1.0, "fallback"
        else:
            distribution = serving_distribution(
                probabilities, verdict.mask, self.settings.exploration_floor, self.settings.explore_actions
            )
            action = self._sample(distribution)
            favoured = int(np.argmax(distribution))
            propensity = float(distribution[action])
            forced = verdict.forced_action is not None or not verdict.mask[proposed]
            decided_by = "rule" if forced else "policy"
            if scores.shadow is not None:
                # Compared with the champion's choice, not its sampled action: exploration is not a
                # disagreement between the policies.
                shadow = self._shadow_record(serving.models, scores.shadow[i], verdict.mask, favoured)
        return self._record(
            request,
            verdict,
            features=feature_map,
            anomaly=anomaly,
            risk=risk,
            probabilities=probabilities,
            proposed=proposed,
            action=action,
            propensity=propensity,
            decided_by=decided_by,
            rules_fired=self._rules_fired(
                scores.builder if scores.builder is not None else serving.reasons, verdict, facts
            ),
            fallback=fallback,
            versions=serving.models.versions,
            reasons=reasons,
            shadow=shadow,
            favoured=favoured,
        )


def _unusable_scores(anomaly: np.ndarray, risk: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Rows whose model outputs cannot be decided on: a score that is not finite, or probabilities that
    are no distribution. A model that loads but computes NaN (weights corrupted before they were hashed,
    an overflow on extreme inputs) made the sampler raise: every /decide of the batch answered 500 and the
    stream worker retried its batch forever. Such rows fall back (rules + the safe action) instead."""
    finite = np.isfinite(anomaly) & np.isfinite(risk) & np.all(np.isfinite(probabilities), axis=1)
    distribution = np.all(probabilities >= 0, axis=1) & (probabilities.sum(axis=1) > 0)
    return ~(finite & distribution)


class _Scores:
    """What the scoring stages produced for a batch; ``fallbacks[i]`` is set when row i fell back."""

    def __init__(self, n: int) -> None:
        self.fallbacks: list[str | None] = [None] * n
        self.features: np.ndarray | None = None
        self.anomaly: np.ndarray | None = None
        self.risk: np.ndarray | None = None
        self.probabilities: np.ndarray | None = None
        #: The shadow policy's (n, 3) probabilities on the same states, when one is served.
        self.shadow: np.ndarray | None = None
        self.reasons: list[list[dict[str, Any]]] | None = None
        self.builder: ReasonBuilder | None = None

    def fail(self, reason: str) -> None:
        self.fallbacks = [f or reason for f in self.fallbacks]


def _other_content(first: DecisionRecord, again: DecisionRecord) -> bool:
    """Whether a retried event is another event under the same id: its amount, type or attributes differ
    from the first's (as stored). Its time is not compared: a client that leaves it out gets its arrival
    time, which differs on every retry. No amount and an amount of 0 are the same content: the windows read
    both as 0, and decisions stored before s28 hold 0.0 for an event sent without one."""
    return (
        (first.amount or 0.0) != (again.amount or 0.0)
        or first.event_type != again.event_type
        or (first.attributes or {}) != (again.attributes or {})
    )
