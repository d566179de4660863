"""The HTTP service: `uvicorn webhook_handler:app` (port 8000).

create_app() builds the app; its lifespan opens the job store, the storage backend and the runner,
and shuts them down cleanly (SIGTERM: stop accepting, stop the running job at a step boundary).
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path

from core import SERVICE_NAME, __version__
from core.auth import HEADER
from core.callbacks import check_callback_url
from core.dashboard import add_dashboard
from core.edge import API_CSP, AllowedHosts, SecurityHeaders
from core.errors import (
    CALLBACK_NEEDS_SECRET,
    COMMUNITY_QUEUE_FULL,
    IDEMPOTENCY_CONFLICT,
    MISSING_SIGNATURE,
    Conflict,
    Invalid,
    NotFound,
    ServiceError,
    TooMany,
    Unauthorized,
    Unavailable,
)
from core.gate import VERIFIED, Gate
from core.job_config import job_training_config
from core.logs import configure_logging
from core.metrics import Metrics
from core.resources import Cursor, JobId, Resources, ResourcesDep, RunnerDep, SettingsDep, StoreDep
from core.runner import Runner
from core.schemas import (
    COMMUNITY_ID_PATTERN,
    EventList,
    Health,
    JobList,
    JobStatus,
    JobView,
    QueuedResponse,
    Readiness,
    SyncResponse,
    TriggerRequest,
    errors,
    events_page,
    job_or_404,
    job_view,
    jobs_page,
)
from core.settings import Settings, get_settings, settings_problem
from core.store import (
    FINAL,
    ActiveJobConflict,
    CommunityQueueFull,
    IdempotencyConflict,
    Job,
    JobStore,
    NewJob,
    QueueFull,
    StoreUnavailable,
    build_job_store,
)
from storage import build_storage
from storage.checkpoints import LocalCheckpoints, SharedCheckpoints
from training.records import RecordError, normalise_records

log = logging.getLogger("dpo")
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# -- dependencies -----------------------------------------------------------------------------
SIGNING = """Every request except /health, /ready, /metrics and /docs carries
`X-DPO-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(DPO_WEBHOOK_SECRET, string to sign)>`, where
the string to sign is `<t>\\n<METHOD>\\n<path>\\n<canonical query>\\n<Idempotency-Key>\\n<raw body>`:
the query's name=value pairs sorted by name, percent-encoded (RFC 3986) and joined with `&`; the
Idempotency-Key header's value (empty without one); the body's exact bytes (empty for GET).
Timestamps more than 300 s off are refused; a signed trigger is accepted once. A browser cannot
sign requests: use `tools/trigger.py` (or `core.auth.sign`) to make the header, then paste it here
for one request."""
SIGNATURE = APIKeyHeader(name=HEADER, scheme_name="DPO-Signature", description=SIGNING, auto_error=False)


async def require_signature(request: Request, _header: Annotated[str | None, Security(SIGNATURE)] = None) -> bytes:
    """The raw body of a request the gate (core/gate.py) verified; 401 if it did not. The
    security scheme documents the header in the OpenAPI schema (and /docs); the gate checks it."""
    if request.app.state.settings.webhook_secrets is not None and not request.scope.get(VERIFIED):
        raise Unauthorized(MISSING_SIGNATURE)  # only if the gate were bypassed
    return await request.body()


Signed = Annotated[bytes, Depends(require_signature)]


async def check_records(name: str, records: list, settings: Settings) -> None:
    """Inline records (`dataset` or `validation`) within the limits and all usable, before anything
    is queued (off the event loop: 10,000 records take a while); else a 422 naming the record."""
    if len(records) > settings.max_records:
        raise Invalid(
            f"{name}: {len(records)} records, more than the limit of {settings.max_records}",
            field=name,
            code="too_many_records",
        )
    try:
        await asyncio.to_thread(normalise_records, records, max_chars=settings.max_field_chars)
    except RecordError as err:
        field = f"{name}[{err.record}].{err.field}" if isinstance(err.record, int) else name
        raise Invalid(str(err), field=field, code="invalid_record") from None


def status_url(request: Request, settings: Settings, job_id: str) -> str:
    """Where a client polls the job: DPO_PUBLIC_BASE_URL (the load balancer) when set, since any
    replica answers; else the base URL this request came in on."""
    if settings.public_base_url:
        return f"{settings.public_base_url}/jobs/{job_id}"
    return str(request.url_for("get_job", job_id=job_id))


def worker_check(runner: Runner) -> str:
    if not runner.alive():
        return "not running"
    stuck = runner.stuck_jobs()
    if stuck:
        return f"trainer of job {stuck[0]} silent for over half of DPO_JOB_STALL_S; it is stopped at the full limit"
    return "ok"


# -- routes -----------------------------------------------------------------------------------
router = APIRouter()


@router.get("/health", response_model=Health, tags=["ops"], responses=errors())
def health():
    """Liveness: no dependencies touched, never blocked by training."""
    return {"status": "healthy", "service": SERVICE_NAME, "version": __version__}


@router.get("/ready", response_model=Readiness, tags=["ops"], responses={503: {"model": Readiness}, **errors()})
def ready(res: ResourcesDep):
    checks = {
        "job_store": res.store.check() or "ok",
        "worker": worker_check(res.runner),
        "preference_source": res.source.check() or "ok",
        "artifact_store": res.artifacts.check() or "ok",
    }
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get(
    "/metrics", tags=["ops"], response_class=Response, responses={200: {"content": {"text/plain": {}}}, **errors()}
)
def metrics(res: ResourcesDep):
    return Response(res.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def check_trigger(payload: TriggerRequest, settings: Settings, runner: Runner) -> None:
    """Everything about a trigger that can be wrong, before anything is queued."""
    if runner.stopping:
        raise Unavailable("the service is shutting down; retry on another instance", code="shutting_down")
    if payload.callbackUrl is not None:
        check_callback_url(payload.callbackUrl, settings.callback_allowed_hosts)
        if settings.callback_secret is None and settings.webhook_secret is not None:
            raise Invalid(CALLBACK_NEEDS_SECRET, field="callbackUrl")
    for name, records in (("dataset", payload.dataset), ("validation", payload.validation)):
        if records is not None:
            await check_records(name, records, settings)


async def trigger_job_config(payload: TriggerRequest, settings: Settings) -> dict:
    """What the job keeps of the trigger: the resolved training config (422 if bad) and the rest."""
    overrides = payload.config
    return {
        "validation_records": None if payload.validation is None else len(payload.validation),
        "overrides": overrides.model_dump(exclude_none=True) if overrides else {},
        **await asyncio.to_thread(job_training_config, overrides, settings),  # model, loss, values
        "source_options": {"since": payload.since.isoformat() if payload.since else None, "limit": payload.limit},
        "suffix": payload.suffix,
        "metadata": payload.metadata or {},
    }


async def enqueue(store: JobStore, new_job: NewJob, settings: Settings) -> Job:
    """The new job (or, for a repeated Idempotency-Key, its job); the store's refusals as errors."""
    try:
        job, _ = await asyncio.to_thread(store.create, new_job)
    except IdempotencyConflict as err:
        raise Conflict(f"{IDEMPOTENCY_CONFLICT} (job {err.job_id})", code="idempotency_conflict") from None
    except ActiveJobConflict as err:
        raise Conflict(
            f"community '{new_job.community_id}' already has an active job: {err.job_id}",
            field="communityId",
            code="community_busy",
        ) from None
    except CommunityQueueFull:
        raise TooMany(
            COMMUNITY_QUEUE_FULL.format(community=new_job.community_id, limit=settings.max_queued_per_community),
            field="communityId",
            headers={"Retry-After": "60"},
            code="community_queue_full",
        ) from None
    except QueueFull:
        raise TooMany(
            f"the job queue is full ({settings.max_queued_jobs} queued); retry later",
            headers={"Retry-After": "60"},
            code="queue_full",
        ) from None
    return job


