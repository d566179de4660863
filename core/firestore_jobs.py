"""The shared job store: Firestore, for several replicas behind one load balancer.

Documents (the collection name is DPO_FIRESTORE_JOBS_COLLECTION, `dpo_jobs` by default):
- `dpo_jobs/{jobId}`: the job as GET /jobs/{id} shows it (what an app's snapshot listener reads),
  plus the store's own fields: `leaseOwner`, `leaseUntil`, `attempts`, `cancelRequested`,
  `eventSeq`, `callbackUrl` and the callback outbox (`callbackState`, ...).
- `dpo_jobs/{jobId}/events/{seq}`: the event log, numbered in order by a counter in the job.
- `dpo_jobs_active/{community}`: the community's active job (the one-job-per-community rule).
- `dpo_jobs_keys/{sha256(key)}`: an Idempotency-Key and the job it made.
- `dpo_jobs_signatures/{mac}`: triggers seen within the signature tolerance (replays refused);
  `expiresAt` suits a Firestore TTL policy.
- `dpo_jobs_datasets/{jobId}`: a queued inline dataset (JSON), or `datasets/{jobId}.json` in the
  bucket when it is too large for a document. Removed when the job ends.

A job is created by one batch of document creates (a document that exists fails it: the
community rule and idempotency keys); every later change of its state is one transaction that
also checks who may make it (a lease owner finishing, a cancel of a job still queued), so two
replicas can never both win. Indexes the
queries need outside the emulator: firestore.indexes.json.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from core.schemas import config_of_view, job_view
from core.store import (
    ACTIVE,
    CANCELLED_QUEUED,
    FINAL,
    TAKEN_OVER,
    ActiveJobConflict,
    BadCursor,
    CommunityQueueFull,
    Finish,
    IdempotencyConflict,
    Job,
    JobFinished,
    NewJob,
    QueueFull,
    Renewal,
    StoreUnavailable,
    finish_event,
    stored_data,
    strict_json,
)

log = logging.getLogger(__name__)
INLINE_DATASET_BYTES = 900_000  # a Firestore document holds at most 1 MiB; larger datasets go to the bucket
TIMEOUT_S = 5.0  # per call: a replica that lost Firestore answers 503 within this, it does not hang
CALLBACK_HOLD_S = 120.0  # a picked-up callback is another replica's to send only after this
TX_ATTEMPTS = 5
CONTENTION_S = 30.0  # a transaction that keeps losing to concurrent ones gives up (503) after this


def to_document(job: Job) -> dict:
    return {  # the API's view is the document's body: one shape for clients and snapshot listeners
        **job_view(job),
        "attempts": job.attempts,
        "leaseOwner": job.lease_owner,
        "leaseUntil": job.lease_until,
        "cancelRequested": job.cancel_requested,
        "callbackUrl": job.callback_url,
        "updatedAt": time.time(),
    }


def from_document(doc: dict) -> Job:
    artifact, error = doc.get("artifact") or {}, doc.get("error") or {}
    return Job(
        id=doc["job_id"],
        community_id=doc["community_id"],
        status=doc["status"],
        created_at=doc["created_at"],
        source=doc["source"],
        config=config_of_view(doc),
        started_at=doc.get("started_at"),
        finished_at=doc.get("finished_at"),
        records=doc.get("records"),
        callback_url=doc.get("callbackUrl"),
        progress=doc.get("progress") or {},
        metrics=doc.get("metrics") or {},
        final_eval=doc.get("final_eval") or {},
        artifact_uri=artifact.get("uri"),
        artifact_files=artifact.get("files") if artifact else None,
        error_type=error.get("type"),
        error_message=error.get("message"),
        runner=doc.get("runner"),
        attempts=doc.get("attempts", 0),
        lease_owner=doc.get("leaseOwner"),
        lease_until=doc.get("leaseUntil"),
        cancel_requested=bool(doc.get("cancelRequested")),
    )


def _unavailable(fn: Callable) -> Callable:
    """Firestore transport errors -> StoreUnavailable (a 503 at the API, a retry in the runner)."""

    def wrapped(*args, **kwargs):
        from google.api_core import exceptions as gexc

        try:
            return fn(*args, **kwargs)
        except (
            gexc.ServiceUnavailable,
            gexc.DeadlineExceeded,
            gexc.RetryError,
            gexc.InternalServerError,
            gexc.ResourceExhausted,
            gexc.Unknown,
            gexc.Cancelled,
        ) as err:
            raise StoreUnavailable(f"Firestore unreachable: {type(err).__name__}") from err

    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


class FirestoreJobStore:
    shared = True  # several replicas: jobs of a dead replica are taken over when their lease expires

    def __init__(self, clients, collection: str = "dpo_jobs"):
        self.clients = clients
        self.db = clients.firestore()
        self.jobs = self.db.collection(collection)
        self.active = self.db.collection(f"{collection}_active")
        self.keys = self.db.collection(f"{collection}_keys")
        self.signatures = self.db.collection(f"{collection}_signatures")
        self.datasets = self.db.collection(f"{collection}_datasets")
        self._listeners: list = []
        self._pending: dict[str, dict] = {}  # job id -> progress not yet written (sent with the next renewal)
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------
    def _run(self, body: Callable, deadline_s: float = CONTENTION_S):
        """body(transaction) in a transaction; its result. A commit that loses to a concurrent
        transaction (many triggers for one community) is retried by the library, keeping its
        place in line; after TX_ATTEMPTS such retries, again after a random pause that grows."""
        from google.api_core.exceptions import Aborted
        from google.cloud import firestore

        deadline, pause = time.monotonic() + deadline_s, 0.02
        while True:
            try:
                return firestore.transactional(body)(self.db.transaction(max_attempts=TX_ATTEMPTS))
            except (Aborted, ValueError) as err:  # ValueError: "Failed to commit transaction in N attempts"
                if isinstance(err, ValueError) and not isinstance(err.__cause__, Aborted):
                    raise
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"Firestore transaction contended for over {deadline_s:g} s") from err
                time.sleep(random.uniform(0, pause))
                pause = min(1.0, pause * 2)

    def _get(self, ref, transaction=None):
        return ref.get(transaction=transaction, timeout=TIMEOUT_S, retry=None)

    def _event(self, transaction, ref, snapshot_data: dict, kind: str, data: dict) -> dict:
        """Write an event in `transaction` (whose reads are done); returns the job fields to update."""
        seq = snapshot_data.get("eventSeq", 0) + 1
        transaction.set(ref.collection("events").document(f"{seq:012d}"), _event_doc(seq, kind, data))
        return {"eventSeq": seq}

    def add_listener(self, callback) -> None:
        self._listeners.append(callback)

    def _changed(self, job_id: str, state_change: bool = True) -> None:
        for callback in self._listeners:
            try:
                callback(job_id, state_change)
            except Exception:
                log.exception("job store listener failed for job %s", job_id)

    def close(self) -> None:
        pass

    # -- creating and reading ------------------------------------------------------------
    @_unavailable
    def create(self, new: NewJob) -> tuple[Job, bool]:
        """One atomic batch of creates: the job, its first event, its dataset, the community's
        active-job document and the key's document. Creating a document that exists fails the
        whole batch, which is how the one-job-per-community rule and idempotency keys hold
        across replicas; nothing is read under a lock, so concurrent triggers cannot deadlock
        (transactions that read then write the same document did, on the emulator, under 40
        concurrent triggers for 5 communities)."""
        key_ref = None
        if new.idempotency_key is not None:
            key_ref = self.keys.document(hashlib.sha256(new.idempotency_key.encode()).hexdigest())
            answer = self._known_key(key_ref, new, None)  # a repeated key answers its job, even when the queue is full
            if answer is not None:
                return answer
        # both counted outside the batch: across replicas the limits are approximate
        if new.max_queued_per_community is not None and (
            self._count("queued", new.community_id) >= new.max_queued_per_community
        ):
            raise CommunityQueueFull()
        if new.max_queued is not None and self._count("queued") >= new.max_queued:
            raise QueueFull()
        now = time.time()
        job = Job(
            id=uuid.uuid4().hex,
            community_id=new.community_id,
            status="queued",
            created_at=now,
            source=new.source,
            config=new.config,
            records=None if new.dataset is None else len(new.dataset),
            callback_url=new.callback_url,
        )
        ref = self.jobs.document(job.id)
        active_ref = self.active.document(_community_doc(new.community_id))
        # a large dataset goes to the bucket first: a job never exists without its data
        data = stored_data(new)
        dataset_doc = None if data is None else self._dataset_document(job.id, data)
        try:
            for _ in range(5):  # a retry only follows a document removed between our create and our read
                batch = self.db.batch()
                batch.create(ref, {**to_document(job), "eventSeq": 1})
                batch.create(
                    ref.collection("events").document(f"{1:012d}"), _event_doc(1, "state", {"status": "queued"})
                )
                if dataset_doc is not None:
                    batch.create(self.datasets.document(job.id), dataset_doc)
                if new.one_per_community:
                    batch.create(active_ref, {"jobId": job.id, "communityId": new.community_id})
                if key_ref is not None:
                    batch.create(key_ref, {"jobId": job.id, "bodySha256": new.body_sha256, "createdAt": now})
                if self._commit_creates(batch, ref):
                    self._changed(job.id)
                    return job, True
                answer = self._known_key(key_ref, new, job) if key_ref is not None else None
                if answer is not None:
                    if answer[0].id != job.id:
                        self._drop_blob(dataset_doc)
                    return answer
                if new.one_per_community:
                    active = self._get(active_ref)
                    holder_id = active.get("jobId") if active.exists else None
                    holder = self._get(self.jobs.document(holder_id)) if holder_id else None
                    if holder is not None and holder.exists and holder.get("status") in ACTIVE:
                        raise ActiveJobConflict(holder_id)
                    if holder_id:  # left by a job that ended without removing it
                        self._delete_if(active_ref, holder_id)
        except (ActiveJobConflict, IdempotencyConflict):
            self._drop_blob(dataset_doc)
            raise
        self._drop_blob(dataset_doc)
        raise StoreUnavailable("could not create the job: its documents kept changing under it")

    def _commit_creates(self, batch, job_ref) -> bool:
        """False when one of the documents already exists (nothing was written). Any other error
        may come after the batch was applied: the job's document says whether it was (if even
        that read fails, the error goes up and a large dataset's object is kept, not lost)."""
        from google.api_core.exceptions import Conflict

        try:
            batch.commit(timeout=TIMEOUT_S, retry=None)
            return True
        except Conflict:
            return False
        except Exception:
            if self._get(job_ref).exists:
                return True
            raise

    def _known_key(self, key_ref, new: NewJob, ours: Job | None) -> tuple[Job, bool] | None:
        """The answer for an Idempotency-Key already used, or None if it is free (an expired one
        is removed)."""
        known = self._get(key_ref)
        if not known.exists:
            return None
        if not self._fresh(known, new, time.time()):
            self._delete_if(key_ref, known.get("jobId"))
            return None
        if ours is not None and known.get("jobId") == ours.id:
            return ours, True
        if known.get("bodySha256") != new.body_sha256:
            raise IdempotencyConflict(known.get("jobId"))
        return self.get(known.get("jobId")), False

    def _delete_if(self, ref, job_id: str) -> None:
        """Delete a community's or a key's document if it still names `job_id`."""

        def delete(transaction):
            snapshot = self._get(ref, transaction)
            if snapshot.exists and snapshot.get("jobId") == job_id:
                transaction.delete(ref)

        self._run(delete)

    @staticmethod
    def _fresh(key_snapshot, new: NewJob, now: float) -> bool:
        return new.idempotency_ttl_s is None or key_snapshot.get("createdAt") >= now - new.idempotency_ttl_s

    @_unavailable
    def get(self, job_id: str) -> Job | None:
        snapshot = self._get(self.jobs.document(job_id))
        return from_document(snapshot.to_dict()) if snapshot.exists else None

    @_unavailable
    def dataset(self, job_id: str) -> list | dict | None:
        snapshot = self._get(self.datasets.document(job_id))
        if not snapshot.exists:
            return None
        data = snapshot.to_dict()
        if data.get("blob"):
            from google.api_core.exceptions import NotFound

            try:
                return json.loads(self.clients.bucket().blob(data["blob"]).download_as_bytes(timeout=120))
            except NotFound:
                return None
        return json.loads(data["json"])

    def _dataset_document(self, job_id: str, dataset: list | dict) -> dict:
        """The dataset document: the records as JSON, or (too large for a document) the name of
        the bucket object they were uploaded to."""
        text = json.dumps(dataset)
        if len(text.encode()) <= INLINE_DATASET_BYTES:
            return {"json": text, "createdAt": time.time()}
        name = f"datasets/{job_id}.json"
        self.clients.bucket().blob(name).upload_from_string(text, content_type="application/json", timeout=120)
        return {"blob": name, "createdAt": time.time()}

    def _drop_blob(self, dataset_doc: dict | None) -> None:
        if dataset_doc is not None and dataset_doc.get("blob"):
            try:
                self.clients.bucket().blob(dataset_doc["blob"]).delete(timeout=30)
            except Exception as err:  # never read again
                log.warning("could not remove %s: %s", dataset_doc["blob"], type(err).__name__)

    def _drop_dataset(self, job_id: str) -> None:
        try:
            snapshot = self._get(self.datasets.document(job_id))
            if snapshot.exists:
                self._drop_blob(snapshot.to_dict())
                self.datasets.document(job_id).delete(timeout=TIMEOUT_S)
        except Exception as err:  # left for a later cleanup; never read again
            log.warning("could not remove the dataset of job %s: %s", job_id, type(err).__name__)

    @_unavailable
    def list(
        self, community_id: str | None = None, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        """Newest first. The cursor is the last job's id."""
        from google.cloud import firestore
        from google.cloud.firestore_v1 import FieldFilter

        query = self.jobs
        if community_id:
            query = query.where(filter=FieldFilter("community_id", "==", community_id))
        if status:
            query = query.where(filter=FieldFilter("status", "==", status))
        query = query.order_by("created_at", direction=firestore.Query.DESCENDING).order_by(
            "__name__", direction=firestore.Query.DESCENDING
        )
        if cursor is not None:
            last = self._get(self.jobs.document(cursor)) if len(cursor) == 32 else None
            if last is None or not last.exists:
                raise BadCursor(cursor)
            query = query.start_after(last)
        docs = list(query.limit(limit + 1).stream(timeout=TIMEOUT_S, retry=None))
        more = len(docs) > limit
        docs = docs[:limit]
        return [from_document(d.to_dict()) for d in docs], (docs[-1].id if more else None)

    def _count(self, status: str, community_id: str | None = None) -> int:
        from google.cloud.firestore_v1 import FieldFilter

        query = self.jobs.where(filter=FieldFilter("status", "==", status))
        if community_id is not None:  # two equalities: served by single-field indexes, no composite one
            query = query.where(filter=FieldFilter("community_id", "==", community_id))
        return int(query.count().get(timeout=TIMEOUT_S, retry=None)[0][0].value)

    @_unavailable
    def counts_by_status(self) -> dict[str, int]:
        return {status: self._count(status) for status in (*ACTIVE, *FINAL)}

    # -- the lease -----------------------------------------------------------------------
    @_unavailable
    def claim_next(self, owner: str, lease_s: float, runner: str) -> Job | None:
        from google.cloud.firestore_v1 import FieldFilter

        now = time.time()
        # peek outside a transaction (most polls find nothing), then take the one found inside one
        expired = (
            self.jobs.where(filter=FieldFilter("status", "==", "running"))
            .where(filter=FieldFilter("leaseUntil", "<", now))
            .order_by("leaseUntil")
            .limit(1)
        )
        queued = self.jobs.where(filter=FieldFilter("status", "==", "queued")).order_by("created_at").limit(1)
        for query in (expired, queued):
            for candidate in query.stream(timeout=TIMEOUT_S, retry=None):
                job = self._take(candidate.reference, owner, lease_s, runner)
                if job is not None:
                    self._changed(job.id)
                    return job
        return None

    def _take(self, ref, owner: str, lease_s: float, runner: str) -> Job | None:
        def take(transaction):
            snapshot = self._get(ref, transaction)
            data = snapshot.to_dict() if snapshot.exists else None
            now = time.time()
            if data is None:
                return None
            if data["status"] == "running" and data.get("leaseOwner") == owner:
                return from_document(data)  # our own claim, committed by an attempt that looked failed
            taken_over = data["status"] == "running" and (data.get("leaseUntil") or 0) < now
            if data["status"] != "queued" and not taken_over:
                return None  # another worker took it first
            event = {"status": "running", "owner": owner}
            if taken_over:
                event["reason"] = TAKEN_OVER
            update = {
                "status": "running",
                "started_at": data.get("started_at") or now,
                "runner": runner,
                "leaseOwner": owner,
                "leaseUntil": now + lease_s,
                "attempts": data.get("attempts", 0) + (1 if taken_over else 0),
                "updatedAt": now,
                **self._event(transaction, ref, data, "state", event),
            }
            transaction.update(ref, update)
            return from_document({**data, **update})

        return self._run(take)

    @_unavailable
    def renew(self, job_id: str, owner: str, lease_s: float) -> Renewal:
        ref = self.jobs.document(job_id)
        self._get(ref)  # fails fast when Firestore is unreachable: the keeper's other jobs do not wait
        with self._lock:
            pending = self._pending.pop(job_id, None)

        def renew(transaction):
            snapshot = self._get(ref, transaction)
            if not snapshot.exists or snapshot.get("status") != "running" or snapshot.get("leaseOwner") != owner:
                return Renewal(held=False)
            update = {"leaseUntil": time.time() + lease_s, "updatedAt": time.time(), **(pending or {})}
            transaction.update(ref, update)
            return Renewal(held=True, cancel_requested=bool(snapshot.get("cancelRequested")))

        try:
            renewal = self._run(renew, deadline_s=lease_s / 3)  # a slow renewal must not outlast the lease
        except BaseException:
            if pending is not None:
                with self._lock:
                    self._pending.setdefault(job_id, pending)  # sent with the next renewal
            raise
        if pending is not None:
            self._changed(job_id, state_change=False)
        return renewal

    # -- state changes -------------------------------------------------------------------
    @_unavailable
    def request_cancel(self, job_id: str) -> Job | None:
        ref = self.jobs.document(job_id)
        if not self._get(ref).exists:  # fails fast when Firestore is unreachable
            return None

        def cancel(transaction):
            snapshot = self._get(ref, transaction)
            if not snapshot.exists:
                return None
            data = snapshot.to_dict()
            active_ref = self.active.document(_community_doc(data["community_id"]))
            active = self._get(active_ref, transaction)
            if data["status"] in FINAL:
                raise JobFinished(data["status"])
            if data["status"] == "queued":
                update = {
                    "status": "cancelled",
                    "finished_at": time.time(),
                    "error": {"type": "cancelled", "message": CANCELLED_QUEUED},
                    **self._event(transaction, ref, data, "state", {"status": "cancelled"}),
                }
                if active.exists and active.get("jobId") == job_id:
                    transaction.delete(active_ref)
                update.update(_callback_fields(data, update))
            elif not data.get("cancelRequested"):
                update = {"cancelRequested": True, **self._event(transaction, ref, data, "cancel_requested", {})}
            else:
                return from_document(data), False
            update["updatedAt"] = time.time()
            transaction.update(ref, update)
            return from_document({**data, **update}), update.get("status") == "cancelled"

        result = self._run(cancel)
        if result is None:
            return None
        job, ended = result
        if ended:
            self._drop_dataset(job_id)
        self._changed(job_id, state_change=ended)
        return job

    def set_progress(self, job_id: str, progress: dict, metrics: dict) -> None:
        """Kept here and written with the next lease renewal (at most one write per renewal:
        Firestore sustains about one write a second per document)."""
        with self._lock:
            self._pending[job_id] = {"progress": progress, "metrics": metrics}

    @_unavailable
    def finish(self, job_id: str, owner: str, result: Finish) -> Job | None:
        assert result.status in FINAL
        ref = self.jobs.document(job_id)
        with self._lock:
            pending = self._pending.pop(job_id, None) or {}  # the last steps' progress goes with the end

        def finish(transaction):
            snapshot = self._get(ref, transaction)
            data = snapshot.to_dict() if snapshot.exists else None
            if data is not None and data["status"] in FINAL and data.get("finishedBy") == owner:
                return from_document(data)  # ours, committed by an attempt that looked failed
            if data is None or data["status"] != "running" or data.get("leaseOwner") != owner:
                return None
            active_ref = self.active.document(_community_doc(data["community_id"]))
            active = self._get(active_ref, transaction)
            update: dict[str, Any] = {
                "finishedBy": owner,
                **pending,
                "status": result.status,
                "finished_at": time.time(),
                "leaseOwner": None,
                "leaseUntil": None,
                "error": {"type": result.error_type, "message": result.error_message or ""}
                if result.error_type
                else None,
                **self._event(transaction, ref, data, "state", finish_event(result)),
            }
            for name in ("final_eval", "metrics", "records", "runner"):
                if getattr(result, name) is not None:
                    update[name] = getattr(result, name)
            if result.artifact_uri is not None:
                update["artifact"] = {"uri": result.artifact_uri, "files": result.artifact_files or []}
            if active.exists and active.get("jobId") == job_id:
                transaction.delete(active_ref)
            update["updatedAt"] = time.time()
            update.update(_callback_fields(data, update))
            transaction.update(ref, update)
            return from_document({**data, **update})

        job = self._run(finish)
        if job is not None:
            self._drop_dataset(job_id)
            self._changed(job_id)
        return job

    @_unavailable
    def requeue(self, job_id: str, owner: str, reason: str) -> bool:
        ref = self.jobs.document(job_id)
        with self._lock:
            self._pending.pop(job_id, None)  # its next run reports its own progress

        def requeue(transaction):
            snapshot = self._get(ref, transaction)
            data = snapshot.to_dict() if snapshot.exists else None
            if data is None or data["status"] != "running" or data.get("leaseOwner") != owner:
                return False
            event = {"status": "queued", "reason": reason}
            update = {"status": "queued", "leaseOwner": None, "leaseUntil": None, "updatedAt": time.time()}
            transaction.update(ref, {**update, **self._event(transaction, ref, data, "state", event)})
            return True

        done = self._run(requeue)
        if done:
            self._changed(job_id)
        return done

    # -- events --------------------------------------------------------------------------
    @_unavailable
    def add_event(self, job_id: str, kind: str, data: dict) -> None:
        ref = self.jobs.document(job_id)
        if not self._get(ref).exists:  # also fails fast when Firestore is unreachable (a transaction waits a minute)
            return

        def add(transaction):
            snapshot = self._get(ref, transaction)
            if snapshot.exists:
                transaction.update(ref, self._event(transaction, ref, snapshot.to_dict(), kind, data))

        self._run(add)

    @_unavailable
    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[dict]:
        from google.cloud.firestore_v1 import FieldFilter

        query = (
            self.jobs.document(job_id)
            .collection("events")
            .where(filter=FieldFilter("seq", ">", after))
            .order_by("seq")
            .limit(limit)
        )
        return [{**d.to_dict(), "data": json.loads(d.get("data"))} for d in query.stream(timeout=TIMEOUT_S, retry=None)]

    # -- the callback outbox (fields of the job document) ------------------------------------
    def enqueue_callback(self, job_id: str, url: str, body: str) -> None:
        """Nothing to do: a job's end (finish, or a cancel while queued) queues its callback in
        the same transaction."""

    @_unavailable
    def due_callbacks(self, now: float, limit: int = 16) -> list[dict]:
        """Due deliveries, held for this replica for CALLBACK_HOLD_S (so two replicas do not both
        send one); at most 4 at a time, so the hold outlasts their delivery attempts."""
        limit = min(limit, 4)
        from google.cloud.firestore_v1 import FieldFilter

        query = (
            self.jobs.where(filter=FieldFilter("callbackState", "==", "pending"))
            .where(filter=FieldFilter("callbackNextAt", "<=", now))
            .order_by("callbackNextAt")
            .limit(limit)
        )
        due = []
        for candidate in query.stream(timeout=TIMEOUT_S, retry=None):

            def hold(transaction, ref=candidate.reference):
                snapshot = self._get(ref, transaction)
                data = snapshot.to_dict()
                if data.get("callbackState") != "pending" or data.get("callbackNextAt", 0) > now:
                    return None
                transaction.update(ref, {"callbackNextAt": now + CALLBACK_HOLD_S})
                return {
                    "job_id": ref.id,
                    "url": data["callbackUrl"],
                    "body": data["callbackBody"],
                    "attempts": data.get("callbackAttempts", 0),
                }

            item = self._run(hold)
            if item is not None:
                due.append(item)
        return due

    @_unavailable
    def record_callback_attempt(self, job_id: str, state: str, next_at: float = 0.0) -> None:
        from google.cloud import firestore

        self.jobs.document(job_id).update(
            {"callbackAttempts": firestore.Increment(1), "callbackState": state, "callbackNextAt": next_at},
            timeout=TIMEOUT_S,
        )

    @_unavailable
    def finished_without_callback(self) -> list[Job]:
        """None: a job's end and its callback are one transaction here."""
        return []

    # -- signatures and health -------------------------------------------------------------
    @_unavailable
    def remember_signature(self, digest: str, expires_at: float, idempotency_key: str = "") -> bool:
        """The first store call of every trigger, so one plain create: it fails within TIMEOUT_S
        when Firestore is unreachable (a transaction's begin retries for a minute), and only a
        signature seen before costs a second call."""
        from google.api_core.exceptions import Conflict

        ref = self.signatures.document(digest)  # the request's SHA-256, whichever secrets signed it
        fields = {"expiresAt": dt.datetime.fromtimestamp(expires_at, tz=dt.UTC), "idemKey": idempotency_key}
        try:
            ref.create(fields, timeout=TIMEOUT_S, retry=None)  # expiresAt, a Timestamp, suits a TTL policy
            return True
        except Conflict:
            pass

        def remember(transaction):
            snapshot = self._get(ref, transaction)
            if snapshot.exists and snapshot.get("expiresAt").timestamp() >= time.time():
                return bool(idempotency_key) and snapshot.get("idemKey") == idempotency_key
            transaction.set(ref, fields)  # an expired one (no TTL policy deleted it yet)
            return True

        return self._run(remember)

    def check(self) -> str | None:
        try:
            self.jobs.document("_ready").get(timeout=3, retry=None)
            return None
        except Exception as err:
            return f"Firestore unreachable: {type(err).__name__}"


def _callback_fields(data: dict, update: dict) -> dict:
    """A job's end queues its callback in the same transaction (no gap a crash could fall into)."""
    if not data.get("callbackUrl"):
        return {}
    body = strict_json(job_view(from_document({**data, **update})))
    return {"callbackState": "pending", "callbackBody": body, "callbackAttempts": 0, "callbackNextAt": 0.0}


def _event_doc(seq: int, kind: str, data: dict) -> dict:
    # data as JSON text: Firestore would reorder keys and turn tuples into lists
    return {"seq": seq, "ts": time.time(), "kind": kind, "data": strict_json(data)}


def _community_doc(community_id: str) -> str:
    """A document id for a community id (ids like `__x__` are reserved by Firestore)."""
    return hashlib.sha256(community_id.encode()).hexdigest()[:40]
