"""Fuzzing red team (s27), CSV import: odd cells, odd files and odd mappings end in one line naming the file
(and the line and column), or in events the event contract accepts -- never a traceback.

One regression per failure found, then the bounded fuzzer itself (a fixed seed: the same files every run).
"""

from __future__ import annotations

import gzip
import logging
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from decision_platform.core.events import Event
from decision_platform.data import csv_import
from decision_platform.data.csv_import import DatasetError, load_csv

MAPPING = """
entity: {column: user}
time: {column: ts, unit: rfc3339}
amount: amt
id_column: id
label: {column: bad, bad_values: ["1"], good_values: ["0"]}
attributes: {dev: str, n: int, flag: bool, x: float}
"""
ROWS = "id,user,ts,amt,dev,n,flag,x,bad\nt1,u1,2024-03-01T10:00:00Z,5,d1,1,true,0.5,0\n"


def _files(tmp_path: Path, mapping: str | bytes, rows: str | bytes = ROWS) -> tuple[Path, Path]:
    csv_path, mapping_path = tmp_path / "data.csv", tmp_path / "mapping.yaml"
    csv_path.write_bytes(rows.encode() if isinstance(rows, str) else rows)
    mapping_path.write_bytes(mapping.encode() if isinstance(mapping, str) else mapping)
    return csv_path, mapping_path


@pytest.mark.parametrize(
    ("extra", "rows", "words"),
    [
        # A LookupError traceback once the file was opened.
        (
            "encoding: bogus\n",
            ROWS,
            r"mapping\.yaml: invalid column mapping: encoding: .*unknown encoding 'bogus'",
        ),
        # UnicodeError (not UnicodeDecodeError): a traceback.
        ("encoding: utf-16\n", ROWS, r"data\.csv: not utf-16 text \(UTF-16 stream does not start with BOM\)"),
    ],
)
def test_an_encoding_that_cannot_read_the_file_is_one_line(
    tmp_path: Path, extra: str, rows: str, words: str
) -> None:
    with pytest.raises(DatasetError, match=words):
        load_csv(*_files(tmp_path, MAPPING + extra, rows))


def test_a_source_without_line_ends_is_refused_not_read_for_ever(tmp_path: Path) -> None:
    """``train --path /dev/zero`` read until memory ran out: a line had no end to wait for."""
    _, mapping = _files(tmp_path, MAPPING)
    with pytest.raises(DatasetError, match=r"^/dev/zero:1: a line of more than 16,777,216 characters"):
        load_csv("/dev/zero", mapping)


def test_a_line_longer_than_the_limit_is_named_by_its_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(csv_import, "MAX_LINE_CHARS", 64)
    rows = ROWS + "t2,u1,2024-03-01T10:00:01Z,5," + "d" * 64 + ",1,true,0.5,0\n"
    with pytest.raises(DatasetError, match=r"data\.csv:3: a line of more than 64 characters"):
        load_csv(*_files(tmp_path, MAPPING, rows))
    assert len(load_csv(*_files(tmp_path, MAPPING, ROWS)).events) == 1  # lines within it are read


@pytest.mark.parametrize(
    ("mapping", "words"),
    [
        (("name: caf\u00e9\n" + MAPPING).encode("latin-1"), "not UTF-8 text (byte 9)"),  # UnicodeDecodeError
        ("a: [" * 1000, "nested too deeply"),  # RecursionError
        ("name: 2001-13-01\n" + MAPPING, "month must be in 1..12"),  # ValueError from the YAML loader
        ("name: " + "9" * 5000 + "\n" + MAPPING, "4300 digits"),  # ValueError from int()
        ("name: [\n", "not valid YAML at line 2, column 1: expected the node content"),  # one line, not three
    ],
)
def test_a_mapping_file_yaml_cannot_hold_is_one_line(
    tmp_path: Path, mapping: str | bytes, words: str
) -> None:
    with pytest.raises(DatasetError) as error:
        load_csv(*_files(tmp_path, mapping))
    assert words in str(error.value) and "\n" not in str(error.value)


def test_train_says_so_in_one_line_for_a_mapping_yaml_cannot_hold(tmp_path: Path) -> None:
    from decision_platform.cli import main as cli

    csv_path, mapping = _files(tmp_path, "name: 2001-13-01\n" + MAPPING)
    result = CliRunner().invoke(
        cli.app, ["train", "--source", "csv", "--path", str(csv_path), "--mapping", str(mapping)]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {mapping}: cannot read mapping: month must be in 1..12"
    ]


