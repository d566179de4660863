"""Firebase backend: preference records from Firestore, artifacts to Cloud Storage, job mirror.

firebase_admin is imported lazily (first use, never at import time). With FIRESTORE_EMULATOR_HOST
or STORAGE_EMULATOR_HOST set, the clients talk to the emulators with anonymous credentials.
"""

from __future__ import annotations

import datetime as dt
import logging
import mimetypes
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from storage.base import SourceError, StorageError, StoredArtifact
from storage.manifest import MANIFEST, build_manifest

log = logging.getLogger(__name__)

RESUMABLE_THRESHOLD = 8 * 1024 * 1024  # larger files go up in resumable 8 MiB chunks
CONTENT_TYPES = {
    ".safetensors": "application/octet-stream",
    ".json": "application/json",
    ".yaml": "text/yaml",
    ".jinja": "text/plain",
    ".png": "image/png",
    ".txt": "text/plain",
    ".model": "application/octet-stream",
}


def using_emulators() -> bool:
    return bool(os.environ.get("FIRESTORE_EMULATOR_HOST") or os.environ.get("STORAGE_EMULATOR_HOST"))


class FirebaseClients:
    """One firebase_admin app, created on first use; Firestore client and bucket from it."""

    def __init__(self, project_id: str | None, bucket: str | None, credentials_path: str | None):
        self.project_id, self.bucket_name, self.credentials_path = project_id, bucket, credentials_path
        self._app = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> FirebaseClients:
        path = settings.firebase_credentials  # else Google's default chain, GOOGLE_APPLICATION_CREDENTIALS first
        return cls(settings.firebase_project_id, settings.firebase_storage_bucket, str(path) if path else None)

    def app(self):
        with self._lock:
            if self._app is None:
                import firebase_admin
                from firebase_admin import credentials

                if using_emulators():
                    credential = _AnonymousCredential()
                elif self.credentials_path:
                    credential = file_credential(self.credentials_path)
                else:  # GOOGLE_APPLICATION_CREDENTIALS (any type), gcloud's user login, workload identity
                    credential = credentials.ApplicationDefault()
                options = {k: v for k, v in (("projectId", self.project_id), ("storageBucket", self.bucket_name)) if v}
                self._app = firebase_admin.initialize_app(credential, options, name=f"dpo-{uuid.uuid4().hex[:8]}")
            return self._app

    def firestore(self):
        from firebase_admin import firestore

        return firestore.client(self.app())

    def bucket(self):
        from firebase_admin import storage

        if not self.bucket_name:
            raise StorageError("DPO_FIREBASE_STORAGE_BUCKET is not set")
        return storage.bucket(self.bucket_name, app=self.app())


def file_credential(path: str):
    """A credential file of any type Google's libraries take (google.auth's own loader): a
    service-account key, a user's `gcloud auth application-default login` file, an external
    account (workload identity federation) or an impersonated service account. firebase_admin's
    Certificate takes service-account keys only."""
    import google.auth
    from firebase_admin import credentials
    from google.auth.credentials import with_scopes_if_required

    try:  # without scopes: with them an external account would ask Google for its project here
        loaded, project = google.auth.load_credentials_from_file(path)
    except google.auth.exceptions.DefaultCredentialsError as err:
        raise StorageError(f"DPO_FIREBASE_CREDENTIALS ({path}): {err}") from None
    loaded = with_scopes_if_required(loaded, credentials._scopes)

    class FromFile(credentials.Base):
        project_id = project  # the app's project when DPO_FIREBASE_PROJECT_ID is not set

        def get_credential(self):
            return loaded

    return FromFile()


def _AnonymousCredential():  # noqa: N802 (a class made lazily so firebase_admin is not imported early)
    import google.auth.credentials
    from firebase_admin import credentials

    class Anonymous(credentials.Base):
        def get_credential(self):
            return google.auth.credentials.AnonymousCredentials()

    return Anonymous()


