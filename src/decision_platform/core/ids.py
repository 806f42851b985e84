"""App-generated, time-ordered 64-bit decision ids (Snowflake layout).

Generating ids in the app, not the database, lets a decision carry its id before it is stored: the
response, the Kafka record and a durable spool all agree on it even when the database is down.

Layout (63 bits, always positive): 41 bits of milliseconds since 2024-01-01 UTC (good until 2093),
10 bits of node id (random per process unless given), 12 bits of sequence within the millisecond.
"""

from __future__ import annotations

import os
import threading
import time

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
NODE_BITS = 10
SEQUENCE_BITS = 12
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1


class DecisionIdGenerator:
    """Thread-safe generator of unique, increasing ids within one process."""

    def __init__(self, node_id: int | None = None) -> None:
        if node_id is None:
            node_id = int.from_bytes(os.urandom(2), "big")
        self.node_id = node_id & ((1 << NODE_BITS) - 1)
        self._lock = threading.Lock()
        self._last_ms = -1
        self._sequence = 0

    def next_id(self) -> int:
        with self._lock:
            now_ms = max(int(time.time() * 1000) - EPOCH_MS, self._last_ms)
            if now_ms == self._last_ms:
                self._sequence = (self._sequence + 1) & MAX_SEQUENCE
                if self._sequence == 0:  # 4096 ids in one millisecond: borrow the next one
                    now_ms += 1
            else:
                self._sequence = 0
            self._last_ms = now_ms
            return (now_ms << (NODE_BITS + SEQUENCE_BITS)) | (self.node_id << SEQUENCE_BITS) | self._sequence


def id_timestamp(decision_id: int) -> float:
    """Epoch seconds at which an id was generated."""
    return ((decision_id >> (NODE_BITS + SEQUENCE_BITS)) + EPOCH_MS) / 1000.0
