"""The job store: what the service and the runner may ask of it, and the typed job record.

Two implementations, chosen by DPO_JOB_STORE:
- `sqlite` (core/jobs.py): one file on local disk, one replica. The embedded default.
- `firestore` (core/firestore_jobs.py): `dpo_jobs/{jobId}` documents, many replicas behind one
  load balancer. A job is created by one atomic batch; every later state change is a transaction.

Both hold jobs under a lease: the worker that claims a job is its `lease_owner` until
`lease_until`, and renews the lease while it trains. A job whose lease ran out (its worker or its
replica died) is claimed again by any worker, which resumes it from its last checkpoint. Only
the lease owner can finish or re-queue a job, so a worker that lost its lease cannot overwrite
what the new owner does.
"""

from __future__ import annotations

import json
import math
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
STATES = ACTIVE + FINAL  # a job's status is always one of these
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"  # uuid4().hex, as create() makes them
TAKEN_OVER = "taken over: its previous worker stopped renewing the lease (a crash, or its replica was lost)"
CANCELLED_QUEUED = "cancelled before it started"


def finite(value: Any) -> Any:
    """`value` with every inf or NaN float replaced by None, recursively: what the service
    stores and answers is strict JSON (Python's json writes a bare NaN that strict parsers and
    Starlette's responses refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def strict_json(value: Any) -> str:
    """JSON text of `value`, non-finite numbers as null (never a bare NaN)."""
    return json.dumps(finite(value), allow_nan=False)


@dataclass
class Job:
    """One job as the store holds it. `config` is what the trigger resolved: {"overrides", "model",
    "loss", "values", "source_options"}."""

    id: str
    community_id: str
    status: str
    created_at: float
    source: str  # 'inline' or the preference source's name
    config: dict
    started_at: float | None = None
    finished_at: float | None = None
    records: int | None = None
    callback_url: str | None = None
    progress: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    final_eval: dict = field(default_factory=dict)
    artifact_uri: str | None = None
    artifact_files: list[str] | None = None
    error_type: str | None = None
    error_message: str | None = None
    runner: str | None = None  # the path that ran it: inprocess | subprocess
    attempts: int = 0  # times it was taken over after its worker stopped renewing (a crash)
    lease_owner: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False


@dataclass
class NewJob:
    """A trigger, as the store takes it: the job to create and the rules it is created under."""

    community_id: str
    config: dict
    source: str
    dataset: list | None = None  # inline records (kept until the job ends)
    validation: list | None = None  # inline held-out records, used instead of a split of the training ones
    callback_url: str | None = None
    idempotency_key: str | None = None
    body_sha256: str | None = None  # a repeated key must come with the same body
    max_queued: int | None = None  # QueueFull when this many jobs wait
    max_queued_per_community: int | None = None  # CommunityQueueFull when this many of its jobs wait
    one_per_community: bool = False
    idempotency_ttl_s: float | None = None  # a key older than this makes a new job


def stored_data(new: NewJob) -> list | dict | None:
    """What a store keeps of a trigger's inline records (as JSON, until the job ends): the
    records alone, or with held-out records {"records", "validation"}."""
    if new.validation is None:
        return new.dataset
    return {"records": new.dataset, "validation": new.validation}


def split_stored(value: list | dict | None) -> tuple[list | None, list | None]:
    """(records, validation records) from what stored_data kept."""
    if isinstance(value, dict):
        return value.get("records"), value.get("validation")
    return value, None


@dataclass
class Renewal:
    """What a lease renewal found: whether the lease is still this worker's, and whether someone
    (through any replica) asked to cancel the job."""

    held: bool
    cancel_requested: bool = False


@dataclass
class Finish:
    """The end of a running job, written by its lease owner."""

    status: str  # one of FINAL
    error_type: str | None = None
    error_message: str | None = None
    final_eval: dict | None = None
    metrics: dict | None = None
    artifact_uri: str | None = None
    artifact_files: list[str] | None = None
    records: int | None = None
    runner: str | None = None  # the trainer path that ran: inprocess, subprocess or torchrun


def finish_event(result: Finish) -> dict:
    """The `state` event a job's end writes."""
    data: dict = {"status": result.status}
    if result.error_type:
        data["error"] = {"type": result.error_type, "message": result.error_message}
    return data