def test_train_says_so_in_one_line_when_the_data_sets_features_lack_what_the_rules_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapping's own ``<name>.features.yaml`` without the 5m window: the rules read count_5m, and train
    stopped with a ValueError traceback from inside train_all."""
    from decision_platform.cli import main as cli
    from decision_platform.config import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'dp.db'}", model_dir=tmp_path / "models")
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    csv_path, mapping = _files(tmp_path, MAPPING)
    features = tmp_path / "mapping.features.yaml"
    features.write_text("version: 1\nwindows: {1m: 60, 1h: 3600}\ndistinct: []\n")
    result = CliRunner().invoke(
        cli.app, ["train", "--source", "csv", "--path", str(csv_path), "--mapping", str(mapping)]
    )
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "bad configuration:" in result.output and "uses unknown names" in result.output
    assert f"the data set's {features} does not compute" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ("id_prefix: 'bad id '\n", r"id_prefix: .*'bad id ' is not the start of an id"),
        ('event_type: "pay\\0"\n', r"event_type: .*must not contain NUL"),
        ("id_prefix: " + "p" * 120 + "\n", r"id_prefix: .*at most 108 characters"),
        ("", r"entity\.prefix: .*'bad entity ' is not the start of an id"),
    ],
)
def test_mapping_values_the_event_contract_refuses_are_refused_at_load(
    tmp_path: Path, extra: str, words: str
) -> None:
    """Ids "bad id 1" and an event type with NUL were imported into every event: a replay of the file was
    then refused event by event (422), and the database cannot store NUL."""
    mapping = MAPPING.replace("id_column: id\n", "") + extra
    if not extra:  # the entity of hash_of / row strategies was not checked per row either
        mapping = mapping.replace("{column: user}", "{strategy: row, prefix: 'bad entity '}")
    with pytest.raises(DatasetError, match=words):
        load_csv(*_files(tmp_path, mapping))


def test_a_rounding_a_double_cannot_hold_is_refused_at_load(tmp_path: Path) -> None:
    """entity.round_digits 99999999999 was a ValueError traceback ("precision too big") on the first row
    (2000000000 formatted a number to two billion digits)."""
    mapping = MAPPING.replace("entity: {column: user}", "entity: {hash_of: [x], round_digits: 99999999999}")
    with pytest.raises(DatasetError, match=r"entity\.round_digits: Input should be less than or equal to 30"):
        load_csv(*_files(tmp_path, mapping))


def test_a_base_epoch_that_is_not_finite_is_refused_at_load(tmp_path: Path) -> None:
    mapping = MAPPING.replace("unit: rfc3339}", "unit: seconds_since_start, base_epoch: .nan}")
    with pytest.raises(DatasetError, match=r"time\.base_epoch: Input should be a finite number"):
        load_csv(*_files(tmp_path, mapping, ROWS.replace("2024-03-01T10:00:00Z", "5")))


def test_labels_other_than_the_bad_and_usual_good_values_are_counted_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 0/1 label column holding 2 or "maybe" (no good_values): those rows were read as good silently --
    fraud, perhaps, trained as good."""
    mapping = MAPPING.replace(', good_values: ["0"]', "")
    rows = ROWS + "".join(
        f"t{k},u1,2024-03-01T10:00:0{k}Z,5,d1,1,true,0.5,{label}\n"
        for k, label in enumerate(["2", "maybe", "0.0", "1", "no", "2"], start=2)
    )
    with caplog.at_level(logging.WARNING):
        data = load_csv(*_files(tmp_path, mapping, rows))
    assert data.labels.tolist() == [0, 0, 0, 0, 1, 0, 0]
    [warning] = [r.getMessage() for r in caplog.records]
    said = "3 row(s) have a label that is neither in label.bad_values nor 0 / false / no ('2', 'maybe')"
    assert said in warning
    assert warning.endswith("line 3, 4, 8")
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the usual 0/1 column: nothing to say
        load_csv(*_files(tmp_path, mapping))
    assert not caplog.records


# --- the fuzzer: random odd cells, line ends, bytes, quotes, headers, compression, mapping settings

