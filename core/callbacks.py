"""POST of the final job record to the caller's callbackUrl, retried with backoff, signed the
Standard Webhooks way (https://www.standardwebhooks.com) with DPO_CALLBACK_SECRET:

    webhook-id: msg_<job id>          webhook-timestamp: <unix seconds>
    webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>

`key` is the base64-decoded part of a "whsec_..." secret, or the secret's UTF-8 bytes. A different
secret and scheme than requests use (core/auth.py): a callback can never verify as a request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from urllib.parse import urlsplit

import httpx

from core.errors import ServiceError

log = logging.getLogger(__name__)


def check_callback_url(url: str, allowed_hosts: list[str]) -> None:
    """422 unless the URL is a well-formed http(s) URL to an allowed host (none by default)."""

    def refuse(why: str) -> ServiceError:
        return ServiceError(422, "validation_error", f"callbackUrl: {why}", field="callbackUrl")

    if any(ord(c) < 0x21 or c == "\x7f" for c in url):
        raise refuse("expected an http(s) URL without spaces or control characters")
    try:
        parts = urlsplit(url)
        hostname, _port = parts.hostname, parts.port  # .port raises on a bad port
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL):
        raise refuse("not a valid URL") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise refuse("expected an http(s) URL")
    if hostname.lower() not in allowed_hosts:
        raise refuse(f"host '{hostname}' is not in DPO_CALLBACK_ALLOWED_HOSTS")


def webhook_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()


def sign_webhook(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(webhook_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def webhook_headers(secret: str | None, msg_id: str, body: bytes, timestamp: int | None = None) -> dict:
    t = int(time.time()) if timestamp is None else timestamp
    headers = {"Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(t)}
    if secret:
        headers["webhook-signature"] = sign_webhook(secret, msg_id, t, body)
    return headers


def send_callback(url: str, record: dict, secret: str | None, retries: int = 4, timeout_s: float = 10.0) -> bool:
    body = json.dumps(record).encode()
    delay = 1.0
    for attempt in range(1, retries + 1):
        headers = webhook_headers(secret, f"msg_{record.get('job_id')}", body)  # re-signed each try: fresh timestamp
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=timeout_s)
            if response.status_code < 300:
                return True
            log.warning(
                "callback for job %s: HTTP %s (attempt %d/%d)",
                record.get("job_id"),
                response.status_code,
                attempt,
                retries,
            )
        except httpx.HTTPError as err:
            log.warning(
                "callback for job %s failed: %s (attempt %d/%d)",
                record.get("job_id"),
                type(err).__name__,
                attempt,
                retries,
            )
        if attempt < retries:
            time.sleep(delay)
            delay *= 2
    return False


def send_callback_later(url: str, record: dict, secret: str | None, retries: int, timeout_s: float) -> threading.Thread:
    thread = threading.Thread(
        target=send_callback, args=(url, record, secret, retries, timeout_s), daemon=True, name="callback"
    )
    thread.start()
    return thread
