"""The decisions sink says when the broker did not take a batch: the worker then commits nothing, and the
batch is decided again (its first decisions returned). Against a port where no broker listens."""

from __future__ import annotations

from typing import Any

import pytest

from decision_platform.config import Settings
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
