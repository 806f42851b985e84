"""The FastAPI application: lifespan (build / close the platform), error answers, body-size limit."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from decision_platform.api import admin
from decision_platform.api.admin import router as admin_router
from decision_platform.api.decide_lane import DecideLane, replaying
from decision_platform.api.routes import router
from decision_platform.config import Settings, get_settings
from decision_platform.console.routes import AdminActions, build_router
from decision_platform.features import FeatureStoreError
from decision_platform.serving.platform import Platform, settle_heap
from decision_platform.storage.errors import OUTAGE_ERRORS as DATABASE_OUTAGES
from decision_platform.storage.errors import DamagedRowError, DatabaseUnavailable, is_outage

log = logging.getLogger(__name__)


class BodySizeLimit:
    """Refuse bodies over ``limit`` bytes with 413 before anything parses them.

    The body is read here, up to the limit, and replayed to the app: an error raised from inside the app's
    ``receive()`` would reach FastAPI's body parsing, which answers 400 (a chunked body has no
    content-length to refuse it by).
    """

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
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await _too_large(self.limit, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, replaying(bytes(body), receive), send)


async def _too_large(limit: int, send: Send) -> None:
    response = JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - never called for a plain response
    return {"type": "http.disconnect"}


INTERNAL_ERROR = "internal error; it has been logged"


class CatchUnexpected:
    """Answer 500 for any exception the routes and handlers let through, and keep the connection.

    An ``Exception`` handler would run in Starlette's ServerErrorMiddleware, which re-raises after
    answering, and uvicorn then closes the keep-alive connection (the client's next request fails). This
    middleware sits inside it and does not re-raise. It also gives every 503 a ``Retry-After``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] == 503 and not any(k == b"retry-after" for k, _ in message["headers"]):
                    message = {**message, "headers": [*message["headers"], (b"retry-after", b"1")]}
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if started:  # half a response is out: only closing the connection can tell the client
                return
            await JSONResponse({"detail": INTERNAL_ERROR}, status_code=500)(scope, receive, send)


#: Dependency outages, answered 503 with Retry-After: the database's (storage.errors) and the feature store's
#: (FeatureStoreError: what ``POST /events`` meets when it runs the worker in-process, where the windows are
#: updated outside the engine's fallback; it was a 500).
DEPENDENCY_OUTAGES: tuple[type[Exception], ...] = (
    *DATABASE_OUTAGES,
    redis.ConnectionError,
    redis.TimeoutError,
    FeatureStoreError,
)


async def _dependency_unavailable(request: Request, exc: Exception) -> JSONResponse:
    what = "feature store" if isinstance(exc, redis.RedisError | FeatureStoreError) else "database"
    if isinstance(exc, DatabaseUnavailable):  # its reason may already say "database unavailable (...)"
        summary = exc.reason if exc.reason.startswith(what) else f"{what} unavailable ({exc.reason})"
        logged = summary
    else:  # the class only in the answer; the message (hosts, ports) only in the log
        summary = f"{what} unavailable ({exc.__class__.__name__})"
        logged = f"{summary}: {exc}"
    retry_after = max(1, math.ceil(getattr(exc, "retry_after_s", 1.0)))
    # An outage is not a bug: one line per request, no traceback.
    log.warning("%s %s answered 503: %s", request.method, request.url.path, logged)
    return JSONResponse(
        {"detail": f"{summary}; retry"},
        status_code=503,
        headers={"Retry-After": str(retry_after)},
    )


async def _database_error(request: Request, exc: sqlalchemy.exc.DBAPIError) -> JSONResponse:
    """A driver error SQLAlchemy wraps in a class of no outage (InternalError) can still be one: a database
    that takes no writes (a standby after a failover) refused the admin API's promote with a 500. Answered
    as the outage it is (503, naming the driver's error); anything else stays a bug (500, logged)."""
    if not is_outage(exc):
        raise exc
    return await _dependency_unavailable(request, exc.orig if isinstance(exc.orig, Exception) else exc)


async def _damaged_row(_request: Request, exc: DamagedRowError) -> JSONResponse:
    """409 naming the damaged row (storage.errors.DamagedRowError says why 409); whoever found it has
    counted and logged it."""
    return JSONResponse({"detail": str(exc)}, status_code=409)


