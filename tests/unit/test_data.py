"""Labelled data sources: the synthetic generator, LabelledEvents, and CSV import with a mapping."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from decision_platform.core.events import Event
from decision_platform.data import LabelledEvents, generate
from decision_platform.data.columns import EventColumns
from decision_platform.data.csv_import import (
    ULB_MAPPING,
    ColumnMapping,
    DatasetError,
    find_ulb_csv,
    load_csv,
)
from decision_platform.data.synthetic import BASE_EPOCH, SCENARIOS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


@pytest.fixture(scope="module")
def data() -> LabelledEvents:
    return generate(n_entities=600, days=5.0, seed=3)


def window_counts(data: LabelledEvents, seconds: float) -> np.ndarray:
    """Per event: how many events its entity had in the last `seconds` (inclusive of itself)."""
    ts = data.timestamps()
    out = np.zeros(len(ts))
    for idx in data.by_entity().values():
        t = ts[idx]
        out[idx] = np.arange(len(t)) - np.searchsorted(t, t - seconds, side="right") + 1
    return out


def distinct_devices(data: LabelledEvents, seconds: float) -> np.ndarray:
    ts = data.timestamps()
    out = np.zeros(len(ts))
    for idx in data.by_entity().values():
        t = ts[idx]
        lo = np.searchsorted(t, t - seconds, side="right")
        devices = [data.events[i].attributes["device_id"] for i in idx]
        out[idx] = [len(set(devices[a : b + 1])) for b, a in enumerate(lo)]
    return out


# ----------------------------------------------------------------------------------------- synthetic


def test_same_seed_same_data_and_other_seed_differs() -> None:
    a, b = generate(n_entities=120, days=2.0, seed=11), generate(n_entities=120, days=2.0, seed=11)
    assert [e.model_dump() for e in a.events] == [e.model_dump() for e in b.events]
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.scenarios, b.scenarios)
    c = generate(n_entities=120, days=2.0, seed=12)
    assert [e.model_dump() for e in c.events] != [e.model_dump() for e in a.events]


def test_every_scenario_present_with_a_realistic_fraud_rate(data: LabelledEvents) -> None:
    summary = data.summary()
    assert set(summary["scenarios"]) == set(SCENARIOS)
    assert 0.01 <= summary["fraud_rate"] <= 0.05
    assert summary["entities"] <= 600 and summary["fraud_entities"] > 10
    # Label is 1 exactly on the fraud scenarios' events.
    assert np.array_equal(data.labels == 1, data.scenarios != "normal")
    assert data.labels.dtype == np.int8


def test_fraud_share_steers_the_fraud_rate() -> None:
    assert generate(n_entities=300, days=2.0, seed=1, fraud_share=0.0).labels.sum() == 0
    low = generate(n_entities=600, days=3.0, seed=1, fraud_share=0.01).summary()["fraud_rate"]
    high = generate(n_entities=600, days=3.0, seed=1, fraud_share=0.04).summary()["fraud_rate"]
    assert low < high


def test_events_are_valid_sorted_unique_and_in_the_period(data: LabelledEvents) -> None:
    ts = data.timestamps()
    assert np.all(np.diff(ts) >= 0)
    assert ts[0] >= BASE_EPOCH and ts[-1] < BASE_EPOCH + 5 * 86_400
    assert len({e.event_id for e in data.events}) == len(data)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(data), 300, replace=False):
        event = data.events[i]
        assert Event.model_validate(event.model_dump()) == event  # bulk construction kept the schema
        assert event.event_type == "payment" and event.amount is not None and event.amount > 0
        assert set(event.attributes) == {"device_id", "country", "merchant_category", "is_new_device"}


def test_is_new_device_is_causal(data: LabelledEvents) -> None:
    """New means: not used by this entity earlier in the data (usual devices count as known)."""
    seen: set[tuple[str, object]] = set()
    for event in data.events:
        key = (event.entity_id, event.attributes["device_id"])
        if event.attributes["is_new_device"]:
            assert key not in seen
        seen.add(key)


def test_fraud_differs_from_normal_in_window_features(data: LabelledEvents) -> None:
    normal = data.scenarios == "normal"
    count_5m = window_counts(data, 300)
    amounts = np.array([e.amount for e in data.events])
    devices_24h = distinct_devices(data, 86_400)
    new_device = np.array([e.attributes["is_new_device"] for e in data.events])
    hours = (data.timestamps() % 86_400) // 3600
    card_testing, takeover, ring = (data.scenarios == s for s in SCENARIOS[1:])

    assert np.median(count_5m[card_testing]) >= 3 * np.median(count_5m[normal])
    assert np.median(amounts[takeover]) >= 4 * np.median(amounts[normal])
    assert np.mean(devices_24h[ring]) > np.mean(devices_24h[normal]) + 0.5
    assert new_device[~normal].mean() > 5 * new_device[normal].mean()
    night = hours < 6
    assert night[~normal].mean() > 2 * night[normal].mean()  # normal users sleep, fraud does not


def test_normal_behaviour_overlaps_fraud(data: LabelledEvents) -> None:
    """Not trivially separable: some normal users burst, spend big, change device or travel."""
    normal = data.scenarios == "normal"
    amounts = np.array([e.amount for e in data.events])
    assert (window_counts(data, 300)[normal] >= 5).sum() > 20
    assert (amounts[normal] > np.median(amounts[data.scenarios == "account_takeover"])).sum() > 20
    assert any(e.attributes["is_new_device"] for e, n in zip(data.events, normal, strict=True) if n)


# ----------------------------------------------------------------------------------- LabelledEvents


def test_time_split_holds_out_the_later_period(data: LabelledEvents) -> None:
    first, later = data.time_split(0.7)
    assert len(first) + len(later) == len(data)
    assert first.timestamps().max() < later.timestamps().min()
    assert abs(len(first) / len(data) - 0.7) < 0.01
    assert int(first.labels.sum() + later.labels.sum()) == int(data.labels.sum())
    with pytest.raises(ValueError, match="fraction"):
        data.time_split(1.0)


def test_time_split_sends_ties_at_the_cut_to_the_later_part() -> None:
    events = [
        Event(event_id=f"e{i}", entity_id="a", timestamp=BASE_EPOCH + t)
        for i, t in enumerate([0, 1, 1, 1, 2])
    ]
    data = LabelledEvents(events, np.zeros(5, dtype=np.int8), np.full(5, "csv"))
    first, later = data.time_split(0.5)
    assert [e.event_id for e in first.events] == ["e0"]
    assert len(later) == 4


def test_labelled_events_rejects_unsorted_or_mismatched_input() -> None:
    events = [Event(event_id=f"e{i}", entity_id="a", timestamp=BASE_EPOCH - i) for i in range(3)]
    with pytest.raises(ValueError, match="sorted"):
        LabelledEvents(events, np.zeros(3, dtype=np.int8), np.full(3, "csv"))
    with pytest.raises(ValueError, match="shape"):
        LabelledEvents(events, np.zeros(2, dtype=np.int8), np.full(3, "csv"))
    fixed = LabelledEvents.from_unsorted(events, np.array([1, 0, 0]), np.full(3, "csv"))
    assert [e.event_id for e in fixed.events] == ["e2", "e1", "e0"]
    assert fixed.labels.tolist() == [0, 0, 1]


def test_summary_and_entities(data: LabelledEvents) -> None:
    summary = data.summary()
    assert summary["events"] == len(data) == sum(summary["scenarios"].values())
    assert summary["fraud_events"] == int(data.labels.sum())
    assert summary["start"].startswith("2026-01-05T")
    assert summary["entities"] == len(data.entity_ids()) == len(data.by_entity())


# ---------------------------------------------------------------------------------------- CSV import

MAPPING = """
name: shop
entity: {column: user}
time: {column: ts, unit: rfc3339}
amount: amt
event_type_column: kind
id_column: txn
label: {column: fraud, bad_values: ["yes"], good_values: ["no"]}
attributes:
  device: str
  items: int
  vip: bool
  score: {type: float, name: risk_score}
