"""Events: the schema every producer must follow, and how events reach the feature store."""

from decision_platform.events.schema import Event

__all__ = ["Event"]
