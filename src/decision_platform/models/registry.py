"""Model registry: versioned artifacts on disk, their metadata and status in the database.

Every artifact directory is hashed (sha256 over its files) when registered and verified when loaded,
so a corrupt or tampered model is refused (and the engine falls back) instead of silently serving.
One champion per kind; challengers wait beside it; promote and roll back by command.

A shadow (policies only, one per kind) is served beside the champion: on every decision it scores the same
state and its choice is logged, never applied, so that it can be compared on live traffic before it is
promoted (learning/compare.py). Only the policy can shadow: the anomaly and risk scores feed the rules
and the policy's state, so a second set of them would not be "the same decision, another choice".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from decision_platform.core.actions import MODEL_KINDS
from decision_platform.storage.errors import is_outage
from decision_platform.storage.repository import Repository

log = logging.getLogger(__name__)

KINDS = MODEL_KINDS
#: What a version can be: the registry writes ``<kind>-<time>-<hash>``, and models.version is VARCHAR(64).
#: Anything else names no model (checked at the edges: a 422, or exit 2 -- never a driver's error).
VERSION_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
VERSION_MAX_LENGTH = 64


def is_version(text: str) -> bool:
    """Whether ``text`` can be a version (see :data:`VERSION_PATTERN`)."""
    return len(text) <= VERSION_MAX_LENGTH and re.fullmatch(VERSION_PATTERN, text) is not None


#: Kinds that may have a shadow.
SHADOW_KINDS = ("policy",)


class CorruptArtifactError(RuntimeError):
    """An artifact's files no longer match the hash recorded when it was registered."""


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says why (shown as is by the CLI and API)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownVersionError(RegistryError, KeyError):
    """No model has this version (a KeyError, as ``promote`` always raised)."""


class InvalidOperationError(RegistryError, ValueError):
    """The operation does not apply to this kind of model (e.g. shadowing an anomaly model)."""


class RegistryConflictError(RegistryError):
    """The registry's current state does not allow it (nothing to roll back to, a champion as shadow)."""


class UnwritableDirectoryError(RegistryError):
    """A directory that long work writes its result to cannot take a file."""


