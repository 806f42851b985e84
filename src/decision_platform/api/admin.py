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
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.security import APIKeyHeader

from decision_platform.learning.compare import compare_logged
from decision_platform.models.registry import (
    KINDS,
    CorruptArtifactError,
    InvalidOperationError,
    RegistryConflictError,
    UnknownVersionError,
)
from decision_platform.services import Platform

_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="DP_API_KEY")


def _platform(request: Request) -> Platform:
    return request.app.state.platform


def require_admin(request: Request, key: str | None = Depends(_api_key)) -> None:
    """403 when no key is configured (admin disabled), 401 for a missing or wrong key."""
    expected = _platform(request).settings.api_key
    if not expected:
        raise HTTPException(403, "admin API disabled: set DP_API_KEY")
    if key is None or not secrets.compare_digest(key.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong X-API-Key")


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


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
        "created_at": record["created_at"].isoformat(),
        "promoted_at": record["promoted_at"].isoformat() if record["promoted_at"] else None,
        "data_window": record["data_window"],
        "metrics": record["metrics"],
    }


@router.get("/models", summary="Registered models, newest first, and what this process serves")
def list_models(request: Request, kind: str | None = Query(None, description=" | ".join(KINDS))) -> Any:
    platform = _platform(request)
    return {
        "models": [_model(r) for r in platform.registry.repository.list_models(kind)],
        "serving": platform.serving().as_dict(),
    }


@router.post("/models/rollback", summary="Make the previously promoted version(s) champion again")
def rollback(request: Request, kind: str | None = Query(None, description="one kind; default all")) -> Any:
    platform = _platform(request)
    plan = _registry_call(lambda: platform.registry.rollback(kind))
    return {
        "rolled_back": {k: {"from": old, "to": new} for k, (old, new) in plan.items()},
        "serving": platform.reload_models().as_dict(),
    }


@router.post("/models/{version}/promote", summary="Make VERSION the champion of its kind")
def promote(version: str, request: Request) -> Any:
    platform = _platform(request)
    _registry_call(lambda: platform.registry.promote(version))
    return {"promoted": version, "serving": platform.reload_models().as_dict()}


@router.post("/models/{version}/shadow", summary="Score VERSION (a policy) beside the champion, logged only")
def shadow(version: str, request: Request) -> Any:
    platform = _platform(request)
    replaced = _registry_call(lambda: platform.registry.shadow(version))
    return {"shadow": version, "replaced": replaced, "serving": platform.reload_models().as_dict()}


@router.delete("/models/shadow", summary="Stop shadowing (the shadow goes back to challenger)")
def unshadow(request: Request) -> Any:
    platform = _platform(request)
    removed = _registry_call(lambda: platform.registry.unshadow("policy"))
    return {"removed": removed, "serving": platform.reload_models().as_dict()}


@router.get("/models/compare", summary="Champion vs shadow on logged decisions: agreement and value")
def compare(
    request: Request,
    since: datetime | None = Query(None, description="ISO 8601; decisions made since then"),
    limit: int | None = Query(None, gt=0, description="at most the newest N shadowed decisions"),
    version: str | None = Query(None, description="shadow version (default: the newest logged)"),
) -> Any:
    platform = _platform(request)
    settings = platform.settings
    result = compare_logged(
        platform.repository, settings.exploration_floor, settings.explore_actions, since, limit, version
    )
    return result.as_dict()
