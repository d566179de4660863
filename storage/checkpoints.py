"""Where a job's training checkpoint lives between steps, and where the next worker finds it.

The trainer always writes its checkpoint to a local directory (training/checkpoint.py). With the
sqlite job store (one replica) that directory is the checkpoint. With a shared job store the
job may resume on another replica, so each checkpoint is also copied to Cloud Storage
(`checkpoints/{jobId}/`) and fetched from there when a job starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from training.checkpoint_files import ID, NAME, STATE

log = logging.getLogger(__name__)
STATE_FILE = Path(NAME) / STATE  # inside a job's checkpoint directory


class LocalCheckpoints:
    """Checkpoints on this machine's disk only (one replica)."""

    def __init__(self, root: Path):
        self.root = root

    def directory(self, job_id: str) -> Path:
        """The directory the trainer writes to and resumes from (train.checkpoint_dir)."""
        return self.root / job_id

    def publish(self, job_id: str, step: int) -> None:
        """Make the checkpoint just written available to whoever runs the job next."""

    def fetch(self, job_id: str) -> bool:
        """Put the job's latest checkpoint in directory(job_id); True if there is one."""
        return (self.directory(job_id) / STATE_FILE).exists()

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.directory(job_id), ignore_errors=True)


class SharedCheckpoints(LocalCheckpoints):
    """Each checkpoint copied to gs://bucket/checkpoints/{jobId}/: its files (the run state and
    the DCP shards) under its step first, then `latest.json` naming them (a reader never sees a
    half-written checkpoint), then the older steps removed. Removed when the job ends."""

    PREFIX = "checkpoints/{jobId}/"
    MARKER = "latest.json"

    def __init__(self, root: Path, clients, retry_deadline_s: float = 60.0):
        super().__init__(root)
        self.clients, self.retry_deadline_s = clients, retry_deadline_s

    def _retry(self):
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY.with_deadline(self.retry_deadline_s)

    def publish(self, job_id: str, step: int) -> None:
        prefix = self.PREFIX.format(jobId=job_id)
        step_prefix = f"{prefix}step-{step:09d}/"
        local = self.directory(job_id) / STATE_FILE.parent
        bucket, retry = self.clients.bucket(), self._retry()
        with contextlib.ExitStack() as opened:
            try:
                # A trainer subprocess replaces its checkpoint by renaming a new directory into
                # place. Every file is opened first (an open file is read whole, even once the
                # directory is replaced and removed); the checkpoint's id unchanged after that
                # means they all belong to one checkpoint. Otherwise the newer one comes next.
                checkpoint_id = (local / ID).read_text()
                files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
                handles = {name: opened.enter_context(open(local / name, "rb")) for name in files}
                if (local / ID).read_text() != checkpoint_id:
                    return
            except FileNotFoundError:  # replaced by a newer one between the event and here
                return
            for name, fh in handles.items():
                blob = bucket.blob(step_prefix + name)
                blob.chunk_size = 8 * 1024 * 1024
                blob.upload_from_file(fh, size=os.fstat(fh.fileno()).st_size, retry=retry, timeout=300)
        marker = json.dumps({"step": step, "prefix": step_prefix, "files": files})
        bucket.blob(prefix + self.MARKER).upload_from_string(marker, content_type="application/json", retry=retry)
        for old in bucket.list_blobs(prefix=prefix + "step-", retry=retry):
            if not old.name.startswith(step_prefix):
                old.delete(retry=retry)

    def fetch(self, job_id: str) -> bool:
        from google.api_core.exceptions import NotFound

        prefix = self.PREFIX.format(jobId=job_id)
        bucket, retry = self.clients.bucket(), self._retry()
        try:
            marker = json.loads(bucket.blob(prefix + self.MARKER).download_as_bytes(retry=retry))
        except NotFound:
            return super().fetch(job_id)  # never published: a local one (this replica's own) if any
        target = self.directory(job_id) / STATE_FILE.parent
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            for name in marker["files"]:
                (partial / name).parent.mkdir(parents=True, exist_ok=True)
                bucket.blob(marker["prefix"] + name).download_to_filename(str(partial / name), retry=retry)
        except NotFound:  # removed by a late publisher that had lost the job (see D29): no copy to resume
            shutil.rmtree(partial, ignore_errors=True)
            log.warning("job %s: the checkpoint of step %s named by %s is gone", job_id, marker["step"], self.MARKER)
            return super().fetch(job_id)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        log.info("job %s: checkpoint of step %s fetched (%d files)", job_id, marker["step"], len(marker["files"]))
        return True

    def remove(self, job_id: str) -> None:
        super().remove(job_id)
        try:
            bucket, retry = self.clients.bucket(), self._retry()
            for blob in bucket.list_blobs(prefix=self.PREFIX.format(jobId=job_id), retry=retry):
                blob.delete(retry=retry)
        except Exception as err:  # storage down: the objects stay; they are never read again
            log.warning("could not remove the checkpoints of job %s: %s", job_id, type(err).__name__)
