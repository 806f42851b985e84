"""``POST /decide`` without FastAPI's per-request machinery: the platform's hot path.

Why: for every request FastAPI matches the route among ~40, resolves the dependencies and validates the
body through generic code: in-process (bench/bench_asgi.py, quiet machine) a ``/decide`` through the route
costs ~218 µs of CPU, through this lane ~41 µs (``/health`` ~95 µs) -- a sixth of a whole decision saved.
This lane answers a well-formed request itself: the body
validated by pydantic straight from the JSON bytes (``DecideRequest.model_validate_json``), the route's own
coroutine (:func:`decision_platform.api.routes.decided`), the same answer bytes.

Anything else goes to FastAPI unchanged: another path or method, a content type other than JSON, a body
that does not validate. So every error answer (422 naming the field, 400, 413) is the route's own, and the
lane only ever accepts what the route accepts: pydantic's JSON parser is stricter than ``json.loads`` (no
NaN, no BOM, no lone surrogates, UTF-8 only), and what it refuses is handed over.
tests/unit/test_decide_lane.py holds the two paths to the same answers.
"""

from __future__ import annotations

from fastapi import Request
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from decision_platform.api.routes import decided
from decision_platform.api.schemas import DecideRequest

#: Content types the lane takes; FastAPI's own rules (``+json`` subtypes, parameters) apply to the rest.
JSON_TYPES = frozenset({b"application/json", b"application/json; charset=utf-8"})


class DecideLane:
    """ASGI middleware answering well-formed ``POST /decide`` requests; inside BodySizeLimit (api/app.py),
    which has read the body up to the limit and replays it as one message."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _is_decide(scope):
            await self.app(scope, receive, send)
            return
        body, receive = await _read_body(receive)
        if body is None:  # the client went away
            return
        try:
            request = DecideRequest.model_validate_json(body)
        except ValidationError:
            await self.app(scope, receive, send)  # the route answers the error, from the same bytes
            return
        app = scope["app"]
        try:
            answer = await decided(app.state.platform, request)
        except Exception as exc:  # answered by the app's handler for it, as the route's would be (503s)
            handlers = app.exception_handlers
            handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
            if handler is None:
                raise  # a bug: CatchUnexpected (outside) logs it and answers 500
            response = await handler(Request(scope), exc)
            await response(scope, receive, send)
            return
        headers = [(b"content-length", str(len(answer)).encode()), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


def _is_decide(scope: Scope) -> bool:
    if scope["type"] != "http" or scope["path"] != "/decide" or scope["method"] != "POST":
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.lower() in JSON_TYPES
    return False


async def _read_body(receive: Receive) -> tuple[bytes | None, Receive]:
    """The whole body, and a ``receive`` that replays it for the route."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None, receive
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    return body, replaying(body, receive)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` as one message, then defers to ``receive`` (which, after the
    body, waits for the disconnect, as the server's would)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
