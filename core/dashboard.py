"""The jobs dashboard at /ui: a page served by the service (no build step, no CDN) that lists jobs,
follows one's progress, draws its curves from its events, lists its artifact files and cancels it.

Access is its own, never the webhook secret:
- `DPO_DASHBOARD_TOKEN` unset: the dashboard is off (every /ui path is a 404).
- POST /ui/login with the token sets a session cookie: `<expires>.<nonce>.<HMAC>`, keyed by the
  token (changing the token logs everyone out), HttpOnly, SameSite=Strict, Secure over https.
- A state-changing request (cancel, logout) also needs `X-CSRF-Token`: an HMAC of the session's
  nonce, which only the dashboard page (same origin) can read; and a cross-origin Origin is refused
  (X-Forwarded-Host is never believed; with DPO_ALLOWED_HOSTS set, a request to another Host never
  gets here: core/edge.py).
- Failed logins are limited per client (`DPO_DASHBOARD_LOGIN_FAILURES` a minute) and in all
  (`DPO_DASHBOARD_LOGIN_FAILURES_GLOBAL`): past either, a login is a 429 with Retry-After before
  the token is even compared. The client is the peer's address, or the X-Forwarded-For client
  uvicorn found when the peer is one of its trusted proxies (FORWARDED_ALLOW_IPS). Each failure
  is logged at WARNING (the client, never what was typed).
The dashboard reads and cancels jobs; it cannot trigger one (only a signed request can).

The gate (core/gate.py) lets /ui through unsigned; this module checks the session itself.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import html
import logging
import math
import secrets
import threading
import time
from collections import deque
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
LOGIN_WINDOW_S = 60.0  # failed logins are counted over the last minute
log = logging.getLogger(__name__)


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


# -- failed logins ----------------------------------------------------------------------------
class LoginLimiter:
    """Failed logins of the last `window_s`, per client and in all (in memory: per replica).
    Refused attempts are not counted, so an attacker's flood cannot extend its own wait, and no
    client keeps more than `per_client` entries, nor all clients more than `overall`."""

    def __init__(self, per_client: int, overall: int, window_s: float = LOGIN_WINDOW_S):
        self.per_client, self.overall, self.window_s = per_client, overall, window_s
        self._clients: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()
        self._lock = threading.Lock()

    def _trim(self, failures: deque[float], now: float) -> deque[float]:
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        return failures

    def retry_after(self, client: str, now: float | None = None) -> int | None:
        """Whole seconds until `client` may try again, or None when it may try now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            waits = []
            mine = self._trim(self._clients.get(client, deque()), now)
            if len(mine) >= self.per_client:
                waits.append(mine[-self.per_client] + self.window_s - now)
            if len(self._trim(self._all, now)) >= self.overall:
                waits.append(self._all[-self.overall] + self.window_s - now)
        return max(1, math.ceil(max(waits))) if waits else None

    def failed(self, client: str, now: float | None = None) -> int:
        """Count a failure; the client's failures in the window."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._clients) > 4 * self.overall:  # forget clients whose failures all expired
                self._clients = {c: f for c, f in self._clients.items() if self._trim(f, now)}
            mine = self._clients.setdefault(client, deque())
            mine.append(now)
            self._all.append(now)
            return len(self._trim(mine, now))

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


def _limiter(request: Request) -> LoginLimiter:
    state = request.app.state
    if getattr(state, "login_limiter", None) is None:
        settings: Settings = state.settings
        state.login_limiter = LoginLimiter(settings.dashboard_login_failures, settings.dashboard_login_failures_global)
    return state.login_limiter


# -- dependencies -----------------------------------------------------------------------------
def _token(request: Request) -> str:
    settings: Settings = request.app.state.settings
    if settings.dashboard_token is None:  # routes exist only with a token; this guards a refactor
        raise NotFound("Not Found")
    return settings.dashboard_token.get_secret_value()


def _same_origin(request: Request) -> None:
    """A browser sends Origin on a POST: it must be this service's own: the Host it was sent to,
    DPO_PUBLIC_BASE_URL's host, or a name in DPO_ALLOWED_HOSTS. X-Forwarded-Host is not
    believed (anyone can send it); behind a proxy that rewrites Host, name the public host in one
    of those settings. Host itself is what DNS rebinding controls: DPO_ALLOWED_HOSTS closes that."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    settings: Settings = request.app.state.settings
    public = settings.public_base_url
    ours = {request.headers.get("host", ""), urlsplit(public).netloc if public else ""} - {""}
    try:
        netloc, hostname = urlsplit(origin).netloc, urlsplit(origin).hostname
    except ValueError:  # not a URL at all
        raise Forbidden(errors.CROSS_ORIGIN) from None
    if netloc not in ours and (hostname is None or hostname not in settings.allowed_hosts):
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
    """A form post with the token; a session cookie and back to /ui, or /ui?login=failed; a 429
    (the login page, with Retry-After) past the failed-login limits."""
    _same_origin(request)
    token, settings, limiter = _token(request), request.app.state.settings, _limiter(request)
    body = b""
    async for chunk in request.stream():  # the gate lets /ui through unread: bound it here
        body += chunk
        if len(body) > MAX_LOGIN_BYTES:
            raise TooLarge(f"a login form is at most {MAX_LOGIN_BYTES} bytes")
    client = request.client.host if request.client else "unknown"
    # no await from here on: the check, the comparison and the count are one step
    wait = limiter.retry_after(client)
    if wait is not None:
        page = _page("login.html", message=errors.LOGIN_LIMITED.format(retry_after=wait))
        page.status_code = 429
        page.headers["Retry-After"] = str(wait)
        return page
    given = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
    if not hmac.compare_digest(given.encode(), token.encode()):
        failures = limiter.failed(client)
        log.warning(
            "dashboard login failed from %s (%d of %d allowed a minute%s)",
            client,
            failures,
            settings.dashboard_login_failures,
            "; further logins refused for a minute" if failures >= settings.dashboard_login_failures else "",
        )
        return RedirectResponse(f"{PREFIX}?login=failed", status_code=303)
    limiter.succeeded(client)
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