class ActiveJobConflict(Exception):
    """The community already has a queued or running job (`job_id`)."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


class IdempotencyConflict(Exception):
    """The key exists with another body; `job_id` is the job it belongs to."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


class QueueFull(Exception):
    pass


class CommunityQueueFull(Exception):
    """The community already has `NewJob.max_queued_per_community` queued jobs."""


class JobFinished(Exception):
    """A cancel of a job that already ended (`status`)."""

    def __init__(self, status: str):
        super().__init__(status)
        self.status = status


class BadCursor(Exception):
    """A list cursor this store did not hand out."""


class StoreUnavailable(Exception):
    """The store cannot be reached now (Firestore down or unreachable); nothing was changed."""


def replica_id() -> str:
    """This process's name as a lease owner: readable in the job record, unique per start."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class JobStore(Protocol):
    """The one interface the service and the runner use (both implementations pass
    tests/test_job_store.py)."""

    shared: bool  # True when several replicas use it (jobs and checkpoints must then live off-host)

    # creating and reading
    def create(self, new: NewJob) -> tuple[Job, bool]:
        """A queued job, or (for a repeated Idempotency-Key with the same body) the existing one:
        (job, created). Raises IdempotencyConflict, ActiveJobConflict, QueueFull, StoreUnavailable."""

    def get(self, job_id: str) -> Job | None: ...

    def dataset(self, job_id: str) -> list | dict | None:
        """A queued job's inline records, as stored_data kept them (removed when the job ends)."""

    def list(
        self, community_id: str | None = None, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        """Newest first, and the cursor of the next page (None on the last)."""

    def counts_by_status(self) -> dict[str, int]: ...

    # the lease
    def claim_next(self, owner: str, lease_s: float, runner: str) -> Job | None:
        """Take the job that waited longest: a running one whose lease expired (counted as an
        attempt: it was interrupted), else the oldest queued one. None when there is none."""

    def renew(self, job_id: str, owner: str, lease_s: float) -> Renewal: ...

    def release_leases(self) -> int:
        """Expire every lease now. Only for a store that is not shared, at start-up: whatever its
        previous process left running is an orphan."""

    # state changes
    def request_cancel(self, job_id: str) -> Job | None:
        """queued -> cancelled at once; running -> cancel_requested (its owner stops it at its next
        step). None if there is no such job; JobFinished if it already ended."""

    def set_progress(self, job_id: str, progress: dict, metrics: dict) -> None: ...

    def finish(self, job_id: str, owner: str, result: Finish) -> Job | None:
        """running -> final, by the lease owner only (None otherwise: the job was taken over)."""

    def requeue(self, job_id: str, owner: str, reason: str) -> bool:
        """running -> queued by its lease owner (a shutdown: the next worker resumes it)."""

    # events, callbacks, signatures, health
    def add_event(self, job_id: str, kind: str, data: dict) -> None: ...

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[dict]: ...

    def enqueue_callback(self, job_id: str, url: str, body: str) -> None: ...

    def due_callbacks(self, now: float, limit: int = 16) -> list[dict]: ...

    def record_callback_attempt(self, job_id: str, state: str, next_at: float = 0.0) -> None: ...

    def finished_without_callback(self) -> list[Job]: ...

    def remember_signature(self, digest: str, expires_at: float, idempotency_key: str = "") -> bool: ...

    def check(self) -> str | None:
        """None when the store takes writes, else what is wrong (for /ready)."""

    def add_listener(self, callback) -> None: ...

    def close(self) -> None: ...


def build_job_store(settings, firebase: Any = None) -> JobStore:
    """The store DPO_JOB_STORE names. `firebase`: the FirebaseClients of the storage backend."""
    if settings.job_store == "sqlite":
        from core.jobs import SqliteJobStore

        return SqliteJobStore(settings.job_db_path)
    if firebase is None:
        raise ValueError("DPO_JOB_STORE=firestore needs DPO_STORAGE_BACKEND=firebase (datasets and checkpoints)")
    from core.firestore_jobs import FirestoreJobStore

    return FirestoreJobStore(firebase, settings.firestore_jobs_collection)
