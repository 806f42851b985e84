"""Fuzzing red team (s27), the stream worker: raw Kafka messages of every shape, mixed with valid events in
one batch. Each is decided or dead-lettered with a reason; no message fails or blocks the batch.

The worker's own parse path (``StreamWorker.process`` on ``RawMessage`` values), in-process: no broker.
Seeded: the same batches every run.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

from decision_platform.config import Settings
from decision_platform.events.messages import RawMessage
from decision_platform.serving.platform import Platform
from decision_platform.serving.worker import InProcessSink

POISON: list[bytes | None] = [
    *(
        None,
        b"",
        b"null",
        b"[]",
        b"{}",
        b'"x"',
        b"1e400",
        b"NaN",
        b"\xff\xfe",
        b"\xef\xbb\xbf{}",
        b"{" * 5000,
    ),
    b'{"event_id":"p","entity_id":"q","attributes":{"k":"\\u0000"}}',
    b'{"event_id":"p","entity_id":"q","attributes":{"k":"\\ud800"}}',
    b'{"event_id":"p","entity_id":"q","attributes":{"\\ud800":1}}',
    b'{"event_id":"p","entity_id":"q","timestamp":"2099-01-01T00:00:00Z"}',
    b'{"event_id":"p","entity_id":"q","timestamp":NaN}',
    b'{"event_id":"p","entity_id":"q","amount":' + b"9" * 5000 + b"}",
    b'{"event_id":"p","entity_id":"q","attributes":{"n":18446744073709551616}}',
    b'{"event_id":"p","entity_id":"q","attributes":{' + b",".join(b'"a%d":1' % i for i in range(40)) + b"}}",
    b'{"event_id":"p","entity_id":"q","event_type":"' + b"x" * 100 + b'"}',
    b'{"event_id":"p","entity_id":"q","extra":1}',
    b'{"event_id":"p","entity_id":"q"} trailing',
    b'{"event_id":"p q","entity_id":"q"}',
    b'{"event_id":"p","entity_id":"q","amount":true}',
]


def _valid(r: random.Random, i: int, now: float) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"w{i}",
        "entity_id": f"e{r.randint(0, 4)}",
        "timestamp": now - r.random(),
    }
    if r.random() < 0.7:
        event["amount"] = r.choice([0, 1.5, 1e12, 99])
    if r.random() < 0.5:
        event["attributes"] = {
            "country": r.choice(["FR", "\u00e9", "\u65e5\u672c", ""]),
            "n": r.choice([1, 2**63 - 1, -(2**63)]),
            "x": r.choice([1e308, -0.0, True, 5e-324]),
        }
    if r.random() < 0.3:
        event["event_type"] = r.choice(["payment", "login", "a" * 64])
    return event


def test_every_message_is_decided_or_dead_lettered_with_a_reason(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> None:
    platform = start_platform(make_settings())
    worker = platform.inline_worker
    assert worker is not None and isinstance(worker.sink, InProcessSink)
    sink = worker.sink
    r, now, offset = random.Random(2727), time.time(), 0
    decided = 0
    for _ in range(12):
        messages = []
        for _ in range(r.randint(1, 30)):
            offset += 1
            if r.random() < 0.4:
                value = r.choice(POISON)
            else:
                event = _valid(r, offset, now)
                if r.random() < 0.1:
                    event["event_id"] = f"w{offset - 1}"  # a redelivery, or another entity's id
                value = json.dumps(event).encode()
            messages.append(RawMessage(value, key=b"k", offset=offset))
        before = len(sink.dead_letters)
        summary = worker.process(messages)  # raises if the batch failed: none may
        assert summary.consumed == len(messages)
        assert summary.decided + summary.dead_lettered == len(messages), summary
        letters = sink.dead_letters[before:]
        assert len(letters) == summary.dead_lettered
        for _, reason in letters:
            assert reason.strip() and len(reason.encode()) < 2000, reason  # a Kafka header can carry it
        for decision_id in summary.decision_ids:
            if decision_id is not None:
                assert platform.writer.find_decision(decision_id) is not None
        decided += summary.decided
    assert decided > 80  # the poison blocked none of the valid events around it
