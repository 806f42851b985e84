"""Per-entity rolling-window features: definitions, the online store (Redis + Lua) and offline twin.

Online and offline share one FeatureSpec (config/features.yaml) and the same semantics, so the vector a
model is trained on is the vector it is served (DESIGN.md §6).
"""

from decision_platform.features.offline import (
    OfflineWindows,
    compute_features,
    compute_features_with_flags,
)
from decision_platform.features.spec import FeatureSpec
from decision_platform.features.store import (
    DEFAULT_KEY_PREFIX,
    FeatureResult,
    FeatureStore,
    FeatureStoreError,
    RedisClusterFeatureStore,
    RedisFeatureStore,
    open_feature_store,
)

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "FeatureResult",
    "FeatureSpec",
    "FeatureStore",
    "FeatureStoreError",
    "OfflineWindows",
    "RedisClusterFeatureStore",
    "RedisFeatureStore",
    "compute_features",
    "compute_features_with_flags",
    "open_feature_store",
]
