"""Admin endpoints: the model registry over HTTP (list, promote, roll back, shadow, compare).

Protected by an API key (header ``X-API-Key``, compared in constant time with ``DP_API_KEY``); without a
configured key the endpoints are disabled (403), so an install never exposes them by accident. Every
change reloads this process's serving models at once and answers with what now serves; other processes
(uvicorn workers, stream workers) follow within ``DP_MODEL_REFRESH_S`` by polling the registry.
Routes stay thin: the rules of each operation live in :class:`ModelRegistry`, reloading in the platform.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.security import APIKeyHeader
from pydantic import AfterValidator

from decision_platform.api.deps import PlatformDep
from decision_platform.api.schemas import error_responses
from decision_platform.learning.compare import compare_logged
from decision_platform.models.registry import (
    KINDS,
    VERSION_MAX_LENGTH,
    VERSION_PATTERN,
    CorruptArtifactError,
    InvalidOperationError,
    RegistryConflictError,
    UnknownVersionError,
)

#: Every parameter is bounded: anything else is a 422 here, never a 500 from the database or the registry.
Kind = Literal["anomaly", "risk", "policy"]
assert get_args(Kind) == KINDS, "Kind must list the registry's kinds"
VERSION = {"min_length": 1, "max_length": VERSION_MAX_LENGTH, "pattern": VERSION_PATTERN}
MAX_COMPARE_LIMIT = 1_000_000


def _utc_representable(value: datetime | None) -> datetime | None:
    # A time zone can push year 1 or 9999 out of datetime's range once converted to UTC (OverflowError).
    if value is not None and value.tzinfo is not None:
        try:
            value.astimezone(UTC)
        except OverflowError:
            raise ValueError("out of range once converted to UTC") from None
    return value


_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="DP_API_KEY")


def require_admin(platform: PlatformDep, key: str | None = Depends(_api_key)) -> None:
    """403 when no key is configured (admin disabled), 401 for a missing or wrong key."""
    expected = platform.settings.api_key
    if not expected:
        raise HTTPException(403, "admin API disabled: set DP_API_KEY")
    if key is None or not secrets.compare_digest(key.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong X-API-Key")


router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=error_responses(401, 403, 503),
)


def _registry_call(operation: Callable[[], Any]) -> Any:
    """Run a registry operation; its errors become 404 / 422 / 409 with the registry's message."""
    try:
        return operation()
    except UnknownVersionError as exc:
        raise HTTPException(404, str(exc)) from None
    except InvalidOperationError as exc:
        raise HTTPException(422, str(exc)) from None
    except (RegistryConflictError, CorruptArtifactError) as exc:
        raise HTTPException(409, str(exc)) from None


def _model(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": record["version"],
        "kind": record["kind"],
        "status": record["status"],
        # None: a time a hand edit left unreadable (SQLite) -- the row is listed without it.
        "created_at": record["created_at"].isoformat() if record["created_at"] else None,
        "promoted_at": record["promoted_at"].isoformat() if record["promoted_at"] else None,
        "data_window": record["data_window"],
        "metrics": record["metrics"],
    }


@router.get(
    "/models",
    summary="Registered models, newest first, and what this process serves",
    responses=error_responses(422),
)
def list_models(platform: PlatformDep, kind: Kind | None = Query(None, description=" | ".join(KINDS))) -> Any:
    return {
        "models": [_model(r) for r in platform.registry.repository.list_models(kind)],
        "serving": platform.serving().as_dict(),
    }


@router.post(
    "/models/rollback",
    summary="Make the previously promoted version(s) champion again",
    responses=error_responses(404, 409, 422),
)
def rollback(
    platform: PlatformDep, kind: Kind | None = Query(None, description="one kind; default all")
) -> Any:
    plan = _registry_call(lambda: platform.registry.rollback(kind))
    return {
        "rolled_back": {k: {"from": old, "to": new} for k, (old, new) in plan.items()},
        "serving": platform.reload_models().as_dict(),
    }


@router.post(
    "/models/{version}/promote",
    summary="Make VERSION the champion of its kind",
    responses=error_responses(404, 409, 422),
)
def promote(version: Annotated[str, Path(**VERSION)], platform: PlatformDep) -> Any:
    _registry_call(lambda: platform.registry.promote(version))
    return {"promoted": version, "serving": platform.reload_models().as_dict()}


@router.post(
    "/models/{version}/shadow",
    summary="Score VERSION (a policy) beside the champion, logged only",
    responses=error_responses(404, 409, 422),
)
def shadow(version: Annotated[str, Path(**VERSION)], platform: PlatformDep) -> Any:
    replaced = _registry_call(lambda: platform.registry.shadow(version))
    return {"shadow": version, "replaced": replaced, "serving": platform.reload_models().as_dict()}


@router.delete(
    "/models/shadow",
    summary="Stop shadowing (the shadow goes back to challenger)",
    responses=error_responses(404, 409, 422),
)
def unshadow(platform: PlatformDep) -> Any:
    removed = _registry_call(lambda: platform.registry.unshadow("policy"))
    return {"removed": removed, "serving": platform.reload_models().as_dict()}


@router.get(
    "/models/compare",
    summary="Champion vs shadow on logged decisions: agreement and value",
    responses=error_responses(422),
)
def compare(
    platform: PlatformDep,
    since: Annotated[
        datetime | None,
        Query(description="ISO 8601; decisions made since then"),
        AfterValidator(_utc_representable),
    ] = None,
    limit: int | None = Query(
        None, gt=0, le=MAX_COMPARE_LIMIT, description="at most the newest N shadowed decisions"
    ),
    version: str | None = Query(None, **VERSION, description="shadow version (default: the newest logged)"),
) -> Any:
    settings = platform.settings
    result = compare_logged(
        platform.repository, settings.exploration_floor, settings.explore_actions, since, limit, version
    )
    return result.as_dict()