FUZZ_MAPPINGS = [
    MAPPING + "event_type: payment\n",
    """
entity: {hash_of: [dev, x], round_digits: 2, buckets: 7, prefix: "h-"}
time: {column: ts, unit: epoch_milliseconds}
amount: amt
label: {column: bad}
attributes: {n: {type: int, name: nn}, x: float, dev: str}
""",
    """
entity: {strategy: row}
time: {column: ts, unit: seconds_since_start, base_epoch: "2024-01-01T00:00:00Z"}
label: {column: bad, bad_values: [true, "yes", 1.0]}
attributes: {x: float, n: float}
""",
]
HEADER = ["id", "user", "ts", "amt", "dev", "n", "flag", "x", "bad"]
ODD_CELLS = [
    *("", " ", "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "1e308", "9" * 30, "9" * 5000, "-1", "0", "1"),
    *("2", "1.0", "1_000", " 7 ", "\uff10", "\u0661", "true", "yes", "maybe", "\x00", "a\x00b", "\u00e9"),
    *("\u65e5\u672c", "\U0001f642", "x" * 300, '"', "a,b", "a\nb", "a\r\nb", "'", "\\", "\udc80", "\ufeff"),
    *("2024-03-01T10:00:00Z", "2024-03-01T10:00:00", "2099-01-01T00:00:00Z", "1709287200", "1709287200000"),
    *("0x10", "1e-400", "-0", "None", "2016-12-31T23:59:60Z", "24:00"),
]
MAPPING_EXTRAS = [
    "encoding: latin-1\n",
    "encoding: utf-16\n",
    "encoding: ascii\n",
    "delimiter: ';'\n",
    "delimiter: '\"'\n",
    "delimiter: ' '\n",
]


def _good_row(r: random.Random, i: int, unit: str) -> list[str]:
    ts = {
        "rfc3339": f"2024-03-01T10:{i // 60 % 60:02d}:{i % 60:02d}Z",
        "epoch_milliseconds": str(1709287200000 + i * 1000),
        "seconds_since_start": str(i * 7),
    }[unit]
    return [
        f"t{i}",
        f"u{r.randint(0, 5)}",
        ts,
        str(round(r.random() * 100, 2)),
        f"d{r.randint(0, 3)}",
        str(r.randint(0, 9)),
        r.choice(["true", "false"]),
        str(r.random()),
        r.choice(["0", "1"]),
    ]


def _quoted(cell: str) -> str:
    return '"' + cell.replace('"', '""') + '"' if any(c in cell for c in ',"\n\r') else cell


def _fuzz_case(r: random.Random, directory: Path, k: int) -> tuple[Path, Path]:
    which = r.randrange(len(FUZZ_MAPPINGS))
    mapping = FUZZ_MAPPINGS[which]
    unit = ("rfc3339", "epoch_milliseconds", "seconds_since_start")[which]
    rows = [_good_row(r, i, unit) for i in range(r.randint(0, 25))]
    header = list(HEADER)
    for _ in range(r.randint(0, 4) if rows else 0):
        row = r.choice(rows)
        row[r.randrange(len(row))] = r.choice(ODD_CELLS)
    if rows and r.random() < 0.1:
        r.choice(rows).append("extra")
    if r.random() < 0.05:
        header[r.randrange(len(header))] = r.choice(HEADER)  # a repeated (and a missing) column
    end = "\r\n" if r.random() < 0.3 else "\n"
    text = end.join(",".join(map(_quoted, row)) for row in [header, *rows]) + (
        end if r.random() < 0.8 else ""
    )
    data = text.encode("utf-8", "surrogateescape")  # "\udc80" is written as the byte 0x80
    if r.random() < 0.05:
        data = b"\xef\xbb\xbf" + data
    if r.random() < 0.05 and data:
        at = r.randrange(len(data))
        data = data[:at] + bytes([r.choice([0, 0x80, 0xFF, 0x22, 0x0D])]) + data[at:]
    if r.random() < 0.05:
        data = data[: r.randrange(len(data) + 1)]
    if r.random() < 0.1:
        mapping += r.choice(MAPPING_EXTRAS)
    gz = r.random() < 0.1
    if gz:
        data = gzip.compress(data) if r.random() < 0.7 else data[:50]
    csv_path, mapping_path = directory / f"f{k}.csv{'.gz' if gz else ''}", directory / f"m{k}.yaml"
    csv_path.write_bytes(data)
    mapping_path.write_text(mapping)
    return csv_path, mapping_path


def test_odd_files_are_one_line_errors_or_events_the_contract_accepts(tmp_path: Path) -> None:
    r = random.Random(2712)
    loaded = refused = 0
    for k in range(300):
        csv_path, mapping_path = _fuzz_case(r, tmp_path, k)
        try:
            data = load_csv(csv_path, mapping_path)
        except DatasetError as exc:
            message = str(exc)
            assert message.startswith(str(tmp_path)) and "\n" not in message, message
            refused += 1
            continue
        for event in data.events:  # what train and replay will use: an event POST /events would take
            Event.model_validate_json(event.model_dump_json())
        assert set(data.labels.tolist()) <= {0, 1}
        loaded += 1
    assert loaded > 50 and refused > 50, (
        loaded,
        refused,
    )  # the mutations are neither all fatal nor all benign
