"""Explanations: reason codes and template sentences (deterministic), LLM narratives (later)."""
