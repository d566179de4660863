"""POST of the final job record to the caller's callbackUrl, retried with backoff, signed the
Standard Webhooks way (https://www.standardwebhooks.com) with DPO_CALLBACK_SECRET:

    webhook-id: msg_<job id>          webhook-timestamp: <unix seconds>
    webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>

`key` is the base64-decoded part of a "whsec_..." secret, or the secret's UTF-8 bytes. A different
secret and scheme than requests use (core/auth.py): a callback can never verify as a request."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import threading
import time
from urllib.parse import urlsplit

import httpx

from core.errors import Invalid, ServiceError

log = logging.getLogger(__name__)


def check_callback_url(url: str, allowed_hosts: list[str]) -> None:
    """422 unless the URL is a well-formed http(s) URL to an allowed host (none by default)."""

    def refuse(why: str) -> ServiceError:
        return Invalid(f"callbackUrl: {why}", field="callbackUrl")

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


RETRYABLE = {408, 429}  # besides 5xx and network errors; any other 4xx is final


MAX_RECEIVERS = 8  # receivers delivered to at once: a slow one holds up only its own callbacks


async def deliver(
    client: httpx.AsyncClient, url: str, msg_id: str, body: bytes, secret: str | None, timeout_s: float
) -> tuple[bool, bool, str]:
    """One attempt, `timeout_s` for the whole of it (connect, send, the answer): a receiver that
    trickles its answer a byte at a time is cut off at the deadline, not after each byte's
    timeout. (delivered, worth retrying, what happened)."""
    try:
        response = await asyncio.wait_for(
            client.post(url, content=body, headers=webhook_headers(secret, msg_id, body)), timeout_s
        )
    except TimeoutError:
        return False, True, f"no answer within {timeout_s:g} s"
    except httpx.HTTPError as err:
        return False, True, type(err).__name__
    code = response.status_code
    return code < 300, code >= 500 or code in RETRYABLE, f"HTTP {code}"


def receiver(url: str) -> str:
    return urlsplit(url).netloc.lower()


class CallbackSender:
    """Delivers the job store's callback outbox with backoff (1, 2, 4, ... s, at most 5 min apart),
    `retries` attempts in all; every attempt and the outcome become `callback` events of the job.
    The outbox lives in the job store, so a restart resumes delivery where it stopped. Different
    receivers are delivered to concurrently (at most MAX_RECEIVERS at once), one receiver's
    callbacks in order, each attempt within `timeout_s` in all."""

    def __init__(self, store, secret: str | None, retries: int, timeout_s: float):
        self.store, self.secret, self.retries, self.timeout_s = store, secret, retries, timeout_s
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="callbacks")

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                due = self.store.due_callbacks(time.time())
                if due:
                    asyncio.run(self._deliver_due(due))
            except Exception:  # the store or a receiver misbehaving must not end delivery
                log.exception("callback delivery")
            self._wake.wait(timeout=1.0)
            self._wake.clear()

    async def _deliver_due(self, due: list[dict]) -> None:
        by_receiver: dict[str, list[dict]] = {}
        for item in due:
            by_receiver.setdefault(receiver(item["url"]), []).append(item)
        slots = asyncio.Semaphore(MAX_RECEIVERS)
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:

            async def one_receiver(items: list[dict]) -> None:
                async with slots:
                    for item in items:
                        if self._stop.is_set():
                            return
                        await self._attempt(client, item)

            await asyncio.gather(*(one_receiver(items) for items in by_receiver.values()))

    async def _attempt(self, client: httpx.AsyncClient, item: dict) -> None:
        job_id, attempt = item["job_id"], item["attempts"] + 1
        body = item["body"].encode()
        ok, retry, what = await deliver(client, item["url"], f"msg_{job_id}", body, self.secret, self.timeout_s)
        if ok:
            outcome, state, next_at = "delivered", "delivered", 0.0
        elif retry and attempt < self.retries:
            outcome, state, next_at = "retrying", "pending", time.time() + min(300.0, 2.0 ** (attempt - 1))
        else:
            outcome, state, next_at = "gave_up", "failed", 0.0
        await asyncio.to_thread(self._record, job_id, attempt, state, next_at, what, outcome)  # the store may block
        if outcome != "retrying":
            log.log(logging.INFO if ok else logging.WARNING, "callback for job %s: %s (%s)", job_id, outcome, what)

    def _record(self, job_id: str, attempt: int, state: str, next_at: float, what: str, outcome: str) -> None:
        self.store.record_callback_attempt(job_id, state, next_at)
        self.store.add_event(job_id, "callback", {"attempt": attempt, "result": what, "outcome": outcome})
