"""Model records: the registry's versions, and which are champion and shadow (promote, roll back)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from decision_platform.storage.sql import Store, insert_ignoring_conflicts
from decision_platform.storage.tables import models


class ModelStore(Store):
    """Reads and writes of ``tables.models`` (models/registry.py adds the artifacts on disk)."""

    def insert_model(self, row: dict[str, Any]) -> None:
        """Record a model; a version already recorded is kept (a version names its files' hash: the same
        artifact registered again, models/registry.py)."""
        with self.engine.begin() as connection:
            connection.execute(insert_ignoring_conflicts(self.engine, models).values(**row))

    def list_models(self, kind: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(models).order_by(models.c.created_at.desc())
        if kind:
            query = query.where(models.c.kind == kind)
        return self._all(query)

    def get_model(self, version: str) -> dict[str, Any] | None:
        return self._first(sa.select(models).where(models.c.version == version))

    def champion(self, kind: str) -> dict[str, Any] | None:
        return self._first(sa.select(models).where(models.c.kind == kind, models.c.status == "champion"))

    def promote(self, *versions: str) -> None:
        """Make each version the champion of its kind, in one transaction; the previous champions become
        retired."""
        with self.engine.begin() as connection:
            for version in versions:
                kind = connection.execute(
                    sa.select(models.c.kind).where(models.c.version == version)
                ).scalar_one()
                connection.execute(
                    models.update()
                    .where(models.c.kind == kind, models.c.status == "champion")
                    .values(status="retired")
                )
                connection.execute(
                    models.update()
                    .where(models.c.version == version)
                    .values(status="champion", promoted_at=datetime.now(UTC))
                )

    def serving_state(self) -> frozenset[tuple[str, str, str]]:
        """(status, kind, version) of every champion and shadow: the one small query that serving
        processes poll to notice a promotion made elsewhere (CLI, another API process, retraining)."""
        query = sa.select(models.c.status, models.c.kind, models.c.version).where(
            models.c.status.in_(("champion", "shadow"))
        )
        with self.engine.connect() as connection:
            return frozenset((r.status, r.kind, r.version) for r in connection.execute(query))

    def serving_records(self) -> list[dict[str, Any]]:
        """Every champion and shadow record, read together so that a reload sees one registry state."""
        query = sa.select(models).where(models.c.status.in_(("champion", "shadow")))
        return self._all(query)

    def shadow(self, kind: str) -> dict[str, Any] | None:
        return self._first(sa.select(models).where(models.c.kind == kind, models.c.status == "shadow"))

    def rollback_target(self, kind: str) -> dict[str, Any] | None:
        """The retired version of ``kind`` promoted most recently (a rolled-back one has no promoted_at)."""
        query = (
            sa.select(models)
            .where(models.c.kind == kind, models.c.status == "retired", models.c.promoted_at.is_not(None))
            .order_by(models.c.promoted_at.desc())
            .limit(1)
        )
        return self._first(query)

    def rollback(self, plan: dict[str, tuple[str | None, str]]) -> bool:
        """Apply ``{kind: (current champion or None, version to restore)}`` in one transaction.

        The rolled-back champion is retired with its promoted_at cleared: its promotion is undone, so a
        second rollback steps further back instead of returning to it. The restored version's promoted_at
        becomes now. Returns False, changing nothing, if any champion is no longer the one planned for
        (another process promoted meanwhile).
        """
        now = datetime.now(UTC)
        with self.engine.begin() as connection:
            for kind, (current, _) in plan.items():
                found = connection.execute(
                    sa.select(models.c.version).where(models.c.kind == kind, models.c.status == "champion")
                ).scalar_one_or_none()
                if found != current:
                    return False
            for current, target in plan.values():
                if current is not None:
                    connection.execute(
                        models.update()
                        .where(models.c.version == current)
                        .values(status="retired", promoted_at=None)
                    )
                connection.execute(
                    models.update()
                    .where(models.c.version == target, models.c.status == "retired")
                    .values(status="champion", promoted_at=now)
                )
        return True

    def set_shadow(self, version: str) -> tuple[bool, str | None]:
        """Make ``version`` the shadow of its kind, unless it is the champion; the previous shadow goes
        back to challenger. Returns (done, previous shadow's version)."""
        with self.engine.begin() as connection:
            kind = connection.execute(
                sa.select(models.c.kind).where(models.c.version == version)
            ).scalar_one()
            previous = connection.execute(
                sa.select(models.c.version).where(
                    models.c.kind == kind, models.c.status == "shadow", models.c.version != version
                )
            ).scalar_one_or_none()
            done = connection.execute(
                models.update()
                .where(models.c.version == version, models.c.status != "champion")
                .values(status="shadow")
            ).rowcount
            if not done:
                return False, None
            if previous is not None:
                connection.execute(
                    models.update().where(models.c.version == previous).values(status="challenger")
                )
        return True, previous

    def clear_shadow(self, kind: str) -> str | None:
        """The shadow of ``kind`` goes back to challenger; returns its version (None: there was none)."""
        with self.engine.begin() as connection:
            version = connection.execute(
                sa.select(models.c.version).where(models.c.kind == kind, models.c.status == "shadow")
            ).scalar_one_or_none()
            if version is not None:
                connection.execute(
                    models.update().where(models.c.version == version).values(status="challenger")
                )
        return version
