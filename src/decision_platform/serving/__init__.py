"""Serving: the engine that composes the stages, the stream worker, and the platform that wires them."""