async def wait_for_end(request: Request, store: JobStore, runner: Runner, job_id: str, settings: Settings) -> Response:
    """`?wait=true`: poll (off the event loop, backing off from 0.25 s to 2 s) until the job
    ends; the old synchronous shape. Bounded: after DPO_WAIT_MAX_S the answer is the 202 a
    trigger without wait gets (the job goes on; poll its status_url), and a client that went away
    stops the wait (the job goes on too)."""
    deadline, pause = time.monotonic() + settings.wait_max_s, 0.25
    while True:
        job = await asyncio.to_thread(store.get, job_id)
        if job.status in FINAL or runner.stopping:
            break
        if time.monotonic() >= deadline:
            body = {"status": job.status, "job_id": job_id, "status_url": status_url(request, settings, job_id)}
            return JSONResponse(body, status_code=202, headers={"Retry-After": "10"})
        if await request.is_disconnected():
            log.info("job %s: the ?wait=true client went away; the job goes on", job_id)
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(2.0, pause * 1.5)
    view = job_view(job)
    body = {"job_id": job_id, "job_status": view["status"]}
    if view["status"] == "succeeded":
        body.update(status="success", policy_path=view["artifact"]["uri"])
    else:
        body.update(status="error", error=view["error"] or {"type": view["status"], "message": "job did not finish"})
    return JSONResponse(body, status_code=200)


