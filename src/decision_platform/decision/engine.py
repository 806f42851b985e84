"""The decision pipeline: every stage composed in one place.

    features (Redis) -> anomaly -> risk -> policy -> rules -> action -> stored decision

Each stage is a small object with its own interface; the engine only wires them, times them, and
turns any failure into a fallback: rules still apply, the configured safe action is taken, the reason
is recorded and counted. A decision request never raises because a dependency failed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from decision_platform.config import Settings
from decision_platform.decision.rules import RuleSet, RuleVerdict
from decision_platform.events.schema import Event
from decision_platform.explain.reasons import ACTION_NAMES, template_sentence, top_reasons
from decision_platform.features import FeatureSpec, FeatureStore
from decision_platform.models.bundle import LoadedModels
from decision_platform.models.policy import serving_distribution
from decision_platform.observability import metrics
from decision_platform.storage.ids import DecisionIdGenerator
from decision_platform.storage.repository import DecisionRow
from decision_platform.storage.writer import DecisionWriter

log = logging.getLogger(__name__)


class StageError(Exception):
    """A stage failed; ``reason`` is the fallback reason recorded on the decision."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Decision:
    """The engine's result: the API response and the stored row."""

    response: dict[str, Any]
    row: DecisionRow
    storage: str  # stored | spooled


class _Stopwatch:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        metrics.DECISION_LATENCY.labels(stage=stage).observe(now - self.last)
        self.last = now