def _plain(value: Any) -> Any:
    """Firestore values -> JSON-safe values (timestamps become ISO strings)."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class FirestorePreferenceSource:
    """communities/{communityId}/preferences, one document per record, read a page at a time."""

    name = "firestore"

    def __init__(
        self,
        clients: FirebaseClients,
        path_template: str,
        page_size: int = 500,
        retry_deadline_s: float = 60.0,
        validation_template: str | None = None,
    ):
        self.clients, self.path_template, self.page_size = clients, path_template, page_size
        self.validation_template = validation_template  # the community's held-out records, if it keeps any
        self.retry_deadline_s = retry_deadline_s
        self.pages_read = 0  # for tests and logs: proof that reads are paginated

    def collection_path(self, community_id: str, template: str | None = None) -> str:
        return (template or self.path_template).format(communityId=community_id)

    def iter_documents(
        self,
        community_id: str,
        since: dt.datetime | None = None,
        limit: int | None = None,
        template: str | None = None,
    ) -> Iterator[tuple[str, dict]]:
        """(document id, record) pairs, streamed with cursor pagination (page_size per read), from
        the community's preferences (or the collection `template` names)."""
        from google.cloud.firestore_v1 import FieldFilter

        collection = self.clients.firestore().collection(self.collection_path(community_id, template))
        query = collection
        if since is not None:
            query = query.where(filter=FieldFilter("createdAt", ">=", since)).order_by("createdAt")
        query = query.order_by("__name__")
        last, seen = None, 0
        while limit is None or seen < limit:
            size = self.page_size if limit is None else min(self.page_size, limit - seen)
            page = query.limit(size)
            if last is not None:
                page = page.start_after(last)
            docs = list(page.stream(retry=self._retry(), timeout=30))
            self.pages_read += 1
            for doc in docs:
                yield doc.id, _plain(doc.to_dict() or {})
            seen += len(docs)
            if len(docs) < size:
                return
            last = docs[-1]

    def _retry(self):
        """Transient errors (unavailable, deadline exceeded) are retried with backoff, up to the deadline."""
        from google.api_core.retry import Retry, if_transient_error

        return Retry(
            predicate=if_transient_error, initial=0.5, maximum=5.0, multiplier=2.0, timeout=self.retry_deadline_s
        )

    def _read(
        self, community_id: str, since=None, limit: int | None = None, template: str | None = None
    ) -> tuple[list[Any], list[str]]:
        records, ids = [], []
        path = self.collection_path(community_id, template)
        try:
            for doc_id, record in self.iter_documents(community_id, since, limit, template):
                ids.append(f"{path}/{doc_id}" if template else f"document {doc_id}")
                records.append(record)
        except Exception as err:
            if isinstance(err, SourceError):
                raise
            raise SourceError(f"could not read Firestore collection {path}: {type(err).__name__}: {err}") from err
        return records, ids

    def fetch(
        self, community_id: str, since: dt.datetime | None = None, limit: int | None = None
    ) -> tuple[list[Any], list[str]]:
        records, ids = self._read(community_id, since, limit)
        if not records:
            raise SourceError(
                f"no preference records for community '{community_id}' (Firestore collection {self.collection_path(community_id)} is empty)"
            )
        return records, ids

    def validation(self, community_id: str, limit: int | None = None) -> tuple[list[Any], list[str]] | None:
        """The documents of DPO_FIRESTORE_VALIDATION_PATH for the community, or None when empty."""
        if not self.validation_template:
            return None
        records, ids = self._read(community_id, limit=limit, template=self.validation_template)
        return (records, ids) if records else None

    def check(self) -> str | None:
        try:
            list(self.clients.firestore().collection("_dpo_ready").limit(1).stream(retry=None, timeout=3))
            return None
        except Exception as err:
            return f"Firestore unreachable: {type(err).__name__}"


