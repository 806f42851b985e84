"""Model registry: versioned artifacts on disk, their metadata and status in the database.

Every artifact directory is hashed (sha256 over its files) when registered and verified when loaded,
so a corrupt or tampered model is refused (and the engine falls back) instead of silently serving.
One champion per kind; challengers and shadows wait beside it; promote and roll back by command.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from decision_platform.storage.repository import Repository

KINDS = ("anomaly", "risk", "policy")


class CorruptArtifactError(RuntimeError):
    """An artifact's files no longer match the hash recorded when it was registered."""


def hash_directory(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class ModelRegistry:
    def __init__(self, repository: Repository, model_dir: Path) -> None:
        self.repository = repository
        self.model_dir = Path(model_dir)

    def register(
        self,
        kind: str,
        write: Callable[[Path], None],
        data_window: dict[str, Any],
        metrics: dict[str, Any],
        status: str = "challenger",
    ) -> str:
        """Write an artifact with ``write(directory)``, hash it, and record it; returns its version."""
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
            staging.rename(final)
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

    def promote(self, version: str) -> None:
        if self.repository.get_model(version) is None:
            raise KeyError(f"no model version {version!r}")
        self.repository.promote(version)

    def champion(self, kind: str) -> dict[str, Any] | None:
        return self.repository.champion(kind)

    def has_champions(self) -> bool:
        return all(self.champion(kind) is not None for kind in KINDS)

    def verified_path(self, record: dict[str, Any]) -> Path:
        """The artifact directory of ``record``, after checking its hash."""
        path = self.model_dir / record["artifact_path"]
        if not path.is_dir():
            raise CorruptArtifactError(f"{record['version']}: artifact directory {path} is missing")
        if hash_directory(path) != record["artifact_sha256"]:
            raise CorruptArtifactError(
                f"{record['version']}: artifact files do not match their recorded hash"
            )
        return path
