"""Request signatures: X-DPO-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, string to sign)>.

The string to sign binds a signature to one request (as AWS SigV4 does), so a signature over one
request never authorises another:

    <t> "\\n" <METHOD> "\\n" <path> "\\n" <canonical query> "\\n" <Idempotency-Key> "\\n" <body bytes>

The canonical query is the query's name=value pairs sorted by name (a repeated name keeps its
values' order), each percent-encoded
(RFC 3986: unreserved characters kept) and joined with "&"; an empty query is "". Several `v1=`
values may be sent (one per secret while a secret is rotated); `DPO_WEBHOOK_SECRET` may hold the
current and the previous secret, comma-separated. Callbacks use another secret and scheme
(core/callbacks.py), so a callback can never verify as a request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from urllib.parse import parse_qsl, quote

from core import errors
from core.errors import Unauthorized

HEADER = "X-DPO-Signature"
_DIGITS = re.compile(r"[0-9]{1,12}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def canonical_query(query: str | dict | None) -> str:
    """name=value pairs sorted, percent-encoded, joined by '&' (from a raw query string or a dict)."""
    if not query:
        return ""
    pairs = (
        parse_qsl(query, keep_blank_values=True)
        if isinstance(query, str)
        else [(str(k), str(v)) for k, v in query.items()]
    )
    # sorted by name only (stable): a repeated name keeps its values' order, which the app reads
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(pairs, key=lambda kv: kv[0]))


def string_to_sign(
    t: int, method: str, path: str, query: str | dict | None, body: bytes, idempotency_key: str = ""
) -> bytes:
    return f"{t}\n{method.upper()}\n{path}\n{canonical_query(query)}\n{idempotency_key}\n".encode() + body


def _mac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(
    secret: str | list[str],
    method: str,
    path: str,
    body: bytes = b"",
    query: str | dict | None = None,
    timestamp: int | None = None,
    idempotency_key: str = "",
) -> str:
    """The header value for one request, signed now (or at `timestamp`); one v1 per secret."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    message = string_to_sign(t, method, path, query, body, idempotency_key)
    secrets = [secret] if isinstance(secret, str) else secret
    return ",".join([f"t={t}"] + [f"v1={_mac(s, message)}" for s in secrets])


def parse_header(header: str | None, tolerance_s: int, now: float | None = None) -> tuple[int, list[str]]:
    """(t, the v1 values) of a well-formed, fresh header, else Unauthorized. Checked before
    the body is read, so a request without a usable signature costs nothing."""
    if not header:
        raise Unauthorized(errors.MISSING_SIGNATURE)
    t, given = None, []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise Unauthorized(errors.MALFORMED_SIGNATURE)
        if key == "t" and t is None and _DIGITS.fullmatch(value):
            t = int(value)
        elif key == "v1" and _HEX64.fullmatch(value):
            given.append(value.lower())
        else:
            raise Unauthorized(errors.MALFORMED_SIGNATURE)
    if t is None or not given or len(given) > 4:
        raise Unauthorized(errors.MALFORMED_SIGNATURE)
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        raise Unauthorized(errors.STALE_SIGNATURE.format(tolerance=tolerance_s))
    return t, given


class Macs:
    """The HMACs of one request under each secret, and the SHA-256 of its string to sign, fed as
    the body arrives (no copy of a large body is hashed in one go on the event loop; hashlib
    releases the GIL on large chunks)."""

    def __init__(
        self, secrets: list[str], t: int, method: str, path: str, query: str | dict | None, idempotency_key: str = ""
    ):
        prefix = string_to_sign(t, method, path, query, b"", idempotency_key)
        self._macs = [hmac.new(secret.encode(), prefix, hashlib.sha256) for secret in secrets]
        self._digest = hashlib.sha256(prefix)

    def update(self, chunk: bytes) -> None:
        for mac in self._macs:
            mac.update(chunk)
        self._digest.update(chunk)

    def digest(self) -> str:
        """The request's own identity (the replay cache's key): derived by the server from the
        string to sign, so one request is one entry whichever `v1=` values (secrets) carry it."""
        return self._digest.hexdigest()

    def check(self, given: list[str]) -> str:
        """The matching v1 value, or Unauthorized. Every comparison is constant-time."""
        match = None
        for mac in self._macs:
            expected = mac.hexdigest()
            for value in given:
                if hmac.compare_digest(expected, value):
                    match = value
        if match is None:
            raise Unauthorized(errors.BAD_SIGNATURE)
        return match


def verify(
    header: str | None,
    method: str,
    path: str,
    query: str | dict | None,
    body: bytes,
    secrets: str | list[str],
    tolerance_s: int = 300,
    now: float | None = None,
) -> str:
    """Raise Unauthorized unless `header` is a fresh, valid signature of this request;
    returns the matching MAC."""
    t, given = parse_header(header, tolerance_s, now)
    macs = Macs([secrets] if isinstance(secrets, str) else secrets, t, method, path, query)
    macs.update(body)
    return macs.check(given)
