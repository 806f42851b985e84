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
    """The serving set. A missing member means decisions fall back (reason in ``errors``)."""

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
    """Load and verify the champions; the feature spec comes from the risk model's artifact, so serving
    computes exactly the features the models were trained on."""
    loaded = LoadedModels()
    for kind in KINDS:
        record = registry.champion(kind)
        if record is None:
            loaded.errors[kind] = "no champion registered (run `decision-platform train`)"
            continue
        try:
            path = registry.verified_path(record)
            setattr(loaded, kind, _LOADERS[kind](path))
            if kind == "risk":
                loaded.spec = FeatureSpec.load(path / SPEC_FILE)
            loaded.versions[kind] = record["version"]
            metrics.MODEL_INFO.labels(kind=kind, version=record["version"]).set(1)
        except Exception as exc:  # corrupt, missing or incompatible artifact: serve in fallback
            log.error("cannot load %s model %s: %s", kind, record["version"], exc)
            loaded.errors[kind] = f"{exc.__class__.__name__}: {exc}"
    if loaded.spec is not None:
        expected = loaded.spec.names
        if loaded.anomaly is not None and loaded.anomaly.feature_names != expected:
            loaded.errors["anomaly"] = "trained on different features than the risk model"
            loaded.anomaly = None
        if loaded.policy is not None and loaded.policy.state_names[: len(expected)] != expected:
            loaded.errors["policy"] = "trained on different features than the risk model"
            loaded.policy = None
    return loaded
