"""Loading the champion of each kind for serving; every failure is recorded, never raised."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from decision_platform.features import FeatureSpec
from decision_platform.models.anomaly import AnomalyModel
from decision_platform.models.policy import PolicyModel
from decision_platform.models.registry import KINDS, ModelRegistry
from decision_platform.models.risk import RiskModel
from decision_platform.models.training import SPEC_FILE
from decision_platform.observability import metrics

log = logging.getLogger(__name__)
_LOADERS = {"anomaly": AnomalyModel.load, "risk": RiskModel.load, "policy": PolicyModel.load}


@dataclass
class LoadedModels:
    """The serving set. A missing member means decisions fall back (reason in ``errors``); ``spec`` is the
    feature definitions the loaded models share (None when no model could be loaded)."""

    spec: FeatureSpec | None = None
    anomaly: AnomalyModel | None = None
    risk: RiskModel | None = None
    policy: PolicyModel | None = None
    versions: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return None not in (self.spec, self.anomaly, self.risk, self.policy)


def load_champions(registry: ModelRegistry) -> LoadedModels:
    """Load and verify the champions. Each artifact carries the feature definitions it was trained on;
    serving computes exactly those, and refuses a model trained on different ones."""
    loaded = LoadedModels()
    for kind in KINDS:
        record = registry.champion(kind)
        if record is None:
            loaded.errors[kind] = "no champion registered (run `decision-platform train`)"
            continue
        try:
            path = registry.verified_path(record)
            model = _LOADERS[kind](path)
            spec = FeatureSpec.load(path / SPEC_FILE)
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
    return loaded
