"""The job runner: worker threads take queued jobs and train them, never on the event loop.

In-process first (the training facade called in the worker thread); when that path cannot run
(the trainer fails to import or initialise, or DPO_RUNNER_MODE=subprocess) the job runs as
`python -m training` in a subprocess with the same resolved config, progress coming back as JSON
lines. Bad data is never retried. Each job has its own working directory, removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from omegaconf import OmegaConf

from core.callbacks import CallbackSender
from core.errors import JOB_FINISHED, JOB_NOT_FOUND, Conflict, NotFound
from core.gpus import RANK_ERROR, GpuPool, gpu_ids, inprocess_device, process_tree, torchrun_failure
from core.logs import job_context
from core.progress import ProgressRecorder, outcome
from core.schemas import job_view
from core.store import Finish, Job, JobFinished, StoreUnavailable, replica_id, split_stored, strict_json
from storage.base import SourceError, StorageError
from training import protocol
from training.config import REPO_ROOT, compose_config, literal
from training.errors import NonFiniteError
from training.records import RecordError, normalise_records, write_jsonl

log = logging.getLogger(__name__)
STARTUP_ALLOWANCE_S = 120  # a trainer subprocess's first line may take this long (imports, model load)
EXITED_GRACE_S = 5  # a trainer that exited but whose pipe stays open (a leftover child) is ended after this
MAX_ATTEMPTS = 3  # take-overs after a crash before a job is failed 'interrupted' (with a checkpoint)
SHUTDOWN_REQUEUE = "stopped by a server shutdown; resumes from its checkpoint on the next worker"
STILL_STOPPING = "claimed while this replica's earlier run of it was still stopping; queued again"
HELDOUT_REGRESSED = (
    "held-out metrics got worse during training (higher loss or lower reward margin than the initial"
    " model): the data may be inconsistent, or the learning rate too high; final_eval has eval/regressed"
)


class Stopped(Exception):
    """The job was asked to stop (cancel, shutdown or timeout) at a step boundary."""


class SubprocessDataError(Exception):
    """The training subprocess refused the data (its message names the record)."""


class Interrupted(Exception):
    """The job's earlier runs were interrupted too often to try again."""


class RankLost(Exception):
    """A rank of a multi-GPU job was killed (a lost GPU, the OOM killer): handled as a crash of
    the replica, the job is taken over from its checkpoint once its lease lapses."""


