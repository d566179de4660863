"""One domain error type; webhook_handler turns it into a JSON response with one handler."""

from __future__ import annotations


class ServiceError(Exception):
    """An error with an HTTP status, a stable code and a message that names what was wrong."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers

    def body(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


# Fixed messages that tests assert.
MISSING_SIGNATURE = "missing X-DPO-Signature header"
MALFORMED_SIGNATURE = "malformed X-DPO-Signature header: expected 't=<unix seconds>,v1=<hex hmac-sha256>[,v1=...]'"
STALE_SIGNATURE = "signature timestamp is more than {tolerance} s from the server clock"
BAD_SIGNATURE = "signature does not match the request (method, path, query and body)"
REPLAYED_SIGNATURE = (
    "signature already used: a signed POST is accepted once (retry with a new signature and the same Idempotency-Key)"
)
JOB_NOT_FOUND = "job not found"
JOB_FINISHED = "job already finished with status '{status}'"
IDEMPOTENCY_CONFLICT = "Idempotency-Key was already used with a different request body"
CALLBACK_NEEDS_SECRET = "callbackUrl: this server has no DPO_CALLBACK_SECRET to sign callbacks with"
LOGIN_REQUIRED = "log in to the dashboard first"
BAD_CSRF = "missing or wrong X-CSRF-Token header (reload the dashboard)"
CROSS_ORIGIN = "cross-origin request refused"
