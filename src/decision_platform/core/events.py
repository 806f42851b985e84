"""The event contract (DESIGN.md §4).

Validation is strict and bounded so that one bad producer cannot hurt the platform: unknown fields,
wrong types, oversize strings or maps are rejected with a message naming the field. So is anything the
stores cannot hold (issue 11: one such event once blocked every database write): NUL and lone surrogates
in text, integers beyond signed 64 bits, non-finite floats.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

MAX_ATTRIBUTES = 32
MAX_ID_LENGTH = 128
MAX_STRING_VALUE_LENGTH = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def storable_text(value: Any) -> Any:
    """``value`` unchanged, unless it is text PostgreSQL (text, JSONB) or UTF-8 cannot hold: ValueError."""
    if not isinstance(value, str):
        return value  # the type's own validation answers
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000): the database cannot store it")
    try:
        value.encode("utf-8")  # fails only on lone surrogates (\ud800-\udfff)
    except UnicodeEncodeError:
        raise ValueError("must not contain lone surrogates (\\ud800-\\udfff): not valid UTF-8") from None
    return value


class NaiveTimeError(ValueError):
    """An ISO time without a time zone offset: which zone is meant cannot be known."""


#: The seconds field of an RFC 3339 time that is a leap second ("23:59:60", with any fraction).
#: Epoch seconds as text: ASCII digits, an optional fraction and exponent. ``float()`` alone also read
#: "1_700_000_000", " 1700000000 " and fullwidth digits as times, which is no producer's intent.
_EPOCH_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_LEAP_SECOND = re.compile(r"(?<=[T ]\d\d:\d\d:)60(?=[.,+\-Z]|$)")


def iso_time(text: str) -> datetime:
    """An ISO 8601 / RFC 3339 time (naive when it has no offset). Its "T" and "Z" may be lower case (RFC
    3339 5.6), as some producers write them. A leap second (``23:59:60Z``, RFC 3339 5.7) is read as POSIX
    time counts it: the next second (``00:00:00Z`` of the next day; ``:60.5`` is ``:00.5``), so the API,
    the CSV import and the console's and CLI's times all accept it. Raises ValueError."""
    upper = text.strip().upper()
    upper, leap = _LEAP_SECOND.subn("59", upper, count=1)
    try:
        return datetime.fromisoformat(upper.replace("Z", "+00:00")) + timedelta(seconds=leap)
    except OverflowError:  # 9999-12-31T23:59:60
        raise ValueError("out of the range of dates") from None


def rfc3339_seconds(text: str) -> float:
    """Epoch seconds of an RFC 3339 time (see ``iso_time``). Raises ValueError (NaiveTimeError without an
    offset)."""
    parsed = iso_time(text)
    if parsed.tzinfo is None:
        raise NaiveTimeError("needs a time zone offset, e.g. Z")
    return parsed.timestamp()


def ahead_of_clock(timestamp: float, now: float, max_ahead_s: float) -> str | None:
    """Why an event time cannot be taken at ``now`` (None: it can): it is more than ``max_ahead_s`` ahead.

    The windows keep an entity's events by event time and drop one that comes later than the tolerance
    behind the newest stored (features.yaml): a single event dated years ahead (2099, a typo, a broken
    clock) made every later real event of its entity "too late", its counts 0 from then on -- a burst
    after it invisible to the velocity rules. The online paths (POST /decide, POST /events, the stream
    worker) refuse such a time instead (422, dead letter); training data has no "now" and is not checked."""
    ahead = timestamp - now
    if ahead <= max_ahead_s:
        return None
    when = datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")
    return (
        f"timestamp {when} is {ahead / 3600:.1f} h ahead of this server's clock (at most {max_ahead_s:g} s,"
        " DP_MAX_EVENT_AHEAD_S): it would put its entity's later events out of the windows"
    )


def _storable_attribute(value: Any) -> Any:
    # Checked before the union, for one clear message (not one per member) and because the union would
    # silently turn an integer beyond 64 bits into a float.
    if isinstance(value, str):
        if len(value) > MAX_STRING_VALUE_LENGTH:
            raise ValueError(f"text longer than {MAX_STRING_VALUE_LENGTH} characters")
        storable_text(value)
    elif isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise ValueError("integer outside the signed 64-bit range")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


#: Validates any client-supplied text that may be stored; put it after the type's own constraints, so it
#: runs first and its message (not pydantic's "unable to parse raw data") is what the client reads:
#: ``Annotated[str, StringConstraints(max_length=32), STORABLE]``.
STORABLE = BeforeValidator(storable_text)
#: Text every store can hold.
StorableText = Annotated[str, STORABLE]
StorableInt = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]

Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[A-Za-z0-9_.:@\-]+$")
]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=64), STORABLE]
# The members document the accepted values in the schema; _storable_attribute gives the error messages.
AttributeValue = Annotated[
    bool
    | StorableInt
    | Annotated[float, Field(allow_inf_nan=False)]
    | Annotated[str, StringConstraints(max_length=MAX_STRING_VALUE_LENGTH)],
    BeforeValidator(_storable_attribute),
]


class Event(BaseModel):
    """One thing an entity did: a payment, a login, a ride request..."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: Identifier = Field(description="Unique id; the idempotency key of every effect.")
    entity_id: Identifier = Field(description="Who acted: a user, card or account id.")
    timestamp: float = Field(
        default_factory=time.time,
        description="Event time: RFC 3339 or epoch seconds. Windows use event time, not arrival time.",
    )
    event_type: ShortText = "event"
    amount: float | None = Field(default=None, ge=0, le=1e12)
    attributes: dict[ShortText, AttributeValue] = Field(default_factory=dict, max_length=MAX_ATTRIBUTES)

    @field_validator("timestamp", mode="before")
    @classmethod
    def _parse_timestamp(cls, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError("timestamp must be RFC 3339 text or epoch seconds")
        if isinstance(value, int | float) or (isinstance(value, str) and _EPOCH_TEXT.fullmatch(value)):
            seconds = float(value)
        elif isinstance(value, str):
            try:
                seconds = rfc3339_seconds(value)
            except NaiveTimeError:
                raise ValueError("timestamp in RFC 3339 needs a time zone offset, e.g. Z") from None
            except ValueError:
                raise ValueError("timestamp must be RFC 3339 text or epoch seconds") from None
        else:
            raise ValueError("timestamp must be RFC 3339 text or epoch seconds")
        # Plausible range: 2000-01-01 .. 2100-01-01.
        if not math.isfinite(seconds) or not 946_684_800 <= seconds <= 4_102_444_800:
            raise ValueError("timestamp out of range (years 2000-2100)")
        return seconds

    @field_validator("amount", mode="before")
    @classmethod
    def _amount_is_a_number(cls, value: Any) -> Any:
        # Lax float parsing reads true as 1.0: a producer's bug would pass as a payment of 1.
        if isinstance(value, bool):
            raise ValueError("amount must be a number, not true or false")
        return value

    @field_validator("amount")
    @classmethod
    def _finite_amount(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("amount must be a finite number")
        return value