class InProcessUnavailable(Exception):
    """The in-process trainer cannot run here; the subprocess path should take the job."""


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the trainer's process group (started with start_new_session) and to every
    process it started in a group of its own (torchrun's ranks), if still there."""
    if proc.poll() is None:
        tree = process_tree(proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in tree[1:]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def load_inprocess_trainer():
    """Import the facade lazily: an import or initialisation failure routes jobs to the subprocess."""
    try:
        from training.facade import run_training
        from training.loop import TrainingCancelled
    except Exception as err:  # ImportError, OSError from a broken native library, ...
        raise InProcessUnavailable(f"{type(err).__name__}: {err}") from err
    return run_training, TrainingCancelled


class Runner:
    """The workers of one replica. Each job it runs is held under a lease in the job store
    (core/store.py), renewed by a keeper thread that also brings cancels made on other replicas."""

    def __init__(self, store, settings, source, artifacts, checkpoints, metrics=None):
        self.store, self.settings, self.source, self.artifacts, self.metrics = (
            store,
            settings,
            source,
            artifacts,
            metrics,
        )
        self.checkpoints = checkpoints  # storage/checkpoints.py: local, or shared through Cloud Storage
        self.mode = settings.runner_mode  # auto | inprocess | subprocess
        self.owner = replica_id()  # this replica's name; each claim adds its own suffix (the lease token)
        self.lease_s = settings.job_lease_s
        self.gpus = GpuPool(gpu_ids(settings.gpus))  # worker slots share them without overlap
        self._leases: dict[str, str] = {}  # job id -> the lease token this replica holds it under
        self._renewed: dict[str, float] = {}  # job id -> monotonic time of its last successful renewal
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._keeper_done = threading.Event()
        # job id -> "cancel" | "shutdown" | "timeout" | "stalled" | "lease_lost"
        self._stop_requests: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._started: dict[str, float] = {}  # job id -> monotonic start, for the wall-clock timeout
        self._heard: dict[str, float] = {}  # job id -> monotonic time of the trainer subprocess's last line
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        secret = settings.callback_secret.get_secret_value() if settings.callback_secret else None
        self.callbacks = CallbackSender(store, secret, settings.callback_retries, settings.callback_timeout_s)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.settings.work_root.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(self.settings.work_root):  # leftovers of a crash
            shutil.rmtree(self.settings.work_root / name, ignore_errors=True)
        if not self.store.shared:  # one replica: what its previous process left running is an orphan now
            released = self.store.release_leases()
            if released:
                log.warning("%d job(s) were left running by a previous server: they resume or restart", released)
        try:
            for job in self.store.finished_without_callback():  # a crash came between finishing and queueing it
                self.store.enqueue_callback(job.id, job.callback_url, strict_json(job_view(job)))
        except Exception as err:  # the store is down at start-up: serve anyway (/ready says so)
            log.warning("could not look for callbacks left unqueued: %s", err)
        self.callbacks.start()
        for i in range(self.settings.max_concurrent_jobs):
            thread = threading.Thread(target=self._worker, name=f"dpo-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._keeper = threading.Thread(target=self._keep_leases, name="dpo-lease-keeper", daemon=True)
        self._keeper.start()

    def _keep_leases(self) -> None:
        """Renew the lease of every job this replica runs, several times per lease. A cancel
        asked through any replica stops the job at its next step. A lease lost (taken over) or
        not renewed for a whole lease length (the store unreachable: another replica may have
        taken the job by now) stops it too, and this replica drops its run."""
        tick = max(0.2, min(2.0, self.lease_s / 6))
        while not self._keeper_done.wait(tick):
            limit, now = self.settings.job_timeout_s, time.monotonic()
            with self._lock:
                held = dict(self._leases)
                ages = {job_id: now - started for job_id, started in self._started.items()}
            for job_id, age in ages.items():  # a run checks its limit at step boundaries; a hung one never does
                if age > limit:
                    self._stop(job_id, "timeout")
                if age > limit + 2 * self.lease_s:
                    held.pop(job_id, None)  # still there: let the lease lapse, so another worker takes the job
            for job_id, token in held.items():
                try:
                    renewal = self.store.renew(job_id, token, self.lease_s)
                except Exception as err:  # unreachable: keep training while the lease may still be ours
                    log.warning("could not renew the lease of job %s: %s", job_id, err, extra={"job_id": job_id})
                    renewal = None
                with self._lock:
                    if self._leases.get(job_id) != token:
                        continue  # the run ended meanwhile
                    now = time.monotonic()
                    if renewal is not None and renewal.held:
                        self._renewed[job_id] = now
                        if renewal.cancel_requested:
                            self._stop_requests.setdefault(job_id, "cancel")
                    elif renewal is not None or now - self._renewed.get(job_id, now) > self.lease_s:
                        self._stop_requests.setdefault(job_id, "lease_lost")

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def notify(self) -> None:
        self._wake.set()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop taking jobs; running jobs stop at their next step boundary, checkpoint and re-queue."""
        self._stopping.set()
        with self._lock:
            for job_id in self._started:  # the jobs this runner is running (a cancel already asked keeps its reason)
                self._stop_requests.setdefault(job_id, "shutdown")
            procs = list(self._procs.values())
        for proc in procs:
            signal_group(proc, signal.SIGTERM)  # the trainer checkpoints at its next step boundary
        self._wake.set()
        deadline = time.time() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.time()))
        with self._lock:  # including one started after the snapshot above
            procs = list(self._procs.values())
        for proc in procs:  # never leave a trainer behind
            signal_group(proc, signal.SIGKILL)
        with self._lock:  # still held after the join: hand them back now rather than after a lease
            held = dict(self._leases)
        for job_id, token in held.items():
            with contextlib.suppress(Exception):
                if self.store.requeue(job_id, token, SHUTDOWN_REQUEUE):
                    with self._lock:  # the run, if it still goes on, no longer owns the job
                        self._stop_requests[job_id] = "lease_lost"
        self._keeper_done.set()
        self.callbacks.stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- cancel --------------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job:
        """A queued job ends now; a running one stops at its next step, wherever it runs (this
        replica at once, another one at its next lease renewal)."""
        try:
            job = self.store.request_cancel(job_id)
        except JobFinished as err:
            raise Conflict(JOB_FINISHED.format(status=err.status)) from None
        if job is None:
            raise NotFound(JOB_NOT_FOUND)
        if job.status == "cancelled":
            self.checkpoints.remove(job_id)  # one left by a shutdown, if any
        self._stop(job_id, "cancel")  # this replica at once; another at its next lease renewal
        return job

    def _stop(self, job_id: str, reason: str) -> None:
        """Ask a job this replica runs to stop (no-op for one it does not run)."""
        with self._lock:
            if job_id in self._leases:
                self._stop_requests.setdefault(job_id, reason)

    def _should_stop(self, job_id: str) -> bool:
        """Checked at every step boundary (and by the subprocess watcher): a cancel, a shutdown,
        the job's time limit. Takes the lock itself: never call it holding the lock."""
        started = self._started.get(job_id)
        if started is not None and time.monotonic() - started > self.settings.job_timeout_s:
            with self._lock:
                self._stop_requests.setdefault(job_id, "timeout")
        return job_id in self._stop_requests

    def stuck_jobs(self) -> list[str]:
        """Subprocess jobs whose trainer has been silent for over half of DPO_JOB_STALL_S: /ready
        reports them from then on, before the watcher stops them at the full limit (a warning
        that lasts long enough to be seen, not only in the instant before the stop)."""
        now, limit = time.monotonic(), self.settings.job_stall_s / 2
        with self._lock:
            return sorted(job_id for job_id, heard in self._heard.items() if now - heard > limit)

    # -- the worker ----------------------------------------------------------------------
    def _worker(self) -> None:
        while not self._stopping.is_set():
            token = f"{self.owner}:{uuid.uuid4().hex[:6]}"  # this claim's lease: no other run can renew it
            try:
                job = self.store.claim_next(token, self.lease_s, runner=self.mode)
            except Exception as err:  # the store is unreachable: keep the worker alive and retry
                log.warning("could not claim a job: %s", err)
                job = None
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                with job_context(job.id, job.community_id):  # its log records carry both (core/logs.py)
                    self._run(job, token)
            except Exception:  # whatever went wrong, the worker lives on; the job's lease lapses
                log.exception("job %s: the worker's run ended unexpectedly", job.id)

    def _run(self, job: Job, token: str) -> None:
        job_id = job.id
        with self._lock:
            duplicate = job_id in self._leases  # our own earlier run of it lost its lease and still winds down
            if duplicate:
                self._stop_requests.setdefault(job_id, "lease_lost")
            else:
                self._leases[job_id], self._renewed[job_id] = token, time.monotonic()  # the keeper renews it
                self._started[job_id] = time.monotonic()
        if duplicate:
            self._retry_store(lambda: self.store.requeue(job_id, token, STILL_STOPPING))
            self._wake.wait(timeout=1.0)  # the earlier run needs a moment to stop; do not claim it straight back
            return
        started = time.time()
        reason = None
        log.info("job %s: started (attempt %d, lease %s)", job_id, job.attempts + 1, token)
        try:
            if self._stopping.is_set():  # claimed just as a shutdown began
                self._retry_store(lambda: self.store.requeue(job_id, token, SHUTDOWN_REQUEUE))
                return
            work = self.settings.work_root / job_id
            try:
                work.mkdir(parents=True, exist_ok=True)
                result = self._execute(job, work)
            except Stopped:
                reason = self._stop_requests.get(job_id)
                result = self._stopped(reason)
            except StoreUnavailable as err:  # not the job's fault: leave it to whoever takes it next
                log.warning("job %s: the job store is unreachable (%s); its lease will lapse", job_id, err)
                reason, result = "store_unavailable", None
            except RankLost as err:  # as if this replica had crashed: taken over from the checkpoint
                log.warning("job %s: %s; it resumes from its checkpoint once its lease lapses", job_id, err)
                self._note(job_id, "warning", {"message": f"{err}; the job resumes from its last checkpoint"})
                reason, result = "rank_lost", None
            except Interrupted as err:
                result = Finish("failed", error_type="interrupted", error_message=str(err))
            except SourceError as err:
                result = Finish("failed", error_type="source_error", error_message=str(err))
            except (RecordError, SubprocessDataError) as err:
                result = Finish("failed", error_type="invalid_data", error_message=str(err))
            except StorageError as err:
                result = Finish("failed", error_type="storage_error", error_message=str(err))
            except NonFiniteError as err:
                result = Finish("failed", error_type=NonFiniteError.type, error_message=str(err))
            except Exception as err:
                log.exception("job %s failed", job_id)
                message = f"{type(err).__name__}: {err}"[:2000]
                result = Finish("failed", error_type="training_error", error_message=message)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            self._record(job, token, result, reason, started)
        finally:
            self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            for table in (self._leases, self._renewed, self._stop_requests, self._procs, self._started, self._heard):
                table.pop(job_id, None)  # the keeper stops renewing it

    def _stopped(self, reason: str | None) -> Finish | None:
        """How a job stopped at a step boundary ends; None: it is not ours to end (a shutdown
        re-queues it, a lost lease means another worker runs it now)."""
        if reason == "cancel":
            return Finish("cancelled", error_type="cancelled", error_message="cancelled while running")
        if reason == "timeout":
            limit = self.settings.job_timeout_s
            message = f"ran longer than DPO_JOB_TIMEOUT_S ({limit:g} s); training stopped"
            return Finish("failed", error_type="timeout", error_message=message)
        if reason == "stalled":
            limit = self.settings.job_stall_s
            message = f"the trainer printed nothing for DPO_JOB_STALL_S ({limit:g} s); it was stopped"
            return Finish("failed", error_type="stalled", error_message=message)
        return None

    def _record(self, job: Job, token: str, result: Finish | None, reason: str | None, started: float) -> None:
        """Write the job's end (or its return to the queue) to the store, then its callback."""
        job_id = job.id
        if result is None and reason in ("lease_lost", "store_unavailable", "rank_lost"):
            # another worker has the job, or will once the lease lapses; the checkpoint stays for it
            log.warning("job %s: this run is dropped (%s); the job goes on elsewhere", job_id, reason)
            return
        if result is None:  # shutdown: the checkpoint just written lets the next worker resume it
            self._retry_store(lambda: self.store.requeue(job_id, token, SHUTDOWN_REQUEUE))
            return
        final = self._retry_store(lambda: self.store.finish(job_id, token, result))
        if final is None:
            log.warning(
                "job %s ended (%s) but was not recorded: its lease had passed to another worker", job_id, result.status
            )
            return
        log.info("job %s: %s after %.1f s", job_id, result.status, time.time() - started)
        self.checkpoints.remove(job_id)
        if self.metrics is not None:
            self.metrics.job_duration.labels(result.status).observe(time.time() - started)
            self.metrics.jobs_finished.labels(result.status).inc()
        if job.callback_url:
            self._retry_store(
                lambda: self.store.enqueue_callback(job_id, job.callback_url, strict_json(job_view(final)))
            )
            self.callbacks.notify()

    def _retry_store(self, write):
        """A store write that must not be lost to a short outage: retried with backoff for up to
        twice the lease. Past that, None: the job's lease lapses and another worker takes it."""
        deadline, delay = time.monotonic() + max(30.0, 2 * self.lease_s), 0.5
        while True:
            try:
                return write()
            except Exception as err:
                if time.monotonic() > deadline:
                    log.error("job store write given up after %.0f s: %s", max(30.0, 2 * self.lease_s), err)
                    return None
                log.warning("job store write failed (%s); retrying in %.1f s", err, delay)
                time.sleep(delay)
                delay = min(10.0, delay * 2)

    def _note(self, job_id: str, kind: str, data: dict) -> None:
        """An event that is information only: a store outage must not fail the job over it."""
        try:
            self.store.add_event(job_id, kind, data)
        except Exception as err:
            log.warning("job %s: %s event not recorded: %s", job_id, kind, err)

    def _resume_or_restart(self, job: Job) -> None:
        """Bring the job's latest checkpoint here (a shutdown or a crash may have left one, on
        any replica); after a crash, resume from it or, without one, restart once."""
        try:
            has_checkpoint = self.checkpoints.fetch(job.id)
        except Exception as err:
            raise StorageError(f"could not fetch the job's checkpoint: {type(err).__name__}: {err}"[:1000]) from err
        if not job.attempts:
            return
        if job.attempts > MAX_ATTEMPTS or (not has_checkpoint and job.attempts > 1):
            raise Interrupted(
                f"its worker stopped while it ran ({job.attempts} times: a crash or a lost replica); not retried"
            )
        reason = (
            f"resuming from its last checkpoint after an interruption (attempt {job.attempts + 1})"
            if has_checkpoint
            else "restarting from the beginning after an interruption (no checkpoint)"
        )
        log.warning("job %s: %s", job.id, reason)
        self._note(job.id, "state", {"status": "running", "reason": reason})

    def _execute(self, job: Job, work: Path) -> Finish:
        job_id, community = job.id, job.community_id
        self._resume_or_restart(job)
        # inline records and held-out ones are kept in the store (StoreUnavailable: left to
        # whoever takes the job next)
        stored = self.store.dataset(job_id) if job.source == "inline" or job.config.get("validation_records") else None
        inline, validation = split_stored(stored)
        if job.config.get("validation_records") and validation is None:
            raise StorageError("the job's validation records are missing from the job store")
        if job.source == "inline":
            records, ids = inline, None
            if records is None:
                raise StorageError("the job's inline dataset is missing from the job store")
        else:
            options = job.config.get("source_options") or {}
            since = datetime.fromisoformat(options["since"]) if options.get("since") else None
            if since is not None and since.tzinfo is None:
                since = since.replace(tzinfo=UTC)  # a naive time means UTC
            # read at most one record past the limit: enough to know it is exceeded
            cap = self.settings.max_records + 1
            limit = min(options["limit"], cap) if options.get("limit") else cap
            records, ids = self.source.fetch(community, since=since, limit=limit)
            if validation is None:  # the community's own held-out set, when its source keeps one
                validation = self._source_validation(community, cap)
        pairs = self._checked(records, ids)
        data = {"records": len(records), "pairs": len(pairs)}
        self._note(job_id, "data", data if validation is None else {**data, "validation_records": len(validation)})
        resolved = job.config  # model, loss and values resolved at the trigger
        values = {
            **resolved.get("values", {}),
            "train.checkpoint_dir": str(self.checkpoints.directory(job_id)),  # resumes from it when one is there
            "train.checkpoint_every": self.settings.checkpoint_every,
        }
        cfg = compose_config(resolved.get("model") or "tiny", resolved.get("loss") or "dpo", values)
        wanted = resolved.get("gpus") or 1
        if len(self.gpus.free()) < wanted:
            self._note(job_id, "gpus", {"waiting_for": wanted, "free": len(self.gpus.free())})
        held = self.gpus.acquire(wanted, lambda: self._should_stop(job_id))  # [] on a host without GPUs
        if held is None:
            raise Stopped()
        try:
            if held:
                self._note(job_id, "gpus", {"gpus": held})
            result = self._train(job_id, cfg, records, ids, validation, work, held)
        finally:
            self.gpus.release(held or [])

        if self._should_stop(job_id):
            raise Stopped()
        with self._lock:
            token = self._leases[job_id]
        renewal = self._retry_store(lambda: self.store.renew(job_id, token, self.lease_s))
        if renewal is None or not renewal.held:  # one artifact per job: its lease owner's
            self._stop(job_id, "lease_lost")
            raise Stopped()
        final_eval = result.get("final_eval", {})
        if final_eval.get("eval/regressed"):
            self._note(job_id, "warning", {"message": HELDOUT_REGRESSED})
        stored = self.artifacts.save(work / "output", community, job_id, manifest_extra={"final_eval": final_eval})
        return Finish(
            "succeeded",
            final_eval=final_eval,
            artifact_uri=stored.uri,
            artifact_files=stored.files,
            records=len(records),
            metrics={**result["final_train"], "trained_tokens": result["trained_tokens"]},
            runner=result["runner"],
        )

    def _source_validation(self, community: str, cap: int) -> list | None:
        """The source's held-out records for the community (a local `<id>.validation.jsonl`, the
        Firestore validation collection), checked like the training records; None without any."""
        found = self.source.validation(community, limit=cap)
        if found is None:
            return None
        records, ids = found
        self._checked(records, ids, "validation: ")
        return records

    def _checked(self, records: list, ids: list[str] | None, what: str = "") -> list:
        """The records' pairs; bad data fails here, in either trainer path, naming the record (or
        document), and so does a set over DPO_MAX_RECORDS."""
        if len(records) > self.settings.max_records:
            raise SourceError(f"{what}{len(records)} records, more than DPO_MAX_RECORDS ({self.settings.max_records})")
        pairs, _ = normalise_records(records, ids=ids, max_chars=self.settings.max_field_chars)
        return pairs

    def _train(self, job_id: str, cfg, records, ids, validation, work: Path, held: list[str]) -> dict:
        """Train in this process, or in a subprocess: a multi-GPU job, DPO_RUNNER_MODE=subprocess,
        or an in-process trainer that cannot run here."""
        out_dir = work / "output"
        progress = ProgressRecorder(
            self.store,
            job_id,
            self.metrics,
            event_interval_s=5.0 if self.store.shared else 1.0,  # Firestore: ~1 write/s per document
            on_checkpoint=self._publish_checkpoint,
        )

        result = None
        if self.mode != "subprocess" and len(held) <= 1:
            device = inprocess_device(held[0]) if held else None  # a subprocess sees its GPU as cuda:0
            here = cfg
            if device is not None:
                here = cfg.copy()
                here.train.device = device
            try:
                run_training, cancelled_type = load_inprocess_trainer()
                result = self._train_inprocess(
                    run_training, cancelled_type, here, records, ids, validation, out_dir, progress, job_id
                )
                result["runner"] = "inprocess"
            except InProcessUnavailable as err:
                if self.mode == "inprocess":
                    raise
                log.warning("in-process training unavailable (%s); running job %s in a subprocess", err, job_id)
                self._note(job_id, "warning", {"message": f"in-process trainer unavailable, using a subprocess: {err}"})
        if result is None:
            result = self._train_subprocess(cfg, records, validation, work, out_dir, progress, job_id, held)
            result["runner"] = "torchrun" if len(held) > 1 else "subprocess"
        return result

    def _publish_checkpoint(self, job_id: str, step: int) -> None:
        """The trainer wrote a checkpoint: copy it where the job's next worker looks (a shared
        store). A failed copy is a warning; the job goes on. A run that lost its lease copies
        nothing: the checkpoints are the new owner's."""
        with self._lock:
            if self._stop_requests.get(job_id, "shutdown") != "shutdown":
                return  # lease lost, or the job ends now (cancel, timeout): no one resumes it
            if time.monotonic() - self._renewed.get(job_id, 0.0) > self.lease_s / 2:
                return  # not renewed lately: the lease may be another worker's by now
        try:
            self.checkpoints.publish(job_id, step)
        except Exception as err:
            log.warning("job %s: checkpoint of step %d not copied: %s", job_id, step, err)
            return
        with self._lock:  # a long upload is not a silent trainer
            if job_id in self._heard:
                self._heard[job_id] = time.monotonic()
        self._note(job_id, "checkpoint", {"step": step})

    def _train_inprocess(
        self, run_training, cancelled_type, cfg, records, ids, validation, out_dir, progress, job_id
    ) -> dict:
        try:
            result = run_training(
                cfg,
                records,
                out_dir,
                on_progress=progress,
                should_stop=lambda: self._should_stop(job_id),
                record_ids=ids,
                validation_records=validation,
            )
        except cancelled_type:
            raise Stopped() from None
        except (ImportError, OSError) as err:
            if progress.steps_seen == 0 and not isinstance(err, FileNotFoundError):
                raise InProcessUnavailable(f"{type(err).__name__}: {err}") from err
            raise
        return outcome(result.metrics)

    def _watch(self, job_id: str, proc: subprocess.Popen):
        """The trainer's output lines, while enforcing from the outside what a stuck trainer cannot
        enforce itself: on a cancel, shutdown, time limit, or silence longer than DPO_JOB_STALL_S
        (the trainer prints at least every few seconds), SIGTERM to its process group (it
        checkpoints at its next step boundary), then SIGKILL after DPO_STOP_GRACE_S."""
        lines: queue.Queue = queue.Queue()

        def read() -> None:
            try:
                for line in proc.stdout:
                    lines.put(line)
            finally:
                lines.put(None)  # EOF, or the pipe broke: either way the watch ends

        threading.Thread(target=read, daemon=True, name=f"trainer-output-{job_id[:8]}").start()
        terminated_at = None
        while True:
            try:
                line = lines.get(timeout=0.25)
            except queue.Empty:
                line = ""
            if line is None:
                return
            now = time.monotonic()
            if line:
                with self._lock:
                    self._heard[job_id] = now
                yield line
            with self._lock:
                if now - self._heard.get(job_id, now) > self.settings.job_stall_s:
                    self._stop_requests.setdefault(job_id, "stalled")
            if terminated_at is None and self._should_stop(job_id):
                signal_group(proc, signal.SIGTERM)
                terminated_at = now
            elif terminated_at is not None and now - terminated_at > self.settings.stop_grace_s:
                signal_group(proc, signal.SIGKILL)
            if proc.poll() is not None and now - self._heard.get(job_id, now) > EXITED_GRACE_S:
                # the trainer is gone but something it started still holds the pipe: end them all
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return

    def _train_subprocess(
        self, cfg, records, validation, work: Path, out_dir: Path, progress, job_id, held: list[str]
    ) -> dict:
        job_cfg = literal(OmegaConf.to_container(cfg, resolve=True))  # resolved once, here: stays literal there
        job_cfg["output_dir"] = str(out_dir)
        job_cfg["data"]["path"] = str(write_jsonl(records, work / "dataset.jsonl"))
        if validation is not None:
            job_cfg["data"]["validation_path"] = str(write_jsonl(validation, work / "validation.jsonl"))
        # The subprocess composes exactly this file: no override strings are built from caller data.
        job_cfg["defaults"] = [{"override hydra/job_logging": "stdout"}, "_self_"]
        job_cfg["hydra"] = {"output_subdir": None, "run": {"dir": str(work)}, "job": {"chdir": False}}
        (work / "job.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(job_cfg)))
        command = [sys.executable, "-m", "training", "--config-path", str(work.resolve()), "--config-name", "job"]
        if len(held) > 1:  # one process a GPU; torchrun tears them all down when one fails
            grace = max(1, int(self.settings.stop_grace_s / 2))  # torchrun's SIGKILL of its ranks comes before ours
            launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(held)}"]
            command[1:1] = [*launcher, f"--shutdown-timeout={grace}"]
        # The trainer gets no DPO_* variable (no webhook or callback secret), runs in its own
        # process group (a stop reaches anything it started) and is watched from here.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DPO_")}
        beat = max(0.5, min(5.0, self.settings.job_stall_s / 4))  # several beats fit in the stall limit
        env.update(PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1", DPO_TRAINER_HEARTBEAT_S=str(beat))
        env["DPO_DIST_TIMEOUT_S"] = str(self.settings.dist_timeout_s)
        if held:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(held)  # the job sees its GPUs only, as cuda:0..N-1
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            encoding="utf-8",
            errors="replace",  # a stray byte from the model's code must not kill the reader
            start_new_session=True,
        )
        with self._lock:
            self._procs[job_id] = proc
            # until its first line (imports, model load) the trainer gets STARTUP_ALLOWANCE_S
            self._heard[job_id] = time.monotonic() + max(0.0, STARTUP_ALLOWANCE_S - self.settings.job_stall_s)
        result, error, tail, rank_error = None, None, [], None
        try:
            for line in self._watch(job_id, proc):
                try:
                    kind, payload = protocol.parse(line)
                except ValueError:  # a garbled line must not end the job or lose the trainer
                    log.warning("job %s: unreadable trainer line: %.200s", job_id, line)
                    continue
                if kind == protocol.PROGRESS:
                    progress(payload)
                elif kind == protocol.RESULT:
                    result = payload
                elif kind == protocol.ERROR:
                    error = payload
                elif kind is None:  # the trainer's own output: its tail explains a crash
                    tail = (tail + [line.rstrip()])[-40:]
                    rank_error = RANK_ERROR.match(line.strip()) or rank_error
        except BaseException:  # whatever broke the watch, no trainer outlives it
            signal_group(proc, signal.SIGKILL)
            proc.wait()
            raise
        code = proc.wait()
        if self._should_stop(job_id) and code != 0:
            raise Stopped()
        if error is not None:
            if error["type"] == NonFiniteError.type:
                raise NonFiniteError.reported(error["message"])
            raise (
                SubprocessDataError(error["message"])
                if error["type"] == "invalid_data"
                else RuntimeError(error["message"])
            )
        failed = torchrun_failure(tail) if len(held) > 1 and code != 0 else None
        if failed is not None:
            rank, rank_code = failed
            if rank_code < 0:
                raise RankLost(f"rank {rank} of {len(held)} was killed by {signal.Signals(-rank_code).name}")
            said = rank_error[2] if rank_error else "see the replica's log"
            raise RuntimeError(f"rank {rank} of {len(held)} exited with code {rank_code}: {said}"[:2000])
        if code != 0 or result is None:
            if code < 0:
                raise RuntimeError(f"training subprocess killed by {signal.Signals(-code).name}")
            raise RuntimeError(f"training subprocess exited with code {code}: " + " | ".join(tail[-5:]))
        return outcome(json.loads((out_dir / "metrics.json").read_text()))