"""

ROWS = [
    "txn,user,ts,kind,amt,fraud,device,items,vip,score",
    "t1,alice,2024-03-01T10:00:05z,payment,12.5,no,d1,1,true,0.25",
    "t2,bob,2024-03-01T10:00:01Z,payment,900,yes,d9,3,no,",
    "t3,alice,2024-03-01t11:00:00+01:00,refund,,no,d1,2,0,1e-3",  # RFC 3339: lower case t and z (t1)
]


def write(tmp_path: Path, rows: list[str], mapping: str = MAPPING) -> tuple[Path, Path]:
    csv_path, mapping_path = tmp_path / "data.csv", tmp_path / "mapping.yaml"
    csv_path.write_text("\n".join(rows) + "\n")
    mapping_path.write_text(mapping)
    return csv_path, mapping_path


def test_events_as_columns_rebuild_every_event_exactly() -> None:
    """Data sets are held as columns; an event read back is the event put in: types, missing values,
    exact floats, text codes, and an attribute whose type varies across events."""
    events = [
        Event(
            event_id="a",
            entity_id="u1",
            timestamp=BASE_EPOCH,
            amount=12.345678901234,
            attributes={"device": "d1", "n": 3, "flag": True, "x": 0.1, "mixed": 1},
        ),
        Event(
            event_id="b",
            entity_id="u2",
            timestamp=BASE_EPOCH + 1,
            event_type="login",
            attributes={"device": "d2", "x": -0.0, "mixed": "one"},
        ),
        Event(
            event_id="c",
            entity_id="u1",
            timestamp=BASE_EPOCH + 2,
            amount=0.0,
            attributes={"n": -(2**63), "flag": False, "x": 1e300, "late": "only here"},
        ),
    ]
    columns = EventColumns.from_events(events)
    assert list(columns) == events and columns == events
    assert [columns[i] for i in (-1, 0)] == [events[-1], events[0]]
    assert columns[1].amount is None and columns[1].attributes == events[1].attributes
    assert isinstance(columns[0].attributes["n"], int) and columns[0].attributes["flag"] is True
    assert str(columns[1].attributes["x"]) == "-0.0"  # the same bits, sign of zero included
    assert list(columns[1:]) == events[1:] and list(columns.take([2, 0])) == [events[2], events[0]]
    assert columns.entity_ids().tolist() == ["u1", "u2", "u1"]
    with pytest.raises(IndexError):
        columns[3]


def test_a_large_data_set_is_held_in_a_few_hundred_bytes_an_event(data: LabelledEvents) -> None:
    assert isinstance(data.events, EventColumns)
    assert data.events.nbytes / len(data) < 400
    assert data.subset(np.arange(10)).events == [data.events[i] for i in range(10)]


def test_csv_import_maps_every_field(tmp_path: Path) -> None:
    data = load_csv(*write(tmp_path, ROWS))
    assert [e.event_id for e in data.events] == ["t3", "t2", "t1"]  # sorted by time (t3 is 10:00Z)
    t3, t2, t1 = data.events
    assert data.labels.tolist() == [0, 1, 0] and set(data.scenarios) == {"csv"}
    assert t1.entity_id == "alice" and t1.event_type == "payment" and t1.amount == 12.5
    assert t1.attributes == {"device": "d1", "items": 1, "vip": True, "risk_score": 0.25}
    assert "risk_score" not in t2.attributes  # an empty cell leaves the attribute out
    assert t3.amount is None and t3.event_type == "refund" and t3.attributes["vip"] is False
    assert t2.timestamp == 1709287201.0
    for event in data.events:
        assert Event.model_validate(event.model_dump()) == event


def test_csv_import_reads_gzip_directly(tmp_path: Path) -> None:
    plain, mapping = write(tmp_path, ROWS)
    packed = tmp_path / "data.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_csv(packed, mapping).events == load_csv(plain, mapping).events
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(gzip.compress(plain.read_bytes())[:-12])  # cut short, as an interrupted copy is
    with pytest.raises(DatasetError, match=r"broken\.csv\.gz: not a readable gzip file"):
        load_csv(broken, mapping)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("t4,carol,2024-03-01T10:00:00Z,payment,abc,no,d1,1,true,0.5", r"data\.csv:5: column 'amt'"),
        ("t4,carol,2024-03-01T10:00:00Z,payment,-2e12,no,d1,1,true,0.5", r":5: column 'amt'.*-1e\+12"),
        ("t4,carol,2024-03-01T10:00:00Z,payment,nan,no,d1,1,true,0.5", r":5: column 'amt'"),
        ("t4,carol,2024-03-01 10:00,payment,1,no,d1,1,true,0.5", r":5: column 'ts'.*time zone"),
        ("t4,carol,1999-03-01T10:00:00Z,payment,1,no,d1,1,true,0.5", r":5: column 'ts'.*2000-2100"),
        ("t4,carol,2024-03-01T10:00:00Z,payment,1,maybe,d1,1,true,0.5", r":5: column 'fraud'.*'maybe'"),
        ("t4,carol,2024-03-01T10:00:00Z,payment,1,no,d1,x,true,0.5", r":5: column 'items'"),
        ("t4,carol,2024-03-01T10:00:00Z,payment,1,no,d1,1,sure,0.5", r":5: column 'vip'"),
        ("t4,carol,2024-03-01T10:00:00Z,payment,1,no,d1,1,true,nan", r":5: column 'score'.*finite"),
        ("t4,car ol,2024-03-01T10:00:00Z,payment,1,no,d1,1,true,0.5", r":5: column 'user'.*entity"),
        ("t1,carol,2024-03-01T10:00:00Z,payment,1,no,d1,1,true,0.5", r":5: column 'txn'.*duplicate"),
        ("t4,carol,2024-03-01T10:00:00Z,payment,1,no", r":5: expected 10 fields, got 6"),
        # What the event contract refuses is refused here too, never a crash or a poison event:
        (
            "t4,carol,2024-03-01T10:00:00Z,payment,1,no,d1,9223372036854775808,t,0",
            r":5: column 'items'.*64-bit",
        ),
        ("t4,carol,2024-03-01T10:00:00Z,payment,1,no,d\x001,1,true,0.5", r":5: column 'device'.*NUL"),
        ("t4,carol,2024-03-01T10:00:00Z,pay\x00,1,no,d1,1,true,0.5", r":5: column 'kind'.*NUL"),
    ],
)
def test_csv_errors_name_line_and_column(tmp_path: Path, row: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_csv(*write(tmp_path, [*ROWS, row]))


def test_refunds_are_left_out_with_one_warning_not_a_failed_import(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A negative amount (a refund) failed the whole import; the event contract's amount is >= 0, so such
    rows are left out, counted in one warning naming their lines; the rows after them keep their ids."""
    refunds = [f"r{k},carol,2024-03-01T10:00:0{k}Z,refund,-{k}.5,no,d1,1,true,0.5" for k in range(12)]
    rows = [*ROWS, *refunds, "t4,carol,2024-03-01T10:01:00Z,payment,-0.0,no,d1,1,true,0.5"]
    with caplog.at_level(logging.WARNING, logger="decision_platform.data.csv_import"):
        data = load_csv(*write(tmp_path, rows))
    assert sorted(e.event_id for e in data.events) == ["t1", "t2", "t3", "t4"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "left out 12 row(s) with a negative amount" in warning and "line 5, 6," in warning
    assert warning.endswith("14 and 2 more")
    generated = MAPPING.replace("id_column: txn\n", "")
    ids = [
        e.event_id for e in load_csv(*write(tmp_path, [*ROWS[:2], refunds[0], *ROWS[2:]], generated)).events
    ]
    assert sorted(ids) == ["row-1", "row-3", "row-4"]  # the data row's number, the refund's row counted


def test_empty_labels_read_as_good_are_counted_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without good_values an empty label cell is "good": unlabelled rows (a scoring export, a gap in the
    labels) were trained as legitimate without a word."""
    rows = ["Time,Amount,Class", "0,1,0", "1,2,", "2,3,1", "3,4, "]
    mapping = """
entity: {strategy: row}
time: {column: Time, unit: seconds_since_start, base_epoch: "2020-01-01T00:00:00Z"}
amount: Amount
label: {column: Class}
"""
    with caplog.at_level(logging.WARNING, logger="decision_platform.data.csv_import"):
        data = load_csv(*write(tmp_path, rows, mapping))
    assert data.labels.tolist() == [0, 0, 1, 0]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "2 row(s) have an empty label, read as good" in warning and warning.endswith("line 3, 5")


def test_a_file_in_another_encoding_names_its_line_and_the_setting(tmp_path: Path) -> None:
    row = "t4,carol,2024-03-01T10:00:00Z,payment,1,no,caf\u00e9,1,true,0.5"
    csv_path, mapping = write(tmp_path, [*ROWS, row])
    csv_path.write_bytes(csv_path.read_text().encode("latin-1"))
    with pytest.raises(DatasetError, match=r"data\.csv:5: byte 0xe9 .*not utf-8-sig text; set `encoding:`"):
        load_csv(csv_path, mapping)
    mapping.write_text(MAPPING + "encoding: latin-1\n")
    devices = {e.event_id: e.attributes["device"] for e in load_csv(csv_path, mapping).events}
    assert devices["t4"] == "caf\u00e9"


def test_a_cell_too_large_for_csv_names_its_line_and_messages_stay_short(tmp_path: Path) -> None:
    huge = "x" * 200_000
    with pytest.raises(DatasetError, match=r"data\.csv:5: not readable as CSV: field larger") as error:
        load_csv(*write(tmp_path, [*ROWS, f"t4,carol,2024-03-01T10:00:00Z,payment,1,no,{huge},1,true,0.5"]))
    assert len(str(error.value).removeprefix(str(tmp_path))) < 200
    with pytest.raises(DatasetError, match=r":5: column 'vip'.*\(5000 characters\)") as error:
        load_csv(
            *write(tmp_path, [*ROWS, f"t4,carol,2024-03-01T10:00:00Z,payment,1,no,d1,1,{huge[:5000]},0"])
        )
    assert len(str(error.value).removeprefix(str(tmp_path))) < 200


def test_a_header_with_a_byte_order_mark_or_a_repeated_column(tmp_path: Path) -> None:
    csv_path, mapping = write(tmp_path, ROWS, MAPPING + "encoding: utf-8\n")  # utf-8 keeps the BOM
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    assert len(load_csv(csv_path, mapping)) == 3  # 'txn' was '\ufefftxn': "not in the header"
    repeated = [ROWS[0].replace(",score", ",vip"), *ROWS[1:]]
    with pytest.raises(DatasetError, match=r"column 'vip' \(attribute\) appears 2 times in the header"):
        load_csv(*write(tmp_path, repeated))  # the last 'vip' was read, silently


def test_a_missing_cell_in_a_rounded_hash_of_column_is_a_value_of_its_own(tmp_path: Path) -> None:
    rows = ["Time,Amount,Class", "0,9.99,0", "5,,1", "7,,0", "9,250,0"]
    mapping = """
time: {column: Time, unit: seconds_since_start, base_epoch: "2020-01-01T00:00:00Z"}
label: {column: Class}
entity: {hash_of: [Amount], round_digits: 2}
"""
    ids = [e.entity_id for e in load_csv(*write(tmp_path, rows, mapping)).events]
    assert ids[1] == ids[2] and len(set(ids)) == 3


def test_train_reports_a_bad_csv_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from decision_platform.cli import main as cli

    csv_path, mapping = write(tmp_path, [*ROWS, "t4,carol,2024-03-01T10:00:00Z,payment,abc,no,d1,1,true,0.5"])
    result = CliRunner().invoke(
        cli.app, ["train", "--source", "csv", "--path", str(csv_path), "--mapping", str(mapping)]
    )
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {csv_path}:5: column 'amt': bad amount 'abc' (expected a number)"]


def test_replay_reports_a_bad_csv_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from decision_platform.cli import main as cli

    csv_path, mapping = write(tmp_path, [*ROWS, "t4,carol,2024-03-01T10:00:00Z,payment,1,no,d1,1,maybe,0.5"])
    result = CliRunner().invoke(
        cli.app, ["replay", "--source", str(csv_path), "--mapping", str(mapping), "--to", "http"]
    )
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {csv_path}:5: column 'vip': bad value 'maybe'")


def test_train_refuses_data_it_cannot_split_in_time_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from decision_platform.cli import main as cli
    from decision_platform.config import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'dp.db'}", model_dir=tmp_path / "models")
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    one_instant = [
        ROWS[0],
        *(",".join([*r.split(",")[:2], "2024-03-01T10:00:00Z", *r.split(",")[3:]]) for r in ROWS[1:]),
    ]
    csv_path, mapping = write(tmp_path, one_instant)
    result = CliRunner().invoke(
        cli.app, ["train", "--source", "csv", "--path", str(csv_path), "--mapping", str(mapping)]
    )
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot train on {csv_path}: 3 events (2024-03-01T10:00:00Z .. ")
    assert "cannot be split in time" in line


@pytest.mark.parametrize("label", [0, 1])
def test_training_refuses_a_training_part_with_one_label(tmp_path: Path, label: int) -> None:
    """Labels the mapping does not match (e.g. True/False with bad_values ["1"]) all read as good: training
    used to go on and serve a model that learnt nothing."""
    from decision_platform.core.rewards import RewardTable
    from decision_platform.models.registry import ModelRegistry
    from decision_platform.models.risk import RiskConfig
    from decision_platform.storage.database import make_engine, migrate
    from decision_platform.storage.repository import Repository
    from decision_platform.training.train import TrainConfig, TrainingDataError, train_all

    data = generate(n_entities=60, days=2.0, seed=4)
    data = LabelledEvents(
        events=data.events, labels=np.full(len(data), label, np.int8), scenarios=data.scenarios
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    migrate(engine)
    which = r"bad \(fraud\)" if label == 0 else "good"
    with pytest.raises(TrainingDataError, match=rf"training part is labelled {which}.*label\.bad_values"):
        train_all(
            data,
            CONFIG_DIR / "features.yaml",
            RewardTable.load(CONFIG_DIR / "rewards.yaml"),
            ModelRegistry(Repository(engine), tmp_path / "models"),
            TrainConfig(anomaly_trees=10, risk=RiskConfig(epochs=1), ppo_timesteps=64, ppo_rounds=1),
            rules=CONFIG_DIR / "rules.yaml",
        )
    engine.dispose()


def test_mapping_errors_name_the_column_or_field(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"column 'amount_eur' \(amount\) is not in the header"):
        load_csv(*write(tmp_path, ROWS, MAPPING.replace("amount: amt", "amount: amount_eur")))
    broken = MAPPING.replace("unit: rfc3339", "unit: seconds_since_start")
    with pytest.raises(DatasetError, match=r"mapping\.yaml: invalid column mapping: time: .*base_epoch"):
        load_csv(*write(tmp_path, ROWS, broken))
    too_many = MAPPING + "".join(f"  c{i}: float\n" for i in range(33))
    with pytest.raises(DatasetError, match=r"attributes: .*at most 32"):
        load_csv(*write(tmp_path, ROWS, too_many))


def test_entity_strategies_and_generated_ids(tmp_path: Path) -> None:
    rows = ["Time,Amount,Class", "0,9.99,0", "5,10.01,1", "7,9.99,0", "9,250,0"]
    base = """
time: {column: Time, unit: seconds_since_start, base_epoch: "2020-01-01T00:00:00Z"}
amount: Amount
label: {column: Class}
id_prefix: "x-"
"""
    by_row = load_csv(*write(tmp_path, rows, base + "entity: {strategy: row, prefix: r}\n"))
    assert [e.entity_id for e in by_row.events] == ["r1", "r2", "r3", "r4"]
    assert [e.event_id for e in by_row.events] == ["x-1", "x-2", "x-3", "x-4"]
    assert by_row.events[1].timestamp == 1577836805.0 and by_row.labels.tolist() == [0, 1, 0, 0]

    exact = load_csv(*write(tmp_path, rows, base + "entity: {hash_of: [Amount], round_digits: 2}\n"))
    ids = [e.entity_id for e in exact.events]
    assert ids[0] == ids[2] and len(set(ids)) == 3  # the two 9.99 payments share a pseudo-entity
    rounded = load_csv(*write(tmp_path, rows, base + "entity: {hash_of: [Amount], round_digits: 0}\n"))
    assert len({e.entity_id for e in rounded.events}) == 2  # 9.99 and 10.01 both round to 10
    folded = load_csv(*write(tmp_path, rows, base + "entity: {hash_of: [Amount], buckets: 1}\n"))
    assert {e.entity_id for e in folded.events} == {"0"}
    assert len(load_csv(*write(tmp_path, rows, base + "entity: {strategy: row}\n"), limit=2)) == 2


def test_progress_bar_runs(tmp_path: Path) -> None:
    assert len(load_csv(*write(tmp_path, ROWS), progress=True)) == 3


# ---------------------------------------------------------------------------------------------- ULB

ULB_COLUMNS = ["Time", *(f"V{i}" for i in range(1, 29)), "Amount", "Class"]
ULB_HEADER = ",".join(f'"{c}"' for c in ULB_COLUMNS)  # quoted, as in the real file


def test_ulb_mapping_reads_the_ulb_layout(tmp_path: Path) -> None:
    """The shipped mapping, on a few rows in the real file's exact format (quoted Class)."""
    mapping = ColumnMapping.from_yaml(CONFIG_DIR / ULB_MAPPING)
    assert mapping.entity.strategy == "hash_of" and len(mapping.attributes) == 28
    values = ",".join(f"{0.1 * i:.6f}" for i in range(28))
    csv_path = tmp_path / "creditcard.csv"
    rows = [ULB_HEADER, f'0,{values},149.62,"0"', f'1,{values},2.69,"1"', f'1,{values},149.62,"0"']
    csv_path.write_text("\n".join(rows) + "\n")
    data = load_csv(csv_path, mapping)
    assert data.labels.tolist() == [0, 1, 0]
    assert data.events[0].entity_id == data.events[2].entity_id != data.events[1].entity_id
    assert data.events[1].timestamp == 1377993601.0  # 2013-09-01T00:00:01Z
    assert data.events[0].event_id == "ulb-1" and data.events[0].attributes["V2"] == 0.1
    assert Event.model_validate(data.events[1].model_dump()) == data.events[1]


def test_find_ulb_csv_uses_the_cache(tmp_path: Path) -> None:
    cached = tmp_path / "creditcard.csv"
    cached.write_text(ULB_HEADER + "\n")
    assert find_ulb_csv(tmp_path) == cached  # no download when present


@pytest.mark.skipif(
    not os.environ.get("DP_ULB_CSV") or not Path(os.environ["DP_ULB_CSV"]).is_file(),
    reason="set DP_ULB_CSV to a cached ULB creditcard.csv (see find_ulb_csv) to run",
)
def test_ulb_real_file_loads() -> None:
    data = load_csv(os.environ["DP_ULB_CSV"], CONFIG_DIR / ULB_MAPPING, limit=30_000)
    summary = data.summary()
    assert summary["events"] == 30_000 and summary["fraud_events"] > 10
    assert summary["start"] == "2013-09-01T00:00:00Z"
    for i in (0, 12_345, 29_999):
        assert Event.model_validate(data.events[i].model_dump()) == data.events[i]
