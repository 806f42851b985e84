"""The event contract (DESIGN.md §4).

Validation is strict and bounded so that one bad producer cannot hurt the platform: unknown fields,
wrong types, oversize strings or maps are rejected with a message naming the field.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

MAX_ATTRIBUTES = 32
MAX_ID_LENGTH = 128
MAX_STRING_VALUE_LENGTH = 256

Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[A-Za-z0-9_.:@\-]+$")
]
AttributeValue = bool | int | float | Annotated[str, StringConstraints(max_length=MAX_STRING_VALUE_LENGTH)]


class Event(BaseModel):
    """One thing an entity did: a payment, a login, a ride request..."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: Identifier = Field(description="Unique id; the idempotency key of every effect.")
    entity_id: Identifier = Field(description="Who acted: a user, card or account id.")
    timestamp: float = Field(
        default_factory=time.time,
        description="Event time: RFC 3339 or epoch seconds. Windows use event time, not arrival time.",
    )
    event_type: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "event"
    amount: float | None = Field(default=None, ge=0, le=1e12)
    attributes: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], AttributeValue] = Field(
        default_factory=dict, max_length=MAX_ATTRIBUTES
    )

    @field_validator("timestamp", mode="before")
    @classmethod
    def _parse_timestamp(cls, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError("timestamp must be RFC 3339 text or epoch seconds")
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            try:
                seconds = float(value)
            except ValueError:
                try:
                    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
                except ValueError:
                    raise ValueError("timestamp must be RFC 3339 text or epoch seconds") from None
                if parsed.tzinfo is None:
                    raise ValueError("timestamp in RFC 3339 needs a time zone offset, e.g. Z") from None
                seconds = parsed.timestamp()
        else:
            raise ValueError("timestamp must be RFC 3339 text or epoch seconds")
        # Plausible range: 2000-01-01 .. 2100-01-01.
        if not math.isfinite(seconds) or not 946_684_800 <= seconds <= 4_102_444_800:
            raise ValueError("timestamp out of range (years 2000-2100)")
        return seconds

    @field_validator("amount")
    @classmethod
    def _finite_amount(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("amount must be a finite number")
        return value

    @field_validator("attributes")
    @classmethod
    def _finite_attributes(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"attribute {key!r} must be a finite number")
        return value