def _printable(text: str) -> str:
    # A field name can be a client's dict key: NUL or a lone surrogate would break the JSON answer.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [_printable(str(p)) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


#: What pydantic says "unable to parse raw data as a unicode string" about: a lone surrogate (\ud800), which
#: Python's JSON parser lets through (in an id, or an object's key). Said as ``storable_text`` says it.
_NOT_UTF8 = "must not contain lone surrogates (\\ud800-\\udfff): not valid UTF-8"


def _error_entry(error: Any) -> dict[str, str]:
    if error["type"] == "json_invalid":  # loc is ("body", character offset): say what and where
        where = error["loc"][-1]
        reason = (error.get("ctx") or {}).get("error", "cannot be parsed")
        return {"field": "body", "message": f"invalid JSON at character {where}: {_printable(str(reason))}"}
    if error["type"] == "string_unicode":
        # The text itself is shown: for an object's key pydantic names only the object (its field).
        text = error.get("input")
        shown = f"'{_printable(text[:40])}': " if isinstance(text, str) else ""
        return {"field": _field(error["loc"]), "message": shown + _NOT_UTF8}
    return {"field": _field(error["loc"]), "message": _printable(error["msg"])}


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    if isinstance(exc.body, bytes) and exc.body:
        # FastAPI parses JSON only when the Content-Type says JSON; any other body arrives as bytes and
        # would be reported as "Input should be a valid dictionary": name the real problem.
        declared = request.headers.get("content-type")
        got = f"Content-Type {declared!r}" if declared else "no Content-Type"
        message = f"send the body as JSON with Content-Type: application/json (got {_printable(got)})"
        errors = [{"field": "body", "message": message}]
    else:
        errors = [_error_entry(e) for e in exc.errors()]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return JSONResponse({"detail": summary, "errors": errors}, status_code=422)


def _unparsable(cause: BaseException | None) -> str | None:
    """Why FastAPI's body parsing failed, when it is the client's doing (FastAPI answers 400 "There was an
    error parsing the body" whatever the reason)."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"the body is not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at position {cause.start})"
        )
    if isinstance(cause, RecursionError):
        return "the JSON is nested too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        # Python's int() refuses more than sys.get_int_max_str_digits() digits (4300): a number no field
        # could hold anyway, which FastAPI answered "There was an error parsing the body".
        return f"a number in the JSON has more than {sys.get_int_max_str_digits()} digits"
    return None


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    reason = _unparsable(exc.__cause__) if exc.status_code == 400 else None
    if reason is not None:
        return JSONResponse({"detail": reason}, status_code=400)
    return await http_exception_handler(request, exc)


def create_app(settings: Settings | None = None, platform: Platform | None = None) -> FastAPI:
    """The API. Pass ``platform`` to serve an already-built one (tests), else it is built at start-up."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = platform is None
        app.state.platform = platform or Platform.start(settings)
        # Promotions made elsewhere (CLI, retraining, another worker's admin call) reach this process.
        refreshing = app.state.platform.start_model_refresh()
        settle_heap()  # the garbage collector off the hot path (serving/platform.py says why)
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
    add_error_handling(app, settings.max_body_bytes)
    app.include_router(router)
    app.include_router(admin_router)
    # The analyst console (/console); its promote / rollback are the admin API's own functions.
    console_admin = AdminActions(admin.require_admin, admin.promote, admin.rollback)
    app.include_router(build_router(settings, console_admin))
    return app


def add_error_handling(app: FastAPI, max_body_bytes: int) -> None:
    """The error answers of DESIGN.md §11: 413, 422 naming the fields, 503 for outages, 409 for a damaged
    stored row, 500 for bugs."""
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(DamagedRowError, _damaged_row)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    for error in DEPENDENCY_OUTAGES:
        app.add_exception_handler(error, _dependency_unavailable)
    app.add_exception_handler(sqlalchemy.exc.DBAPIError, _database_error)  # type: ignore[arg-type]
    app.add_middleware(DecideLane)  # innermost of ours: it reads the body BodySizeLimit has bounded
    app.add_middleware(BodySizeLimit, limit=max_body_bytes)
    app.add_middleware(CatchUnexpected)  # added last: outermost of ours, so it also covers BodySizeLimit