@router.post(
    "/trigger-finetune",
    status_code=202,
    response_model=QueuedResponse,
    tags=["jobs"],
    responses={200: {"model": SyncResponse}, **errors(400, 401, 409, 422, 429, 503)},
)
async def trigger_finetune(
    request: Request,
    body: Signed,
    payload: TriggerRequest,
    res: ResourcesDep,
    settings: SettingsDep,
    wait: Annotated[bool, Query(description="answer when the job ends, in the old synchronous shape")] = False,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=256)] = None,
):
    await check_trigger(payload, settings, res.runner)
    new_job = NewJob(
        payload.communityId,
        await trigger_job_config(payload, settings),
        source="inline" if payload.dataset is not None else res.source.name,
        dataset=payload.dataset,
        validation=payload.validation,
        callback_url=payload.callbackUrl,
        idempotency_key=idempotency_key,
        body_sha256=hashlib.sha256(body).hexdigest(),
        max_queued=settings.max_queued_jobs,
        max_queued_per_community=settings.max_queued_per_community,
        one_per_community=settings.one_job_per_community,
        idempotency_ttl_s=settings.idempotency_ttl_s,
    )
    job = await enqueue(res.store, new_job, settings)
    res.runner.notify()
    if wait:
        return await wait_for_end(request, res.store, res.runner, job.id, settings)
    # a repeated request (same Idempotency-Key and body) answers its job as it is now
    return {"status": job.status, "job_id": job.id, "status_url": status_url(request, settings, job.id)}


@router.get("/jobs/{job_id}", response_model=JobView, tags=["jobs"], name="get_job", responses=errors(401, 404, 422))
def get_job(job_id: JobId, _: Signed, store: StoreDep):
    return job_view(job_or_404(store, job_id))


@router.get("/jobs", response_model=JobList, tags=["jobs"], responses=errors(401, 422))
def list_jobs(
    _: Signed,
    store: StoreDep,
    communityId: Annotated[str | None, Query(pattern=COMMUNITY_ID_PATTERN)] = None,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Cursor = None,
):
    return jobs_page(store, communityId, status, limit, cursor)


@router.post("/jobs/{job_id}/cancel", response_model=JobView, tags=["jobs"], responses=errors(401, 404, 409, 422))
def cancel_job(job_id: JobId, _: Signed, store: StoreDep, runner: RunnerDep):
    job_or_404(store, job_id)
    return job_view(runner.cancel(job_id))


@router.get("/jobs/{job_id}/events", response_model=EventList, tags=["jobs"], responses=errors(401, 404, 422))
def job_events(
    job_id: JobId,
    _: Signed,
    store: StoreDep,
    after: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
):
    return events_page(store, job_id, after, limit)


# -- the app ----------------------------------------------------------------------------------
def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the field: 'config.nope: unknown key' rather than pydantic's raw list."""
    details = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p not in ("body", "query", "path", "header")]
        field = ".".join(loc) or "body"
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        details.append({"field": field, "message": message})
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    return JSONResponse(
        {
            "error": {
                "code": "validation_error",
                "message": f"{first['field']}: {first['message']}",
                "field": first["field"],
                "details": details,
            }
        },
        status_code=422,
    )