class DecisionEngine:
    def __init__(
        self,
        settings: Settings,
        spec: FeatureSpec,
        store: FeatureStore,
        models: LoadedModels,
        rules: RuleSet,
        writer: DecisionWriter,
        ids: DecisionIdGenerator | None = None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.store = store
        self.models = models
        self.rules = rules
        self.writer = writer
        self.ids = ids or DecisionIdGenerator()
        self._rng = np.random.default_rng(settings.policy_seed)
        self._rng_lock = threading.Lock()

    # --- stages
    def _features(self, entity_id: str, event: Event | None) -> np.ndarray:
        try:
            if event is not None:
                result = self.store.update([event])[0]
                kind = "duplicate" if result.duplicate else "late" if result.late else "applied"
                metrics.FEATURE_EVENTS.labels(result=kind).inc()
            else:
                result = self.store.read(entity_id, time.time())
        except Exception as exc:
            metrics.FEATURE_STORE_ERRORS.labels(operation="update" if event else "read").inc()
            log.warning("feature store failed: %s", exc.__class__.__name__)
            raise StageError("feature_store_unavailable") from exc
        values = result.values
        if not np.all(np.isfinite(values)):
            raise StageError("invalid_features")
        return values

    def _require(self, kind: str) -> Any:
        model = getattr(self.models, kind)
        if model is None:
            raise StageError(f"model_unavailable:{kind}")
        return model

    def _sample(self, distribution: np.ndarray) -> int:
        with self._rng_lock:
            u = self._rng.random()
        return int(np.searchsorted(np.cumsum(distribution), u * distribution.sum(), side="right").clip(0, 2))

    def _fallback_action(self, verdict: RuleVerdict) -> int:
        """The safe action, moved to the nearest action the rules allow (block rules still block)."""
        safe = self.settings.safe_action
        allowed = [a for a, ok in enumerate(verdict.mask) if ok]
        return min(allowed, key=lambda a: (abs(a - safe), -a))

    # --- the pipeline
    def decide(self, entity_id: str, event: Event | None = None) -> Decision:
        watch = _Stopwatch()
        fallback: str | None = None
        features: np.ndarray | None = None
        anomaly = risk = None
        probabilities: np.ndarray | None = None
        reasons: list[dict[str, Any]] = []
        spec = self.spec
        try:
            features = self._features(entity_id, event)
            watch.lap("features")
            anomaly_model = self._require("anomaly")
            anomaly = float(anomaly_model.score(features)[0])
            watch.lap("anomaly")
            risk_model = self._require("risk")
            prediction = risk_model.predict_explained(risk_model.inputs(features, anomaly))
            risk = prediction.risk
            reasons = top_reasons(risk_model.input_names, [*features, anomaly], prediction.attributions)
            watch.lap("risk")
            policy_model = self._require("policy")
            probabilities = policy_model.probabilities(policy_model.state(features, anomaly, risk))[0]
            watch.lap("policy")
        except StageError as exc:
            fallback = exc.reason
        except Exception as exc:  # a model raised: never let it become a 5xx
            log.exception("decision stage failed")
            fallback = f"stage_error:{exc.__class__.__name__}"
        if fallback:
            metrics.FALLBACKS.labels(reason=fallback).inc()

        feature_map = dict(zip(spec.names, features.tolist(), strict=True)) if features is not None else {}
        amount = float(event.amount or 0.0) if event else float(feature_map.get("amount", 0.0))
        facts: dict[str, Any] = {
            **feature_map,
            "amount": amount,
            "entity_id": entity_id,
            "event_type": event.event_type if event else "",
            "attributes": dict(event.attributes) if event else {},
        }
        if anomaly is not None:
            facts["anomaly"] = anomaly
        if risk is not None:
            facts["risk"] = risk
        verdict = self.rules.evaluate(facts)
        watch.lap("rules")

        proposed = int(np.argmax(probabilities)) if probabilities is not None else None
        if fallback or probabilities is None:
            action, propensity, decided_by = self._fallback_action(verdict), 1.0, "fallback"
        else:
            distribution = serving_distribution(
                probabilities, verdict.mask, self.settings.exploration_floor, self.settings.explore_actions
            )
            action = self._sample(distribution)
            propensity = float(distribution[action])
            decided_by = (
                "rule" if (verdict.forced_action is not None or not verdict.mask[proposed]) else "policy"
            )

        explanation = template_sentence(action, risk, reasons, verdict.fired, fallback)
        decision_id = self.ids.next_id()
        latency_ms = (time.perf_counter() - watch.start) * 1000.0
        rules_fired = [
            {"name": r.name, "tier": r.tier.value, "description": r.description} for r in verdict.fired
        ]
        row: DecisionRow = {
            "id": decision_id,
            "entity_id": entity_id,
            "event_id": event.event_id if event else None,
            "created_at": datetime.now(UTC),
            "features": feature_map,
            "amount": amount if event else None,
            "anomaly": anomaly,
            "risk": risk,
            "probabilities": probabilities.tolist() if probabilities is not None else None,
            "proposed_action": proposed,
            "action_mask": list(verdict.mask),
            "action": action,
            "propensity": propensity,
            "decided_by": decided_by,
            "rules_fired": rules_fired,
            "fallback": fallback,
            "model_versions": dict(self.models.versions),
            "reasons": reasons,
            "explanation": explanation,
            "explanation_source": "template",
            "latency_ms": latency_ms,
        }
        storage = self.writer.write(row)
        watch.lap("store")
        total = time.perf_counter() - watch.start
        metrics.DECISION_LATENCY.labels(stage="total").observe(total)
        metrics.DECISIONS.labels(action=ACTION_NAMES[action], decided_by=decided_by).inc()
        if risk is not None:
            metrics.RISK_SCORE.observe(risk)
        if anomaly is not None:
            metrics.ANOMALY_SCORE.observe(anomaly)
        response = {
            "decision_id": decision_id,
            "entity_id": entity_id,
            "action": action,
            "action_name": ACTION_NAMES[action],
            "risk": risk,
            "anomaly": anomaly,
            "explanation": explanation,
            "reasons": reasons,
            "rules": rules_fired,
            "fallback": fallback,
            "policy": {
                "proposed_action": proposed,
                "probabilities": probabilities.tolist() if probabilities is not None else None,
                "propensity": propensity,
                "decided_by": decided_by,
            },
            "model_versions": dict(self.models.versions),
            "latency_ms": round(total * 1000.0, 3),
        }
        return Decision(response, row, storage)
