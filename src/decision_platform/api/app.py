"""The FastAPI application: lifespan (build / close the platform), error shapes, body-size limit."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from decision_platform.api.admin import router as admin_router
from decision_platform.api.routes import router
from decision_platform.config import Settings, get_settings
from decision_platform.services import Platform

log = logging.getLogger(__name__)


class BodySizeLimit:
    """Refuse bodies over ``limit`` bytes with 413 before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(self.limit, send)


class _BodyTooLarge(Exception):
    pass


async def _too_large(limit: int, send: Send) -> None:
    response = JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - never called for a plain response
    return {"type": "http.disconnect"}


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"field": _field(e["loc"]), "message": e["msg"]} for e in exc.errors()]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return JSONResponse({"detail": summary, "errors": errors}, status_code=422)


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse({"detail": "internal error; it has been logged"}, status_code=500)


def create_app(settings: Settings | None = None, platform: Platform | None = None) -> FastAPI:
    """The API. Pass ``platform`` to serve an already-built one (tests), else it is built at start-up."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = platform is None
        app.state.platform = platform or Platform.start(settings)
        # Promotions made elsewhere (CLI, retraining, another worker's admin call) reach this process.
        refreshing = app.state.platform.start_model_refresh()
        # The models and libraries leave ~350k long-lived objects; a full collection walking them took
        # ~200 ms under load (bench/API.md). Freezing them moves them out of the collector's way:
        # /health p99 at concurrency 32 went from ~300 ms to ~17 ms.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if refreshing:
                app.state.platform.stop_model_refresh()
            if owned:
                app.state.platform.close()

    app = FastAPI(
        title="AI Decision Platform",
        version="0.1.0",
        description="Real-time decisions (allow / throttle / block) from streaming features, anomaly and "
        "risk models and a PPO policy under hard rules; every decision stored and explained.",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    app.include_router(router)
    app.include_router(admin_router)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    return app
