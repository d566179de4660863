"""The jobs dashboard at /ui: a page served by the service (no build step, no CDN) that lists jobs,
follows one's progress, draws its curves from its events, lists its artifact files and cancels it.

Access is its own, never the webhook secret:
- `DPO_DASHBOARD_TOKEN` unset: the dashboard is off (every /ui path is a 404).
- POST /ui/login with the token sets a session cookie: `<expires>.<nonce>.<HMAC>`, keyed by the
  token (changing the token logs everyone out), HttpOnly, SameSite=Strict, Secure over https.
- A state-changing request (cancel, logout) also needs `X-CSRF-Token`: an HMAC of the session's
  nonce, which only the dashboard page (same origin) can read; and a cross-origin Origin is refused.
The dashboard reads and cancels jobs; it cannot trigger one (only a signed request can).

The gate (core/gate.py) lets /ui through unsigned; this module checks the session itself.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import html
import secrets
import time
from pathlib import Path as FilePath
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from core import errors
from core.errors import Forbidden, NotFound, TooLarge, Unauthorized
from core.resources import Cursor, JobId, RunnerDep, StoreDep
from core.schemas import COMMUNITY_ID_PATTERN, JobStatus, events_page, job_or_404, job_view, jobs_page
from core.settings import Settings

PREFIX = "/ui"
COOKIE = "dpo_dashboard"
CSRF_HEADER = "X-CSRF-Token"
PAGES = FilePath(__file__).parent / "ui"
MAX_LOGIN_BYTES = 4096


# -- sessions ---------------------------------------------------------------------------------
def _key(token: str) -> bytes:
    return hmac.new(token.encode(), b"dpo dashboard session", hashlib.sha256).digest()


def _mac(token: str, message: str) -> str:
    return hmac.new(_key(token), message.encode(), hashlib.sha256).hexdigest()


def new_session(token: str, lifetime_s: float, now: float | None = None) -> str:
    """A cookie value: `<expires>.<nonce>.<HMAC of both>`."""
    expires = int((time.time() if now is None else now) + lifetime_s)
    payload = f"{expires}.{secrets.token_urlsafe(16)}"
    return f"{payload}.{_mac(token, payload)}"


def session_nonce(token: str, cookie: str | None, now: float | None = None) -> str | None:
    """The nonce of a valid, unexpired session cookie, else None."""
    parts = (cookie or "").split(".")
    if len(parts) != 3 or not parts[0].isdigit():
        return None
    expires, nonce, mac = parts
    # bytes: a header is latin-1 text, and compare_digest refuses non-ASCII str
    if not hmac.compare_digest(_mac(token, f"{expires}.{nonce}").encode(), mac.encode("latin-1")):
        return None
    if int(expires) < (time.time() if now is None else now):
        return None
    return nonce


def csrf_token(token: str, nonce: str) -> str:
    return _mac(token, f"csrf {nonce}")


# -- dependencies -----------------------------------------------------------------------------
def _token(request: Request) -> str:
    settings: Settings = request.app.state.settings
    if settings.dashboard_token is None:  # routes exist only with a token; this guards a refactor
        raise NotFound("Not Found")
    return settings.dashboard_token.get_secret_value()


def _same_origin(request: Request) -> None:
    """A browser sends Origin on a POST: it must be this service's own: the Host it was sent to,
    the first X-Forwarded-Host a proxy set, or DPO_PUBLIC_BASE_URL's host."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    public = request.app.state.settings.public_base_url
    ours = {
        request.headers.get("host", ""),
        request.headers.get("x-forwarded-host", "").split(",")[0].strip(),
        urlsplit(public).netloc if public else "",
    } - {""}
    if urlsplit(origin).netloc not in ours:
        raise Forbidden(errors.CROSS_ORIGIN)


