"""Signed POST of the final job record to the caller's callbackUrl, retried with backoff."""

from __future__ import annotations

import json
import logging
import threading
import time
from urllib.parse import urlsplit

import httpx

from core.auth import HEADER, sign
from core.errors import ServiceError

log = logging.getLogger(__name__)


def check_callback_url(url: str, allowed_hosts: list[str]) -> None:
    """422 unless the URL is http(s) to an allowed host (none are allowed by default)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServiceError(422, "validation_error", "callbackUrl: expected an http(s) URL", field="callbackUrl")
    if parts.hostname.lower() not in allowed_hosts:
        raise ServiceError(
            422,
            "validation_error",
            f"callbackUrl: host '{parts.hostname}' is not in DPO_CALLBACK_ALLOWED_HOSTS",
            field="callbackUrl",
        )


def send_callback(url: str, record: dict, secret: str | None, retries: int = 4, timeout_s: float = 10.0) -> bool:
    body = json.dumps(record).encode()
    delay = 1.0
    for attempt in range(1, retries + 1):
        headers = {"Content-Type": "application/json"}
        if secret:
            headers[HEADER] = sign(secret, body)  # re-signed each try: the timestamp must be fresh
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