def _store_unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
    """The job store is unreachable (Firestore lost): nothing was changed; another replica may answer."""
    body = {"error": {"code": "store_unavailable", "message": f"the job store is unavailable ({exc}); retry"}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (an unparsable body, an unknown route) in the one error shape."""
    codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
    body = {"error": {"code": codes.get(exc.status_code, "http_error"), "message": str(exc.detail)}}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: the caller gets an id to quote, never internals; the log gets the traceback."""
    error_id = uuid.uuid4().hex
    log.error(
        "unhandled error %s on %s %s",
        error_id,
        request.method,
        request.url.path,
        exc_info=exc,
        extra={"error_id": error_id},
    )
    return JSONResponse(
        {"error": {"code": "internal_error", "message": f"internal error (error id {error_id})", "error_id": error_id}},
        status_code=500,
        headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": API_CSP},  # past the middleware
    )


def _view_or_none(store: JobStore, job_id: str) -> dict | None:
    job = store.get(job_id)
    return job_view(job) if job else None


class RecordLatency:
    """Each request's latency by method, route and status (Prometheus). Plain ASGI rather than
    @app.middleware("http"), whose wrapped receive hides a client's disconnect from the route
    (a ?wait=true poll must see it)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            resources = getattr(scope["app"].state, "resources", None)  # None before the lifespan ran
            if resources is not None:
                path = getattr(scope.get("route"), "path", "unmatched")
                method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"  # bounded label values
                resources.metrics.request_latency.labels(method, path, str(status["code"])).observe(
                    time.perf_counter() - started
                )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if settings.webhook_secret is None and not settings.allow_unsigned:
        raise RuntimeError(
            "DPO_WEBHOOK_SECRET is not set: refusing to start (set DPO_ALLOW_UNSIGNED=1 only for local experiments)"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.webhook_secret is None:
            log.warning("!!! DPO_ALLOW_UNSIGNED=1: requests are NOT authenticated. Never expose this instance. !!!")
        if settings.dashboard_token is not None and not settings.allowed_hosts:
            log.warning(
                "DPO_ALLOWED_HOSTS is not set: the dashboard answers to any Host name (a DNS-rebinding page"
                " could reach its login); set it to the names the service is reached at"
            )
        storage = build_storage(settings)
        store = build_job_store(settings, storage.firebase)
        mirror = None
        if storage.firebase is not None and not store.shared:  # one replica: mirror jobs to dpo_jobs/{jobId}
            from storage.firebase import FirestoreJobMirror

            mirror = FirestoreJobMirror(
                storage.firebase, settings.firestore_jobs_collection, lambda job_id: _view_or_none(store, job_id)
            )
            store.add_listener(mirror.notify)
        if store.shared:  # a job may resume on another replica: its checkpoints go to Cloud Storage too
            checkpoints = SharedCheckpoints(
                settings.checkpoint_root, storage.firebase, settings.storage_retry_deadline_s
            )
        else:
            checkpoints = LocalCheckpoints(settings.checkpoint_root)
        metrics = Metrics(store)
        runner = Runner(store, settings, storage.source, storage.artifacts, checkpoints, metrics)
        app.state.resources = Resources(store, storage.source, storage.artifacts, runner, metrics)
        runner.start()
        try:
            yield
        finally:
            log.info("shutting down: stopping the runner")
            await asyncio.to_thread(runner.shutdown)
            if mirror is not None:
                await asyncio.to_thread(mirror.close)
            store.close()

    # /docs is served from this service's own copy of Swagger UI: no CDN at run time
    app = FastAPI(title="DPO fine-tuning microservice", version=__version__, lifespan=lifespan, docs_url=None)
    app.state.settings = settings
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)

    # The gate verifies signatures (and the body limit) on raw bytes before any route runs.
    app.add_middleware(
        Gate,
        secrets=settings.webhook_secrets,
        max_body_bytes=settings.max_body_bytes,
        tolerance_s=settings.signature_tolerance_s,
        remember=lambda digest, expires_at, key: app.state.resources.store.remember_signature(digest, expires_at, key),
    )

    app.add_middleware(RecordLatency)
    # outermost: a request to a Host not allowed goes no further; every answer gets the headers
    app.add_middleware(AllowedHosts, allowed=settings.allowed_hosts)
    app.add_middleware(SecurityHeaders)

    app.include_router(router)
    if settings.dashboard_token is not None:
        add_dashboard(app)
    return app


# /docs: the service's own copy of Swagger UI (no CDN at run time), under a CSP without inline
# script or style: the page loads the bundle and its start script (init.js) from /docs/assets/,
# which serves only the files it needs (not the vendor's standalone index.html, petstore and all).
DOCS_ASSETS = "/docs/assets"
DOCS_FILES = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"})
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{title}</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css">
<link rel="icon" href="{assets}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{assets}/init.js"></script>
</body>
</html>
"""
DOCS_INIT = """window.ui = SwaggerUIBundle({
  url: %s,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
"""


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    page = DOCS_PAGE.format(title=html.escape(f"{request.app.title} - API"), assets=DOCS_ASSETS)
    return HTMLResponse(page, headers={"Content-Security-Policy": DOCS_CSP})


@router.get(DOCS_ASSETS + "/{name}", include_in_schema=False)
async def docs_asset(request: Request, name: str) -> Response:
    if name == "init.js":
        return Response(DOCS_INIT % json.dumps(request.app.openapi_url), media_type="text/javascript")
    if name not in DOCS_FILES:
        raise NotFound("Not Found")
    return FileResponse(Path(swagger_ui_path) / name)


_app: FastAPI | None = None


def main(argv: list[str] | None = None) -> None:
    """`dpo-service [--host H] [--port P]`: the service under uvicorn (settings from DPO_* variables)."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(prog="dpo-service", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    uvicorn.run("webhook_handler:app", host=args.host, port=args.port)


def __getattr__(name: str):
    """`webhook_handler.app` is built from the environment on first access (what uvicorn does),
    so importing this module (tests, tools) has no side effects."""
    global _app
    if name == "app":
        if _app is None:
            try:
                settings = get_settings()
            except ValidationError as err:  # one line naming the variables, not a traceback
                raise SystemExit(settings_problem(err)) from None
            configure_logging(settings.log_format)
            _app = create_app(settings)
        return _app
    raise AttributeError(f"module 'webhook_handler' has no attribute {name!r}")
