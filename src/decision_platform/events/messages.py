"""A consumed message, as the stream worker sees it (kept apart so importing it stays cheap)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RawMessage:
    value: bytes | None
    key: bytes | None = None
    topic: str = "events"
    partition: int = 0
    offset: int = -1
