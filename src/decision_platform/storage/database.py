"""Engine creation (backend chosen by URL) and schema migration."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from decision_platform.config import Settings
from decision_platform.core.events import INT64_MAX, INT64_MIN
from decision_platform.storage.partitions import ensure_partitions
from decision_platform.storage.sql import json_dumps

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_AHEAD_DAYS: int = Settings.model_fields["db_partitions_ahead_days"].default
log = logging.getLogger(__name__)


def open_database(settings: Settings) -> sa.Engine:
    """The configured database, migrated to the latest schema: how every command line job starts.

    (The serving platform starts on its own terms: it must also come up while the database is down.)
    """
    engine = make_engine(settings.database_url, settings.database_schema)
    migrate(engine, settings.database_schema, settings.db_partitions_ahead_days)
    return engine


def make_engine(
    url: str, schema: str | None = None, statement_timeout_s: float | None = None, autocommit: bool = False
) -> sa.Engine:
    """An engine for ``sqlite:///file`` or ``postgresql://...`` (driven by psycopg 3).

    With ``schema`` on PostgreSQL every connection's search_path points at it, so tests and tenants can
    keep their own tables in one database. ``statement_timeout_s``: the server cancels longer statements
    (serving sets it; batch jobs such as retraining leave it unset).

    Every wait on PostgreSQL is bounded, so a dead or stalled server becomes an error instead of a hang:
    connecting (2 s), a connection from the pool (2 s), unacknowledged sends (``tcp_user_timeout``) and a
    silent peer (TCP keepalives). The writer adds its own deadline on top (storage/writer.py), because a
    peer that acknowledges bytes but never answers defeats all of these.

    ``autocommit`` (PostgreSQL): every statement is its own transaction, and a pooled connection is not
    pinged before use -- for the decision writer's one-statement batches (:func:`make_batch_engine`).
    """
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, json_deserializer=_json_loads
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            # WAL lets readers run beside the writer; FULL sync because an acknowledged decision
            # must survive a power cut.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    connect_args: dict[str, object] = {
        "connect_timeout": 2,  # libpq's minimum
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 10_000,
    }
    options = []
    if schema:
        options.append(f"-csearch_path={schema}")
    if statement_timeout_s:
        options.append(f"-cstatement_timeout={int(statement_timeout_s * 1000)}")
    if options:
        connect_args["options"] = " ".join(options)
    return sa.create_engine(
        url,
        pool_size=8,
        max_overflow=8,
        pool_timeout=2,
        pool_pre_ping=not autocommit,
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
        connect_args=connect_args,
        # JSONB refuses NaN, which json.dumps writes (a model metric on a one-class split is NaN): orjson
        # writes null, as the decision path's fast insert already does.
        json_serializer=_json_dumps,
        json_deserializer=_json_loads,
    )


def make_batch_engine(
    url: str, schema: str | None = None, statement_timeout_s: float | None = None
) -> sa.Engine | None:
    """PostgreSQL: a second engine for the decision writer's batch inserts (None on SQLite).

    A batch is one ``INSERT ... SELECT FROM jsonb_to_recordset`` statement, atomic by itself. Through the
    main engine it took four round trips -- the pool's ping, ``BEGIN``, the insert, ``COMMIT`` -- and each
    answer wakes a writer thread that must win the GIL back from the decider: at 16 concurrent requests
    the store stage took 3.5-3.9 ms a batch against ~0.3 ms of database work (py-spy; bench/README.md,
    s28). In autocommit, unpinged, it is one round trip. A connection that went stale (a restarted
    server) fails its batch, which the writer spools and replays, as for any outage; the main engine
    keeps its ping for everything else."""
    if url.startswith("sqlite"):
        return None
    return make_engine(url, schema, statement_timeout_s, autocommit=True)


def _json_dumps(value: object) -> str:
    return json_dumps(value).decode()  # a float from 1e16 up keeps its ".0" (sql.json_dumps)


def _json_loads(text: str | bytes) -> Any:
    """JSONB keeps a number as its value, not its spelling: a float attribute of 1e300 comes back as 1
    and 300 zeros, an integer to JSON, which the API's own schema then refused (GET /decisions/{id} was a
    500). The edge refuses integers beyond 64 bits, so a stored one was a float: it is read as one.

    Text that is not JSON at all (SQLite keeps whatever a hand edit wrote, which is why its engine reads
    through here too; PostgreSQL's jsonb refuses it) is read as that text: a string where the platform
    writes an object or a list, which every reader's check names as damaged (storage.decisions.damaged),
    instead of the read failing with a JSON error -- the row's own pages, and every queue page, report or
    retrain holding it."""
    try:
        return json.loads(text, parse_int=_int_or_float)
    except ValueError:
        return text


def _int_or_float(text: str) -> int | float:
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else float(text)


def migrate(
    engine: sa.Engine, schema: str | None = None, partitions_ahead_days: int | None = _AHEAD_DAYS
) -> None:
    """Bring the database to the latest schema (idempotent; safe at every start), and on PostgreSQL
    create the decision log's day partitions up to ``partitions_ahead_days`` ahead (storage/partitions.py;
    None: leave them to the caller; a partition that cannot be made now is logged: its decisions go to
    the default partition meanwhile)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        if schema and engine.dialect.name == "postgresql":
            connection.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        config.attributes["connection"] = connection
        config.attributes["schema"] = schema if engine.dialect.name == "postgresql" else None
        command.upgrade(config, "head")
    if engine.dialect.name == "postgresql" and partitions_ahead_days is not None:
        try:
            result = ensure_partitions(engine, partitions_ahead_days)
        except sa.exc.DBAPIError as exc:  # e.g. a lock timeout on a busy table: the default partition
            # takes the rows meanwhile, and the next start or periodic check (PartitionKeeper) tries again
            log.warning("could not create the decision log's partitions ahead now: %s", exc)
        else:
            if result.in_default:
                log.warning("decisions of %s stay in the default partition", ", ".join(result.in_default))
