"""The console's routes: thin. Check access, parse, ask pages.py, render a template.

Every page is HTML rendered by Jinja2 with autoescaping on (event attributes are untrusted text), sent with
a Content-Security-Policy that allows only this server's own scripts and styles, so even a markup bug could
not run an injected script. Every POST carries the CSRF token (access.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from decision_platform.config import Settings
from decision_platform.console import pages
from decision_platform.console.access import COOKIE_PATH, CSRF_COOKIE, SESSION_COOKIE, ConsoleAccess
from decision_platform.core.events import INT64_MAX
from decision_platform.models.registry import VERSION_MAX_LENGTH, VERSION_PATTERN
from decision_platform.rules.ruleset import RulesError
from decision_platform.serving.outcomes import (
    OutcomeConflictError,
    UnknownDecisionError,
    UnknownOutcomeError,
    record_outcome,
)
from decision_platform.serving.platform import Platform
from decision_platform.storage.errors import DamagedDecisionError

HERE = Path(__file__).parent
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
DecisionId = Annotated[int, PathParam(gt=0, le=INT64_MAX)]


@dataclass(frozen=True)
class AdminActions:
    """The admin API's own operations, handed down by api/app.py (this floor cannot import api/):
    ``check(platform, key)`` raises 401/403 like ``X-API-Key``; ``promote(version, platform)`` and
    ``rollback(platform, kind)`` raise HTTPException with the registry's 404/409/422."""

    check: Callable[[Platform, str | None], None]
    promote: Callable[[str, Platform], Any]
    rollback: Callable[[Platform, str | None], Any]


def _platform(request: Request) -> Platform:
    return request.app.state.platform


PlatformDep = Annotated[Platform, Depends(_platform)]


