"""How storage failures are told apart: the database is away, refuses one record, or holds a damaged one.

The difference decides what the durable write path does. An outage (connection refused, a stalled or
frozen server, a missing table) concerns every record: spool them all and retry later. A refused record
(a NUL byte PostgreSQL cannot store, an integer beyond 64 bits, a violated constraint) concerns that
record only: it must be isolated (quarantined) so that it never blocks the records behind it. A damaged
record (a hand edit, an older version) concerns the requests that read it: they are answered that it is
damaged, everything else goes on.
"""

from __future__ import annotations

import sqlite3

import psycopg
import psycopg.errors
import sqlalchemy.exc


class DatabaseUnavailable(Exception):
    """The database cannot answer now (down, stalled, or known to be down); the caller may retry.

    The API answers it with 503 and a ``Retry-After`` header.
    """

    def __init__(self, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class DamagedRowError(Exception):
    """What the database holds for a request is not what the platform writes there: a row a hand edit or an
    older version left. The database answers; this request cannot be answered from that row, and a retry
    would fail the same way.

    The API answers 409 with the message, naming the row and what it holds: the stored state conflicts
    with the request. Not a 5xx, which would tell clients to retry and load balancers that the service is
    failing (it serves everything else), and not 404: the row exists.
    """


class DamagedDecisionError(DamagedRowError):
    """A stored decision holds in ``column`` what the platform never writes there (storage.decisions'
    ``damaged``): its page, its explanation, an outcome for it or a retry of its event cannot be answered
    from it, nor priced (an outcome stored with a reward of inf or NaN makes every later comparison of
    policies inf or NaN)."""

    def __init__(self, decision_id: object, column: str, value: object) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(f"decision {decision_id} is stored damaged: {column} holds {shown}")
        self.decision_id = decision_id
        self.column = column


#: Errors that belong to the record, not to the database: the same record fails the same way every time.
_RECORD_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.DataError,  # NUL in text (raised client-side), untranslatable characters, out-of-range numbers
    psycopg.IntegrityError,  # NOT NULL / CHECK / foreign key violations of this row
    sqlalchemy.exc.DataError,
    sqlalchemy.exc.IntegrityError,
    TypeError,  # e.g. orjson: "Integer exceeds 64-bit range"
    ValueError,  # includes UnicodeEncodeError (lone surrogates)
    OverflowError,  # sqlite3: Python int too large to convert to SQLite INTEGER
)


def is_record_error(exc: BaseException) -> bool:
    """True when ``exc`` says this record cannot be stored (retrying it can never succeed).

    Everything else -- connection errors, timeouts, a missing table, a server shutting down -- is an outage
    of the database as a whole. SQLAlchemy wraps driver errors (``StatementError.orig``): both are looked at.
    """
    if isinstance(exc, DatabaseUnavailable | TimeoutError):
        return False
    original = getattr(exc, "orig", None)
    if isinstance(exc, sqlalchemy.exc.StatementError) and original is not None:
        return isinstance(original, _RECORD_ERRORS)
    return isinstance(exc, _RECORD_ERRORS)


#: SQLite's words for a statement failing on the data it met: a JSON function on text that is not JSON,
#: sum() beyond 64 bits. Its error code, SQLITE_ERROR, is also that of a missing table or a syntax error:
#: only the message tells them apart.
_SQLITE_DATA_ERRORS = ("malformed JSON", "JSON cannot hold BLOB values", "integer overflow")


def is_data_error(exc: BaseException) -> bool:
    """True when the database answered and refused a statement for the data it met: PostgreSQL's data
    exceptions (SQLSTATE class 22: a value of the wrong type or out of range, jsonb of another shape than
    a function takes), SQLite's on JSON that is not JSON. Not an outage -- the database answers every other
    statement, and marking it down would spool every decision and fail /ready -- and for a read, a row a
    hand edit or an older version left. SQLAlchemy wraps driver errors (``.orig``): both are looked at."""
    original = getattr(exc, "orig", None) or exc
    if isinstance(original, psycopg.DataError | sqlite3.DataError):
        return True
    return isinstance(original, sqlite3.OperationalError) and any(
        words in str(original) for words in _SQLITE_DATA_ERRORS
    )


#: Failures of the database itself (see :func:`is_record_error`): the API answers them 503.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    DatabaseUnavailable,
    TimeoutError,
    OSError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    # A database that takes no writes now (a standby after a failover, default_transaction_read_only):
    # psycopg raises it as an InternalError, which SQLAlchemy wraps as its own (see is_outage).
    psycopg.errors.ReadOnlySqlTransaction,
)


def is_outage(exc: BaseException) -> bool:
    """True for a failure of the database itself: retrying later can succeed. SQLAlchemy wraps driver
    errors (``.orig``): both are looked at."""
    return isinstance(exc, OUTAGE_ERRORS) or isinstance(getattr(exc, "orig", None), OUTAGE_ERRORS)
