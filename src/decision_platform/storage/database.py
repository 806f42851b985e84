"""Engine creation (backend chosen by URL) and schema migration."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def make_engine(url: str, schema: str | None = None) -> sa.Engine:
    """An engine for ``sqlite:///file`` or ``postgresql://...`` (driven by psycopg 3).

    With ``schema`` on PostgreSQL every connection's search_path points at it, so tests and tenants can
    keep their own tables in one database.
    """
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

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
    connect_args: dict[str, object] = {"connect_timeout": 3}
    if schema:
        connect_args["options"] = f"-csearch_path={schema}"
    return sa.create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True, connect_args=connect_args)


def migrate(engine: sa.Engine, schema: str | None = None) -> None:
    """Bring the database to the latest schema (idempotent; safe at every start)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        if schema and engine.dialect.name == "postgresql":
            connection.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        config.attributes["connection"] = connection
        config.attributes["schema"] = schema if engine.dialect.name == "postgresql" else None
        command.upgrade(config, "head")