def build_router(settings: Settings, admin: AdminActions | None = None) -> APIRouter:
    """The ``/console`` routes for these settings (the password is read once, here)."""
    access = ConsoleAccess(
        settings.console_password or settings.api_key,
        settings.console_session_hours,
        settings.spool_dir.parent / "console.key",
    )
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every {{ }} is escaped; nothing in the templates is marked safe
        undefined=jinja2.StrictUndefined,
    )
    templates = Jinja2Templates(env=environment)

    def nonce_of(request: Request) -> tuple[str, bool]:
        nonce = request.cookies.get(CSRF_COOKIE)
        return (nonce, False) if nonce and len(nonce) <= 64 else (access.new_nonce(), True)

    def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        nonce, new = nonce_of(request)
        context = {
            "open": access.open,
            "bound": f"{settings.host}:{settings.port}",
            "csrf": access.csrf_token(nonce),
            "logged_in": not access.open,
            "admin_enabled": admin is not None and bool(settings.api_key),
            **context,
        }
        response = templates.TemplateResponse(request, name, context, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        if new:
            _cookie(request, response, CSRF_COOKIE, nonce, None)
        return response

    def require_session(request: Request) -> None:
        if not access.valid_session(request.cookies.get(SESSION_COOKIE)):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise HTTPException(
                303, "login required", {"Location": "/console/login?" + urlencode({"next": target})}
            )

    def require_csrf(request: Request, csrf: Annotated[str, Form()] = "") -> None:
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise HTTPException(403, f"cross-origin form post from {origin[:80]!r} refused")
        if not access.valid_csrf(request.cookies.get(CSRF_COOKIE), csrf):
            raise HTTPException(403, "missing or stale CSRF token: reload the page and submit again")

    router = APIRouter(prefix="/console", include_in_schema=False)
    guarded = [Depends(require_session)]
    posted = [Depends(require_session), Depends(require_csrf)]

    @router.get("", dependencies=guarded)
    def home() -> RedirectResponse:
        return RedirectResponse("/console/queue", 303)

    @router.get("/static/{name}")
    def static(name: str) -> FileResponse:
        if name not in STATIC:
            raise HTTPException(404, f"no static file {name!r}")
        response = FileResponse(HERE / "static" / name, media_type=STATIC[name])
        response.headers["Cache-Control"] = "max-age=300"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    # --- access
    @router.get("/login")
    def login_form(request: Request, next: str = "/console/queue") -> Response:
        return render(request, "login.html", {"next": _safe_next(next), "error": None, "logged_in": False})

    @router.post("/login", dependencies=[Depends(require_csrf)])
    def login(
        request: Request, password: Annotated[str, Form()] = "", next: Annotated[str, Form()] = ""
    ) -> Response:
        if access.open:
            return RedirectResponse(_safe_next(next), 303)
        if not access.check_password(password):
            context = {"next": _safe_next(next), "error": "wrong password", "logged_in": False}
            return render(request, "login.html", context, 401)
        response = RedirectResponse(_safe_next(next), 303)
        _cookie(request, response, SESSION_COOKIE, access.new_session(), int(access.session_s))
        return response

    @router.post("/logout", dependencies=posted)
    def logout() -> Response:
        response = RedirectResponse("/console/login", 303)
        response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
        return response

    # --- queue and decisions
    @router.get("/queue", dependencies=guarded)
    def queue(request: Request, platform: PlatformDep) -> Response:
        params = dict(request.query_params)
        context: dict[str, Any] = {"rules": [r.name for r in platform.engine.rules.rules], "error": None}
        try:
            query = pages.parse_queue(params)
        except pages.ConsoleInputError as exc:
            raw = {
                k: params.get(k, "")
                for k in ("action", "since", "until", "rule", "risk_min", "risk_max", "entity", "unlabelled")
            }
            context |= {"error": str(exc), "f": raw, "rows": [], "next_url": None}
            return render(request, "queue.html", context, 422)
        page = pages.queue_page(platform, query)
        next_url = None
        if page["next_before"] is not None:
            kept = {k: v for k, v in query.raw.items() if v}
            next_url = "/console/queue?" + urlencode(
                {**kept, "before": page["next_before"], "limit": query.limit}
            )
        context |= {"f": query.raw | {"action": query.action}, "rows": page["rows"], "next_url": next_url}
        return render(request, "queue.html", context)

    @router.get("/decisions/{decision_id}", dependencies=guarded)
    def decision(request: Request, decision_id: DecisionId, platform: PlatformDep) -> Response:
        return _decision(request, platform, decision_id, None, 200)

    def _decision(
        request: Request, platform: Platform, decision_id: int, error: str | None, status: int
    ) -> Response:
        view = pages.decision_page(platform, decision_id)
        if view is None:
            return render(request, "error.html", {"message": f"no decision {decision_id}"}, 404)
        page = "decision_damaged.html" if view["damage"] else "decision.html"
        return render(request, page, {**view, "error": error}, status)

    @router.post("/decisions/{decision_id}/outcome", dependencies=posted)
    def label(
        request: Request, decision_id: DecisionId, platform: PlatformDep, outcome: Annotated[str, Form()] = ""
    ) -> Response:
        # The very rules of POST /outcome (serving/outcomes.py): same checks, same reward, same answers.
        try:
            record_outcome(platform.writer, platform.rewards, decision_id, outcome)
        except UnknownDecisionError as exc:
            return render(request, "error.html", {"message": str(exc)}, 404)
        except UnknownOutcomeError as exc:
            return _decision(request, platform, decision_id, str(exc), 422)
        except (OutcomeConflictError, DamagedDecisionError) as exc:
            return _decision(request, platform, decision_id, str(exc), 409)
        return RedirectResponse(f"/console/decisions/{decision_id}", 303)

    # --- rule what-if
    @router.get("/whatif", dependencies=guarded)
    def whatif_form(request: Request, platform: PlatformDep) -> Response:
        context = {"rules_text": pages.current_rules_text(platform), "since": "7d", "until": "now"}
        return render(request, "whatif.html", context | {"result": None, "error": None})

    @router.post("/whatif", dependencies=posted)
    def whatif(
        request: Request,
        platform: PlatformDep,
        rules_text: Annotated[str, Form()] = "",
        since: Annotated[str, Form()] = "7d",
        until: Annotated[str, Form()] = "now",
    ) -> Response:
        context: dict[str, Any] = {"rules_text": rules_text, "since": since, "until": until, "result": None}
        try:
            result = pages.run_whatif(platform, rules_text, since, until)
        except (RulesError, pages.ConsoleInputError) as exc:
            return render(request, "whatif.html", context | {"error": str(exc)}, 422)
        return render(request, "whatif.html", context | {"result": result, "error": None})

    # --- models
    @router.get("/models", dependencies=guarded)
    def models(request: Request, platform: PlatformDep) -> Response:
        return render(request, "models.html", pages.models_page(platform) | {"message": None, "error": None})

    def _admin_call(
        request: Request, platform: Platform, key: str, call: Callable[[], Any], done: str
    ) -> Response:
        if admin is None:
            raise HTTPException(403, "admin actions are not available in this console")
        status, context = 200, {"message": None, "error": None}
        try:
            admin.check(platform, key or None)
            call()
            context["message"] = done
        except HTTPException as exc:
            status, context["error"] = exc.status_code, str(exc.detail)
        return render(request, "models.html", pages.models_page(platform) | context, status)

    @router.post("/models/promote", dependencies=posted)
    def promote(
        request: Request,
        platform: PlatformDep,
        version: Annotated[str, Form(min_length=1, max_length=VERSION_MAX_LENGTH, pattern=VERSION_PATTERN)],
        admin_key: Annotated[str, Form()] = "",
    ) -> Response:
        return _admin_call(
            request,
            platform,
            admin_key,
            lambda: admin.promote(version, platform),
            f"promoted {version}",  # type: ignore[union-attr]
        )

    @router.post("/models/rollback", dependencies=posted)
    def rollback(
        request: Request,
        platform: PlatformDep,
        kind: Annotated[str, Form(pattern=r"^(anomaly|risk|policy|all)$")] = "all",
        admin_key: Annotated[str, Form()] = "",
    ) -> Response:
        chosen = None if kind == "all" else kind
        return _admin_call(
            request,
            platform,
            admin_key,
            lambda: admin.rollback(platform, chosen),
            f"rolled back {kind}",  # type: ignore[union-attr]
        )

    @router.get("/reports/{name}", dependencies=guarded)
    def report(name: str, platform: PlatformDep) -> FileResponse:
        path = pages.report_file(platform.settings.reports_dir, name)
        if path is None:
            raise HTTPException(404, f"no report {name[:80]!r}")
        return FileResponse(path)

    return router


def _safe_next(target: str) -> str:
    """Only a console path: an open redirect to another site would make the login page a phishing aid."""
    if target.startswith("/console") and not target.startswith("//") and "\\" not in target:
        return target
    return "/console/queue"


def _cookie(request: Request, response: Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
