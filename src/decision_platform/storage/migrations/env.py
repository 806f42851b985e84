"""Alembic environment: runs on the connection handed over by ``storage.database.migrate``."""

from __future__ import annotations

from alembic import context

from decision_platform.storage.tables import metadata

connection = context.config.attributes["connection"]
schema = context.config.attributes.get("schema")

context.configure(connection=connection, target_metadata=metadata, version_table_schema=schema)
with context.begin_transaction():
    context.run_migrations()