class FirebaseArtifactStore:
    """gs://<bucket>/policies/{communityId}/{jobId}/: files first, manifest.json last; on any
    failure, every object this save wrote is deleted again. Objects stay private (no public URLs)."""

    def __init__(self, clients: FirebaseClients, prefix_template: str, retry_deadline_s: float = 60.0):
        self.clients, self.prefix_template, self.retry_deadline_s = clients, prefix_template, retry_deadline_s

    def _retry(self):
        from google.api_core.retry import Retry
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY.with_deadline(self.retry_deadline_s) if isinstance(DEFAULT_RETRY, Retry) else DEFAULT_RETRY

    def save(self, run_dir: Path, community_id: str, job_id: str, manifest_extra: dict | None = None) -> StoredArtifact:
        import json

        prefix = self.prefix_template.format(communityId=community_id, jobId=job_id)
        written = []
        try:
            bucket = self.clients.bucket()
            manifest = build_manifest(run_dir, job_id, community_id, manifest_extra)
            retry = self._retry()
            for entry in manifest["files"]:
                path = run_dir / entry["path"]
                blob = bucket.blob(prefix + entry["path"])
                if entry["size"] > RESUMABLE_THRESHOLD:
                    blob.chunk_size = RESUMABLE_THRESHOLD  # resumable upload in chunks
                content_type = (
                    CONTENT_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                )
                written.append(blob)
                blob.upload_from_filename(str(path), content_type=content_type, retry=retry, timeout=120)
            manifest["uri"] = f"gs://{bucket.name}/{prefix}"
            blob = bucket.blob(prefix + MANIFEST)
            written.append(blob)
            blob.upload_from_string(
                json.dumps(manifest, indent=2), content_type="application/json", retry=retry, timeout=60
            )
        except Exception as err:
            self._remove(written)
            raise StorageError(f"could not store the artifact at {prefix}: {type(err).__name__}: {err}"[:1000]) from err
        return StoredArtifact(uri=manifest["uri"], files=[f["path"] for f in manifest["files"]] + [MANIFEST])

    def _remove(self, blobs) -> None:
        retry = self._retry()
        for blob in reversed(blobs):  # the manifest first, if it got written
            try:
                blob.delete(timeout=10, retry=retry)
            except Exception as err:  # already absent, or storage still down: nothing more we can do
                log.warning("could not remove %s after a failed upload: %s", blob.name, type(err).__name__)

    def check(self) -> str | None:
        try:
            exists = self.clients.bucket().exists(timeout=3, retry=None)  # a probe answers now, it does not retry
            return None if exists else f"bucket {self.clients.bucket_name} does not exist"
        except Exception as err:
            return f"Cloud Storage unreachable: {type(err).__name__}"


class FirestoreJobMirror:
    """Writes each job's record to dpo_jobs/{jobId} so the upstream app can watch it with a snapshot
    listener. Runs in its own thread. State changes are written in order, each as it was (a
    listener sees queued -> running -> succeeded); progress updates of a job coalesce into one
    write of its latest record. Failures are logged and retried with backoff, never raised."""

    def __init__(self, clients: FirebaseClients, collection: str, read_job, max_backoff_s: float = 30.0):
        self.clients, self.collection, self.read_job, self.max_backoff_s = clients, collection, read_job, max_backoff_s
        self._queue: deque = deque()  # ("state", job_id, record) | ("latest", job_id, None)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="firestore-mirror", daemon=True)
        self._thread.start()

    def notify(self, job_id: str, state_change: bool = False) -> None:
        """Called by the job store after every change to a job."""
        item = ("state", job_id, self.read_job(job_id)) if state_change else ("latest", job_id, None)
        with self._cond:
            if item[0] == "latest" and ("latest", job_id, None) in self._queue:
                return  # a write of this job's latest record is already pending
            self._queue.append(item)
            self._cond.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what is queued (bounded by timeout_s), then stop."""
        deadline = time.time() + timeout_s
        with self._cond:
            while self._queue and time.time() < deadline:
                self._cond.wait(0.1)
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(max(0.1, deadline - time.time()))

    def _loop(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                kind, job_id, record = self._queue[0]
            try:
                if kind == "latest":
                    record = self.read_job(job_id)
                if record is not None:
                    doc = self.clients.firestore().collection(self.collection).document(job_id)
                    doc.set({**record, "updatedAt": time.time()}, retry=None, timeout=10)  # this loop retries
                with self._cond:
                    self._queue.popleft()
                    self._cond.notify_all()
                backoff = 0.5
            except Exception as err:
                log.warning(
                    "job mirror write for %s failed (%s); retrying in %.1f s", job_id, type(err).__name__, backoff
                )
                with self._cond:
                    self._cond.wait(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
