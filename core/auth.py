"""Webhook signatures: X-DPO-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>."""

from __future__ import annotations

import hashlib
import hmac
import time

from core import errors
from core.errors import ServiceError

HEADER = "X-DPO-Signature"


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The header value for `body`, signed now (or at `timestamp`)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(header: str | None, body: bytes, secret: str, tolerance_s: int = 300, now: float | None = None) -> None:
    """Raise ServiceError(401) unless `header` is a fresh, valid signature of `body`."""
    if not header:
        raise ServiceError(401, "unauthorized", errors.MISSING_SIGNATURE)
    try:
        parts = dict(item.strip().split("=", 1) for item in header.split(","))
        t = int(parts["t"])
        given = parts["v1"]
        bytes.fromhex(given)
    except (ValueError, KeyError):
        raise ServiceError(401, "unauthorized", errors.MALFORMED_SIGNATURE) from None
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        raise ServiceError(401, "unauthorized", errors.STALE_SIGNATURE.format(tolerance=tolerance_s))
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, given.lower()):
        raise ServiceError(401, "unauthorized", errors.BAD_SIGNATURE)
