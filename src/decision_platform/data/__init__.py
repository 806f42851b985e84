"""Labelled data sources: a seeded synthetic fraud generator and CSV import with a column mapping."""

from decision_platform.data.dataset import LabelledEvents
from decision_platform.data.synthetic import generate

__all__ = ["LabelledEvents", "generate"]
