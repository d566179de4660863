"""The service's outer edge, in front of the gate (core/gate.py): which Host names it answers to,
and the security headers every response carries.

- DPO_ALLOWED_HOSTS set: a request whose Host is not one of those names is a 400 before anything
  else runs (a DNS-rebinding page reaches the service under its own name, and the browser then
  calls it same-origin); the probes /health, /ready and /metrics answer whatever the Host, since
  load balancers and health checks call them by address. Unset: any Host.
- Every response: `X-Content-Type-Options: nosniff`, and a `Content-Security-Policy` unless the
  route set its own (the dashboard's pages, /docs): by default `default-src 'none'`, which is all
  JSON needs and which no HTML an attacker got into a response could run under.

Forwarded headers are uvicorn's business: it believes X-Forwarded-For / X-Forwarded-Proto only from
the proxies in FORWARDED_ALLOW_IPS (`--forwarded-allow-ips`; default loopback), whichever way the
service is started; nothing here reads X-Forwarded-Host.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from core import errors

PROBES = frozenset({"/health", "/ready", "/metrics"})
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def host_name(host: str) -> str | None:
    """The name in a Host header (no port, lower case, IPv6 without brackets), None if unusable."""
    try:
        return urlsplit(f"//{host}").hostname
    except ValueError:
        return None


class AllowedHosts:
    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, frozenset(allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed and scope["path"] not in PROBES:
            if host_name(Headers(scope=scope).get("host", "")) not in self.allowed:
                body = {"error": {"code": "bad_host", "message": errors.BAD_HOST}}
                return await JSONResponse(body, status_code=400)(scope, receive, send)
        await self.app(scope, receive, send)


class SecurityHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(b"x-content-type-options", b"nosniff")] if b"x-content-type-options" not in names else []
                if b"content-security-policy" not in names:
                    extra.append((b"content-security-policy", API_CSP.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
