"""The gate in front of every route: the body-size limit and the request signature, checked on the
raw bytes before any route, JSON parser or validator sees the request.

- A declared Content-Length over the limit: 413 before the body is read.
- A missing, malformed or stale signature header: 401 before the body is read.
- The body is read (413 once past the limit) and fed to the HMAC chunk by chunk as it arrives;
  the signature covers method, path, query and body. A trigger is then remembered (by the
  SHA-256 of its string to sign) for the tolerance window: the same request sent again, with any
  set of valid `v1=` values, is a 401 (replay), unless repeated with the Idempotency-Key it first
  came with.
Only then does the request reach the app, which reads the same bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from core import errors
from core.auth import HEADER, Macs, parse_header
from core.errors import ServiceError, TooLarge, Unauthorized, Unavailable
from core.store import StoreUnavailable

PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/ui"})
# Swagger UI's own files, served by the service; the dashboard, which checks its own session
PUBLIC_PREFIXES = ("/docs/assets/", "/ui/")
ACCEPTED_ONCE = frozenset({"/trigger-finetune"})
VERIFIED = "dpo.verified"  # scope key the gate sets on a request whose signature it checked
_GONE = object()  # the client disconnected while sending its body


class Gate:
    def __init__(
        self,
        app,
        secrets: list[str] | None,
        max_body_bytes: int,
        tolerance_s: int,
        remember: Callable[[str, float, str], bool] | None = None,
    ):
        """`secrets`: None only with DPO_ALLOW_UNSIGNED=1. `remember(digest, expires_at, key)`:
        False for a replay (JobStore.remember_signature)."""
        self.app, self.secrets, self.limit, self.tolerance = app, secrets, max_body_bytes, tolerance_s
        self.remember = remember

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            body = await self._admit(scope, receive)
        except ServiceError as err:
            return await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
        if body is _GONE:
            return
        await self.app(scope, receive if body is None else _replay(body, receive), send)

    async def _admit(self, scope, receive):
        """None for a public path (passed through untouched), the body once it may go on, or
        ServiceError (413, 401)."""
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            raise self._too_large()
        if scope["path"] in PUBLIC_PATHS or scope["path"].startswith(PUBLIC_PREFIXES):
            return None
        given, macs = None, None
        if self.secrets is not None:
            t, given = parse_header(headers.get(HEADER), self.tolerance)  # 401 before reading anything
            query = scope.get("query_string", b"").decode("latin-1")
            macs = Macs(self.secrets, t, scope["method"], scope["path"], query, headers.get("idempotency-key", ""))
        body = await self._read_body(receive, macs)
        if body is _GONE or macs is None:
            return body
        macs.check(given)
        # a signed trigger is accepted once (a replay would start a second training), unless it is
        # repeated with the Idempotency-Key it first came with (that answers the same job). The
        # other POST, cancel, has the same effect however often it is sent. The cache keys on the
        # request's digest, not on a v1 value the caller chose: while secrets rotate, one request
        # signed with both and then with one is still one request.
        if scope["method"] == "POST" and scope["path"] in ACCEPTED_ONCE and self.remember is not None:
            key = headers.get("idempotency-key", "")
            try:
                fresh = await asyncio.to_thread(self.remember, macs.digest(), t + self.tolerance, key)
            except StoreUnavailable as err:  # the replay check needs the (shared) store
                raise Unavailable(
                    f"the job store is unavailable ({err}); retry",
                    headers={"Retry-After": "5"},
                    code="store_unavailable",
                ) from None
            if not fresh:
                raise Unauthorized(errors.REPLAYED_SIGNATURE)
        scope[VERIFIED] = True
        return body

    async def _read_body(self, receive, macs: Macs | None):
        """The body (413 once past the limit), fed to `macs` chunk by chunk as it arrives."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _GONE
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise self._too_large()
            if macs is not None and chunk:
                macs.update(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> ServiceError:
        return TooLarge(f"request body larger than {self.limit} bytes")


def _replay(body: bytes, receive):
    """A receive() that hands the app the body already read, then defers to the real one."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
