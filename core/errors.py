"""One domain error type, raised as one of its kinds (each with its HTTP status and a default
code); webhook_handler turns any of them into the one JSON error shape with one handler."""

from __future__ import annotations


class ServiceError(Exception):
    """An error with an HTTP status, a stable code and a message that names what was wrong.
    Raise one of the subclasses below; `code` overrides the kind's default where a client needs
    to tell cases apart (e.g. community_busy among conflicts)."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, field: str | None = None, headers: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.field, self.headers = message, field, headers
        if code is not None:
            self.code = code

    def body(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class Invalid(ServiceError):
    """The request is well-formed but a field's value is wrong (name it in `field`)."""

    status, code = 422, "validation_error"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class TooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class TooMany(ServiceError):
    status, code = 429, "too_many_requests"


class Unavailable(ServiceError):
    """Nothing was changed; retrying (here later, or on another replica) may succeed."""

    status, code = 503, "unavailable"


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
LOGIN_LIMITED = "Too many failed logins: try again in {retry_after} s."
COMMUNITY_QUEUE_FULL = (
    "community '{community}' already has {limit} queued jobs (DPO_MAX_QUEUED_PER_COMMUNITY); retry when one has started"
)
BAD_HOST = "this service does not answer to that Host (DPO_ALLOWED_HOSTS)"
