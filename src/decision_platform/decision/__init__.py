"""Turning scores into an action: rules, fallback, and the engine that composes every stage."""