def session(request: Request, response: Response) -> str:
    """The session's nonce; 401 without a valid session cookie. What a session reads is not
    cached by the browser or a proxy."""
    nonce = session_nonce(_token(request), request.cookies.get(COOKIE))
    if nonce is None:
        raise Unauthorized(errors.LOGIN_REQUIRED)
    response.headers["Cache-Control"] = "no-store"
    return nonce


def changing_session(request: Request, nonce: Annotated[str, Depends(session)]) -> str:
    """A session allowed to change something: same origin and the session's CSRF token."""
    _same_origin(request)
    given = request.headers.get(CSRF_HEADER, "").encode("latin-1")
    if not hmac.compare_digest(given, csrf_token(_token(request), nonce).encode()):
        raise Forbidden(errors.BAD_CSRF)
    return nonce


Session = Annotated[str, Depends(session)]
ChangingSession = Annotated[str, Depends(changing_session)]


# -- pages ------------------------------------------------------------------------------------
router = APIRouter(prefix=PREFIX, include_in_schema=False)


@functools.cache
def _template(name: str) -> str:
    return (PAGES / name).read_text()


def _page(name: str, **values: str) -> HTMLResponse:
    text = _template(name)
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", html.escape(value))
    headers = {  # the page loads only its own files and talks only to this service
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        "Cache-Control": "no-store",
        "Referrer-Policy": "same-origin",
    }
    return HTMLResponse(text, headers=headers)


@router.get("")
def dashboard(request: Request, login: Annotated[str | None, Query(max_length=16)] = None):
    token = _token(request)
    nonce = session_nonce(token, request.cookies.get(COOKIE))
    if nonce is None:
        return _page("login.html", message="Wrong token." if login == "failed" else "")
    return _page("dashboard.html", csrf=csrf_token(token, nonce))


@router.post("/login")
async def login(request: Request):
    """A form post with the token; a session cookie and back to /ui, or /ui?login=failed."""
    _same_origin(request)
    token, settings = _token(request), request.app.state.settings
    body = b""
    async for chunk in request.stream():  # the gate lets /ui through unread: bound it here
        body += chunk
        if len(body) > MAX_LOGIN_BYTES:
            raise TooLarge(f"a login form is at most {MAX_LOGIN_BYTES} bytes")
    given = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
    if not hmac.compare_digest(given.encode(), token.encode()):
        return RedirectResponse(f"{PREFIX}?login=failed", status_code=303)
    response = RedirectResponse(PREFIX, status_code=303)
    response.set_cookie(
        COOKIE,
        new_session(token, settings.dashboard_session_s),
        max_age=int(settings.dashboard_session_s),
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" or (settings.public_base_url or "").startswith("https://"),
    )
    return response


@router.post("/logout")
def logout(_: ChangingSession):
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path=PREFIX)
    return response


# -- the dashboard's JSON (the same views as the signed API) ------------------------------------
@router.get("/api/jobs")
def list_jobs(
    _: Session,
    store: StoreDep,
    community: Annotated[str | None, Query(pattern=COMMUNITY_ID_PATTERN)] = None,
    status: JobStatus | None = None,
    cursor: Cursor = None,
):
    return jobs_page(store, community, status, 50, cursor)


@router.get("/api/jobs/{job_id}")
def get_job(job_id: JobId, _: Session, store: StoreDep):
    return job_view(job_or_404(store, job_id))


@router.get("/api/jobs/{job_id}/events")
def job_events(job_id: JobId, _: Session, store: StoreDep, after: Annotated[int, Query(ge=0, le=2**62)] = 0):
    return events_page(store, job_id, after, 1000)


@router.post("/api/jobs/{job_id}/cancel")
def cancel_job(job_id: JobId, _: ChangingSession, store: StoreDep, runner: RunnerDep):
    job_or_404(store, job_id)
    return job_view(runner.cancel(job_id))


def add_dashboard(app: FastAPI) -> None:
    """The /ui routes and their script and style sheet (only when DPO_DASHBOARD_TOKEN is set)."""
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=PAGES / "static"), name="dashboard-static")
