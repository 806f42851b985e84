"""Loading the serving set (the champion of each kind, and the shadow policy); every failure is recorded,
never raised."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from decision_platform.features import FeatureSpec
from decision_platform.models.anomaly import AnomalyModel
from decision_platform.models.artifacts import SPEC_FILE
from decision_platform.models.baseline_policy import Policy, load_policy
from decision_platform.models.registry import KINDS, ModelRegistry
from decision_platform.models.risk import RiskModel
from decision_platform.observability import metrics
from decision_platform.storage.errors import is_outage

log = logging.getLogger(__name__)
_LOADERS = {"anomaly": AnomalyModel.load, "risk": RiskModel.load, "policy": load_policy}


@dataclass
class LoadedModels:
    """The serving set. A missing member means decisions fall back (reason in ``errors``); ``spec`` is the
    feature definitions the loaded models share (None when no model could be loaded).

    ``shadow_policy`` is scored beside the champion policy and logged, never applied; when it cannot be
    loaded it is simply absent (reason in ``shadow_error``) and serving is unaffected. ``registry_state``
    is the registry's (status, kind, version) of champions and shadows this set was loaded from, failures
    included: what a poller compares to notice a change.
    """

    spec: FeatureSpec | None = None
    anomaly: AnomalyModel | None = None
    risk: RiskModel | None = None
    policy: Policy | None = None
    versions: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    shadow_policy: Policy | None = None
    shadow_version: str | None = None
    shadow_error: str | None = None
    registry_state: frozenset[tuple[str, str, str]] = frozenset()

    @property
    def complete(self) -> bool:
        return None not in (self.spec, self.anomaly, self.risk, self.policy)

    @property
    def shadow_versions(self) -> dict[str, str]:
        if self.shadow_policy is None or self.shadow_version is None:
            return {}
        return {"policy": self.shadow_version}


def load_champions(
    registry: ModelRegistry, reuse: LoadedModels | None = None, shadow: bool = True
) -> LoadedModels:
    """Load and verify the champions (and, with ``shadow``, the shadow policy). Each artifact carries the
    feature definitions it was trained on; serving computes exactly those, and refuses a model trained on
    different ones.

    ``reuse``: the set being served; a model of the same version is taken from it instead of being read
    and hashed again, so a hot reload after one promotion costs one artifact, not all of them.
    """
    loaded = LoadedModels()
    try:
        records = {(r["status"], r["kind"]): r for r in registry.serving_records()}
    except Exception as exc:
        if not is_outage(exc):
            raise
        # No database and no serving cache (a first start while it is down): serve fallbacks; the model
        # refresher loads the champions as soon as the registry answers.
        log.error("the model registry is unreachable (%s): deciding by fallback until it answers", exc)
        loaded.errors = {kind: f"registry unavailable: {exc.__class__.__name__}" for kind in KINDS}
        return loaded
    loaded.registry_state = frozenset((status, kind, r["version"]) for (status, kind), r in records.items())
    for kind in KINDS:
        record = records.get(("champion", kind))
        if record is None:
            loaded.errors[kind] = "no champion registered (run `decision-platform train`)"
            continue
        if reuse is not None and reuse.versions.get(kind) == record["version"] and reuse.spec is not None:
            model, spec = getattr(reuse, kind), reuse.spec
        else:
            try:
                model, spec = _load(registry, kind, record)
            except Exception as exc:  # corrupt, missing or incompatible artifact: serve in fallback
                log.error("cannot load %s model %s: %s", kind, record["version"], exc)
                loaded.errors[kind] = f"{exc.__class__.__name__}: {exc}"
                continue
        if loaded.spec is not None and spec.names != loaded.spec.names:
            loaded.errors[kind] = "trained on different features than the other champions"
            continue
        loaded.spec = loaded.spec or spec
        setattr(loaded, kind, model)
        loaded.versions[kind] = record["version"]
        metrics.MODEL_INFO.labels(kind=kind, version=record["version"]).set(1)
    record = records.get(("shadow", "policy"))
    if shadow and record is not None:
        _load_shadow(registry, loaded, record, reuse)
    return loaded


def _load(registry: ModelRegistry, kind: str, record: dict[str, Any]) -> tuple[Any, FeatureSpec]:
    """Load and verify one artifact; a policy is also tried on one state (:func:`_try_policy`)."""
    path = registry.verified_path(record)
    model, spec = _LOADERS[kind](path), FeatureSpec.load(path / SPEC_FILE)
    if kind == "policy":
        _try_policy(model, len(spec.names))
    return model, spec


def _try_policy(policy: Policy, n_features: int) -> None:
    """Raise ValueError unless the policy gives a (1, 3) finite distribution on one state. The hash only
    says the artifact is the one registered: weights that were NaN when registered passed it, a hot reload
    served them, and every decision failed (the sampler raised on NaN)."""
    probabilities = policy.probabilities(policy.state(np.zeros((1, n_features)), np.zeros(1), np.zeros(1)))
    if probabilities.shape != (1, 3) or not np.all(np.isfinite(probabilities)):
        raise ValueError(f"gives {probabilities.shape} probabilities, not (1, 3) finite ones")


def _load_shadow(
    registry: ModelRegistry, loaded: LoadedModels, record: dict[str, Any], reuse: LoadedModels | None
) -> None:
    """The shadow policy, checked like a champion and then tried on one state: a shadow that cannot score
    what the champions produce is refused here rather than failing on every decision."""
    version = record["version"]
    loaded.shadow_version = version
    reusable = reuse is not None and reuse.shadow_version == version and reuse.shadow_policy is not None
    if (
        reusable
        and loaded.spec is not None
        and reuse.spec is not None
        and reuse.spec.names == loaded.spec.names
    ):
        loaded.shadow_policy = reuse.shadow_policy
        return
    try:
        policy, spec = _load(registry, "policy", record)  # tried on one state there
        if loaded.spec is None:
            raise ValueError("no champion features to score the shadow on")
        if spec.names != loaded.spec.names:
            raise ValueError("trained on different features than the champions")
    except Exception as exc:  # a broken shadow never affects serving: no shadow, logged and counted
        log.error("cannot load shadow policy %s (serving without a shadow): %s", version, exc)
        metrics.SHADOW_ERRORS.labels(stage="load").inc()
        loaded.shadow_error = f"{exc.__class__.__name__}: {exc}"
        return
    loaded.shadow_policy = policy
    metrics.SHADOW_MODEL_INFO.labels(kind="policy", version=version).set(1)
