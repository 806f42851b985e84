"""The typed decision record is the decisions table's row, field for field."""

from __future__ import annotations

from decision_platform.core.records import DecisionRecord
from decision_platform.storage.tables import decisions
from tests.conftest import decision_row


def test_a_record_has_exactly_the_columns_of_the_decisions_table() -> None:
    assert list(DecisionRecord.field_names()) == [c.name for c in decisions.columns]


def test_a_stored_row_round_trips_and_answers_like_the_api() -> None:
    row = decision_row(7, event_id="ev-7", action=2, decided_by="rule", latency_ms=1.23456)
    record = DecisionRecord.from_row(row)
    assert record.to_row() == row
    response = record.response()
    assert (response["decision_id"], response["action_name"], response["latency_ms"]) == (7, "block", 1.235)
    assert response["policy"]["decided_by"] == "rule"
    assert record.response(latency_ms=9.0)["latency_ms"] == 9.0


def test_a_row_from_an_older_version_lacks_newer_columns() -> None:
    row = decision_row(8)
    for newer in ("event_type", "attributes", "shadow"):
        del row[newer]
    assert DecisionRecord.from_row(row).shadow is None
