"""The decisions sink says when the broker did not take a batch: the worker then commits nothing, and the
batch is decided again (its first decisions returned). Against a port where no broker listens."""

from __future__ import annotations

import time
from typing import Any

import pytest

from decision_platform.config import Settings
from decision_platform.core.events import Event
from decision_platform.devtools.tansu import free_port
from decision_platform.events import kafka
from decision_platform.events.kafka import BrokerUnavailableError, KafkaSink


def nowhere(tmp_path: Any) -> Settings:
    return Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", spool_dir=tmp_path / "spool")


def test_a_batch_the_broker_never_acknowledged_is_an_error(tmp_path: Any) -> None:
    sink = KafkaSink(nowhere(tmp_path))
    sink.decisions([{"entity_id": "card-1", "action": 0}, {"entity_id": "card-2", "action": 2}])
    with pytest.raises(BrokerUnavailableError, match="2 messages unacknowledged"):
        sink.flush(timeout_s=1.0)


def test_a_failed_delivery_is_reported_although_successes_make_no_report(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """delivery.report.only.error spares a callback per delivered message; a message that fails (here: it
    times out undelivered) must still reach flush() as an error."""
    config = kafka.producer_config

    def quick_to_give_up(settings: Settings) -> dict[str, Any]:
        return {**config(settings), "message.timeout.ms": 300}

    monkeypatch.setattr(kafka, "producer_config", quick_to_give_up)
    sink = KafkaSink(nowhere(tmp_path))
    sink.decisions([{"entity_id": "card-1", "action": 0}])
    with pytest.raises(BrokerUnavailableError, match="0 messages unacknowledged, 1 failed"):
        sink.flush(timeout_s=10.0)


def test_events_are_refused_at_once_while_the_broker_has_not_taken_the_earlier_ones(tmp_path: Any) -> None:
    """``POST /events`` waits for the broker's acknowledgement, on a thread of the API's request pool. With
    the broker down or frozen every request held a thread for the whole flush timeout (10 s): a few
    requests a second filled the pool, and /outcome, GET /decisions and /ready queued behind them. Once a
    send has timed out, the next ones are refused at once (503) until the broker has taken what it holds."""
    producer = kafka.EventProducer(nowhere(tmp_path))
    event = Event(event_id="ev-1", entity_id="card-1", amount=5.0)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="1 events unacknowledged"):
        producer.send([event], timeout_s=1.0)
    assert time.monotonic() - started >= 0.9  # the first one waits for the broker
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="not taking events"):
        producer.send([event], timeout_s=1.0)
    assert time.monotonic() - started < 0.3  # the next ones do not
    producer._producer.purge()  # nothing to deliver at teardown
    producer.close()