def check_writable(directory: Path) -> None:
    """Create ``directory`` and write a probe file there; UnwritableDirectoryError naming it and why if it
    cannot take one. Asked before long work whose result goes there (train, retrain), which otherwise ended
    with a traceback after all the work was done."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as exc:
        raise UnwritableDirectoryError(f"cannot write to {directory}: {exc.strerror or exc}") from None


def hash_directory(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        # fsencode: a name that is not UTF-8 (a stray file) hashes as its bytes; .encode() raised on it.
        digest.update(os.fsencode(path.relative_to(directory).as_posix()))
        digest.update(path.read_bytes())
    return digest.hexdigest()


class ModelRegistry:
    """Artifacts under ``model_dir``, records in the database.

    ``serving_cache``: a file where the records of the champions and shadow are kept each time they are
    read, so that a serving process can start (and keep its models) while the database is down.
    """

    def __init__(self, repository: Repository, model_dir: Path, serving_cache: Path | None = None) -> None:
        self.repository = repository
        self.model_dir = Path(model_dir)
        self.serving_cache = serving_cache

    def serving_records(self) -> list[dict[str, Any]]:
        """Every champion and shadow record; from the serving cache when the database is unreachable."""
        try:
            records = self.repository.serving_records()
        except Exception as exc:
            if self.serving_cache is None or not is_outage(exc) or not self.serving_cache.is_file():
                raise
            log.warning(
                "registry unreachable (%s): serving the models recorded in %s", exc, self.serving_cache
            )
            try:
                return [_record_from_json(r) for r in json.loads(self.serving_cache.read_text("utf-8"))]
            except (OSError, ValueError, TypeError, AttributeError) as damaged:
                # A damaged cache (cut short, zeroed) is no cache: the outage stands, and the caller serves
                # fallbacks until the registry answers. Its JSON error stopped the start of a server while
                # the database was down (a supervisor restarted it into the same traceback).
                log.error("the serving cache %s is unreadable (%s); ignoring it", self.serving_cache, damaged)
                raise exc from damaged
        if self.serving_cache is not None:
            self._write_cache(records)
        return records

    def _write_cache(self, records: list[dict[str, Any]]) -> None:
        assert self.serving_cache is not None
        text = json.dumps([_record_to_json(r) for r in records], sort_keys=True)
        try:
            if self.serving_cache.is_file() and self.serving_cache.read_text("utf-8") == text:
                return
            self.serving_cache.parent.mkdir(parents=True, exist_ok=True)
            staging = self.serving_cache.with_name(f".{self.serving_cache.name}.{os.getpid()}")
            with open(staging, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())  # on disk before it replaces the old one: a power cut leaves either
            staging.replace(self.serving_cache)  # atomic: a reader never sees half a file
        except OSError as exc:  # a read-only model dir: serving works, only a cold start needs the database
            log.warning("cannot write the serving cache %s: %s", self.serving_cache, exc)

    def serving_record(self, version: str) -> dict[str, Any] | None:
        """The record of a serving version, from the database or (when it is down) the serving cache."""
        return next((r for r in self.serving_records() if r["version"] == version), None)

    def register(
        self,
        kind: str,
        write: Callable[[Path], None],
        data_window: dict[str, Any],
        metrics: dict[str, Any],
        status: str = "challenger",
    ) -> str:
        """Write an artifact with ``write(directory)``, hash it, and record it; returns its version.

        The same files registered in the same second (two retrains at once choosing the same baseline) are
        one version: the second found the first's directory and ended in a traceback after all its work."""
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}")
        staging = self.model_dir / kind / f".staging-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            write(staging)
            sha = hash_directory(staging)
            now = datetime.now(UTC)
            version = f"{kind}-{now:%Y%m%d%H%M%S}-{sha[:8]}"
            final = self.model_dir / kind / version
            try:
                staging.rename(final)
            except OSError:
                if not final.is_dir() or hash_directory(final) != sha:
                    raise
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.repository.insert_model(
            {
                "version": version,
                "kind": kind,
                "artifact_path": str(final.relative_to(self.model_dir)),
                "artifact_sha256": sha,
                "data_window": data_window,
                "metrics": metrics,
                "status": status,
                "created_at": now,
                "promoted_at": None,
            }
        )
        if status == "champion":
            self.repository.promote(version)
        return version

    def record(self, version: str) -> dict[str, Any]:
        """The record of ``version``; UnknownVersionError if there is none."""
        record = self.repository.get_model(version)
        if record is None:
            raise UnknownVersionError(f"no model version {version!r}")
        return record

    def promote(self, *versions: str, verify: bool = True) -> None:
        """Make each of ``versions`` the champion of its kind (a shadow too: it stops shadowing); the previous
        champions are retired. Several are promoted in one transaction: a retrained risk model and policy are
        a pair, and a server polling the registry sees both or neither. With ``verify``, a corrupt artifact is
        refused before anything changes, so a running server never reloads into fallback because of a bad
        promotion."""
        records = [self.record(version) for version in versions]
        waiting = [record for record in records if record["status"] != "champion"]
        if verify:
            for record in waiting:
                self.verified_path(record)
        if waiting:
            self.repository.promote(*(record["version"] for record in waiting))

    def rollback(self, kind: str | None = None) -> dict[str, tuple[str | None, str]]:
        """Make the previously promoted version the champion again, for ``kind`` or for every kind.

        The previous version is the retired one promoted most recently; the current champion is retired
        and its promotion undone (promoted_at cleared), so rolling back again steps further back in
        history rather than toggling. Without ``kind`` every kind rolls back together or none does: the
        policy's state holds the anomaly and risk scores, so a set is rolled back as a set. Returns
        ``{kind: (previous champion, restored version)}``.
        """
        if kind is not None and kind not in KINDS:
            raise InvalidOperationError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
        kinds = [kind] if kind else list(KINDS)
        plan: dict[str, tuple[str | None, str]] = {}
        missing = []
        for k in kinds:
            target = self.repository.rollback_target(k)
            if target is None:
                missing.append(k)
                continue
            self.verified_path(target)
            current = self.repository.champion(k)
            plan[k] = (current["version"] if current else None, target["version"])
        if missing:
            raise RegistryConflictError(
                f"nothing to roll back to for {', '.join(missing)}: no earlier champion is retired"
                + ("" if kind else "; roll back one kind at a time with --kind (API: ?kind=)")
            )
        if not self.repository.rollback(plan):
            raise RegistryConflictError(
                "the champions changed while rolling back; nothing was changed, retry"
            )
        return plan

    def shadow(self, version: str) -> str | None:
        """Serve ``version`` as the shadow of its kind (logged beside the champion, never applied).
        Returns the version it replaces as shadow (back to challenger), if any."""
        record = self.record(version)
        if record["kind"] not in SHADOW_KINDS:
            raise InvalidOperationError(
                f"only {' and '.join(SHADOW_KINDS)} models can shadow; {version} is of kind {record['kind']}"
            )
        if record["status"] == "champion":
            raise RegistryConflictError(f"{version} is the champion; a champion cannot also be the shadow")
        self.verified_path(record)
        done, previous = self.repository.set_shadow(version)
        if not done:  # promoted by someone else between the check and the update
            raise RegistryConflictError(f"{version} is the champion; a champion cannot also be the shadow")
        return previous

    def unshadow(self, kind: str = "policy") -> str | None:
        """Stop shadowing: the shadow of ``kind`` goes back to challenger; returns it (None if none)."""
        if kind not in SHADOW_KINDS:
            raise InvalidOperationError(f"{kind} models cannot shadow")
        return self.repository.clear_shadow(kind)

    def shadow_record(self, kind: str = "policy") -> dict[str, Any] | None:
        return self.repository.shadow(kind)

    def serving_state(self) -> frozenset[tuple[str, str, str]]:
        """(status, kind, version) of the champions and shadows: cheap, for polling."""
        return self.repository.serving_state()

    def champion(self, kind: str) -> dict[str, Any] | None:
        return self.repository.champion(kind)

    def has_champions(self) -> bool:
        return all(self.champion(kind) is not None for kind in KINDS)

    def verified_path(self, record: dict[str, Any]) -> Path:
        """The artifact directory of ``record``, after checking its hash."""
        path = self.model_dir / record["artifact_path"]
        if not path.is_dir():
            raise CorruptArtifactError(f"{record['version']}: artifact directory {path} is missing")
        try:
            sha = hash_directory(path)
        except OSError as exc:  # a file the disk cannot give back (or removed while read): no match either
            raise CorruptArtifactError(f"{record['version']}: artifact files cannot be read: {exc}") from None
        if sha != record["artifact_sha256"]:
            raise CorruptArtifactError(
                f"{record['version']}: artifact files do not match their recorded hash"
            )
        return path


_TIMES = ("created_at", "promoted_at")


def _record_to_json(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if k in _TIMES and v is not None else v) for k, v in record.items()}


#: What serving reads of a cached record (load_champions, the artifact check).
_SERVED_KEYS = ("version", "kind", "status", "artifact_path", "artifact_sha256")


def _record_from_json(record: dict[str, Any]) -> dict[str, Any]:
    """A record of the serving cache; ValueError when it lacks what serving reads (a damaged cache)."""
    missing = [k for k in _SERVED_KEYS if not isinstance(record.get(k), str)]
    if missing:
        raise ValueError(f"a cached model record without {', '.join(missing)}")
    return {k: (datetime.fromisoformat(v) if k in _TIMES and v is not None else v) for k, v in record.items()}
