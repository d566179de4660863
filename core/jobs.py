"""The embedded job store: SQLite in WAL mode, one row per job plus an ordered event log (one replica)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from core.store import (
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
    finish_event,
    stored_data,
    strict_json,
)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT UNIQUE NOT NULL,
    community_id    TEXT NOT NULL,
    status          TEXT NOT NULL,
    created_at      REAL NOT NULL,
    started_at      REAL,
    finished_at     REAL,
    source          TEXT NOT NULL,           -- 'inline' or the preference source's name
    dataset         TEXT,                    -- inline records (JSON), dropped when the job ends
    records         INTEGER,
    config          TEXT NOT NULL,           -- the caller's overrides (JSON)
    callback_url    TEXT,
    idempotency_key TEXT UNIQUE,
    body_sha256     TEXT,
    progress        TEXT NOT NULL DEFAULT '{}',
    metrics         TEXT NOT NULL DEFAULT '{}',
    final_eval      TEXT NOT NULL DEFAULT '{}',
    artifact_uri    TEXT,
    artifact_files  TEXT,
    error_type      TEXT,
    error_message   TEXT,
    runner          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0, -- take-overs after an interruption
    lease_owner     TEXT,                       -- the worker running it (core/store.py)
    lease_until     REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_community ON jobs (community_id, seq);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    ts     REAL NOT NULL,
    kind   TEXT NOT NULL,
    data   TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS outbox (  -- completion callbacks still to deliver; survives restarts
    job_id   TEXT PRIMARY KEY,
    url      TEXT NOT NULL,
    body     TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at  REAL NOT NULL,
    state    TEXT NOT NULL DEFAULT 'pending'  -- pending | delivered | failed
);
CREATE TABLE IF NOT EXISTS seen_signatures (  -- signed triggers within the signature tolerance: replays are refused
    mac        TEXT PRIMARY KEY,  -- the request's digest (SHA-256 of its string to sign; the column keeps its first name)
    expires_at REAL NOT NULL,
    idem_key   TEXT NOT NULL DEFAULT ''  -- the Idempotency-Key it came with ('' for none)
);
CREATE INDEX IF NOT EXISTS seen_signatures_by_expiry ON seen_signatures (expires_at);
"""

JOB_FIELDS = frozenset(Job.__dataclass_fields__)


def _row_to_job(row: sqlite3.Row) -> Job:
    data = {k: row[k] for k in row.keys() if k in JOB_FIELDS}
    for key in ("progress", "metrics", "final_eval", "config"):
        data[key] = json.loads(data[key]) if data[key] else {}
    data["artifact_files"] = json.loads(data["artifact_files"]) if data["artifact_files"] else None
    data["cancel_requested"] = bool(data["cancel_requested"])
    return Job(**data)


class SqliteJobStore:
    """Thread-safe: one connection, one lock. Every state change is a single conditional UPDATE,
    so a cancel and a worker can never both win."""

    shared = False  # one replica: whatever it left running when it stopped is its own to resume

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._listeners: list = []  # called (job id, state_change) after every change, e.g. the Firestore mirror
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Columns added after the first release (stores created by older versions lack them)."""
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in (
            ("attempts", "INTEGER NOT NULL DEFAULT 0"),
            ("lease_owner", "TEXT"),
            ("lease_until", "REAL"),
            ("cancel_requested", "INTEGER NOT NULL DEFAULT 0"),
        ):
            if column not in columns:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        seen = {row["name"] for row in self._db.execute("PRAGMA table_info(seen_signatures)")}
        if "idem_key" not in seen:
            self._db.execute("ALTER TABLE seen_signatures ADD COLUMN idem_key TEXT NOT NULL DEFAULT ''")

    def add_listener(self, callback) -> None:
        self._listeners.append(callback)

    def _changed(self, job_id: str, state_change: bool = True) -> None:
        for callback in self._listeners:
            try:
                callback(job_id, state_change)
            except Exception:  # a listener must never break the store
                log.exception("job store listener failed for job %s", job_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    # -- creating and reading ------------------------------------------------------------
    def create(self, new: NewJob) -> tuple[Job, bool]:
        """All checks and the insert happen under one lock, so concurrent triggers cannot both pass
        a limit or both create a job for one community or one key."""
        job_id = uuid.uuid4().hex
        now = time.time()
        with self._lock:
            if new.idempotency_key is not None:
                row = self._db.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (new.idempotency_key,)
                ).fetchone()
                if (
                    row is not None
                    and new.idempotency_ttl_s is not None
                    and row["created_at"] < now - new.idempotency_ttl_s
                ):
                    self._db.execute("UPDATE jobs SET idempotency_key = NULL WHERE id = ?", (row["id"],))
                    row = None
                if row is not None:
                    if row["body_sha256"] != new.body_sha256:
                        raise IdempotencyConflict(row["id"])
                    return _row_to_job(row), False
            if new.one_per_community:
                row = self._db.execute(
                    "SELECT id FROM jobs WHERE community_id = ? AND status IN ('queued', 'running') LIMIT 1",
                    (new.community_id,),
                ).fetchone()
                if row is not None:
                    raise ActiveJobConflict(row["id"])
            if new.max_queued_per_community is not None:
                mine = self._db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE community_id = ? AND status = 'queued'", (new.community_id,)
                ).fetchone()[0]
                if mine >= new.max_queued_per_community:
                    raise CommunityQueueFull()
            if new.max_queued is not None:
                queued = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
                if queued >= new.max_queued:
                    raise QueueFull()
            self._db.execute(
                "INSERT INTO jobs (id, community_id, status, created_at, source, dataset, records, config, callback_url,"
                " idempotency_key, body_sha256) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    new.community_id,
                    now,
                    new.source,
                    None if (stored := stored_data(new)) is None else json.dumps(stored),
                    None if new.dataset is None else len(new.dataset),
                    json.dumps(new.config),
                    new.callback_url,
                    new.idempotency_key,
                    new.body_sha256,
                ),
            )
            self._add_event(job_id, "state", {"status": "queued"})
        self._changed(job_id)
        return self.get(job_id), True

    def get(self, job_id: str) -> Job | None:
        row = self._exec("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def dataset(self, job_id: str) -> list | dict | None:
        row = self._exec("SELECT dataset FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row["dataset"]) if row and row["dataset"] else None

    def list(
        self, community_id: str | None = None, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        """Newest first. The cursor is the last row's sequence number."""
        where, args = [], []
        if community_id:
            where.append("community_id = ?")
            args.append(community_id)
        if status:
            where.append("status = ?")
            args.append(status)
        if cursor is not None:
            if not cursor.isdigit() or len(cursor) > 18:
                raise BadCursor(cursor)
            where.append("seq < ?")
            args.append(int(cursor))
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?"
        rows = self._exec(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_row_to_job(r) for r in rows], (str(rows[-1]["seq"]) if more else None)

    def counts_by_status(self) -> dict[str, int]:
        rows = self._exec("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {r["status"]: r["n"] for r in rows}

    # -- the lease -----------------------------------------------------------------------
    def claim_next(self, owner: str, lease_s: float, runner: str) -> Job | None:
        now = time.time()
        with self._lock:
            row = (
                self._db.execute(
                    "SELECT id, status FROM jobs WHERE status = 'running' AND lease_until < ? ORDER BY seq LIMIT 1",
                    (now,),
                ).fetchone()
                or self._db.execute(
                    "SELECT id, status FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
                ).fetchone()
            )
            if row is None:
                return None
            taken_over = row["status"] == "running"
            self._db.execute(
                "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?), runner = ?, lease_owner = ?,"
                " lease_until = ?, attempts = attempts + ? WHERE id = ?",
                (now, runner, owner, now + lease_s, 1 if taken_over else 0, row["id"]),
            )
            event = {"status": "running", "owner": owner}
            if taken_over:
                event["reason"] = TAKEN_OVER
            self._add_event(row["id"], "state", event)
        self._changed(row["id"])
        return self.get(row["id"])

    def renew(self, job_id: str, owner: str, lease_s: float) -> Renewal:
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND status = 'running' AND lease_owner = ?",
                (time.time() + lease_s, job_id, owner),
            )
            if not cur.rowcount:
                return Renewal(held=False)
            row = self._db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Renewal(held=True, cancel_requested=bool(row["cancel_requested"]))

    def release_leases(self) -> int:
        return self._exec("UPDATE jobs SET lease_until = 0 WHERE status = 'running'").rowcount

    # -- state changes -------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> Job | None:
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, dataset = NULL,"
                " error_type = 'cancelled', error_message = ? WHERE id = ? AND status = 'queued'",
                (time.time(), CANCELLED_QUEUED, job_id),
            )
            if cur.rowcount:
                self._add_event(job_id, "state", {"status": "cancelled"})
            else:
                job = self.get(job_id)
                if job is None:
                    return None
                if job.status in FINAL:
                    raise JobFinished(job.status)
                if not job.cancel_requested:
                    self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                    self._add_event(job_id, "cancel_requested", {})
        self._changed(job_id, state_change=bool(cur.rowcount))
        return self.get(job_id)

    def set_progress(self, job_id: str, progress: dict, metrics: dict) -> None:
        self._exec(
            "UPDATE jobs SET progress = ?, metrics = ? WHERE id = ?",
            (strict_json(progress), strict_json(metrics), job_id),
        )
        self._changed(job_id, state_change=False)

    def finish(self, job_id: str, owner: str, result: Finish) -> Job | None:
        assert result.status in FINAL
        with self._lock:
            sets = ["status = ?", "finished_at = ?", "dataset = NULL", "error_type = ?", "error_message = ?"]
            sets += ["lease_owner = NULL", "lease_until = NULL"]
            args: list[Any] = [result.status, time.time(), result.error_type, result.error_message]
            for column in ("final_eval", "metrics", "artifact_files"):
                value = getattr(result, column)
                if value is not None:
                    sets.append(f"{column} = ?")
                    args.append(strict_json(value))
            for column in ("artifact_uri", "records", "runner"):
                value = getattr(result, column)
                if value is not None:
                    sets.append(f"{column} = ?")
                    args.append(value)
            cur = self._db.execute(
                f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND status = 'running' AND lease_owner = ?",
                (*args, job_id, owner),
            )
            if not cur.rowcount:
                return None
            self._add_event(job_id, "state", finish_event(result))
        self._changed(job_id)
        return self.get(job_id)

    def requeue(self, job_id: str, owner: str, reason: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_until = NULL"
                " WHERE id = ? AND status = 'running' AND lease_owner = ?",
                (job_id, owner),
            )
            if cur.rowcount:
                self._add_event(job_id, "state", {"status": "queued", "reason": reason})
        if cur.rowcount:
            self._changed(job_id)
        return cur.rowcount == 1

    # -- events --------------------------------------------------------------------------
    def _add_event(self, job_id: str, kind: str, data: dict) -> None:
        self._db.execute(
            "INSERT INTO events (job_id, seq, ts, kind, data) VALUES "
            "(?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?), ?, ?, ?)",
            (job_id, job_id, time.time(), kind, strict_json(data)),
        )

    def add_event(self, job_id: str, kind: str, data: dict) -> None:
        with self._lock:
            self._add_event(job_id, kind, data)

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[dict]:
        rows = self._exec(
            "SELECT seq, ts, kind, data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, after, limit),
        ).fetchall()
        return [{"seq": r["seq"], "ts": r["ts"], "kind": r["kind"], "data": json.loads(r["data"])} for r in rows]

    # -- the callback outbox -------------------------------------------------------------
    def enqueue_callback(self, job_id: str, url: str, body: str) -> None:
        """Queue a job's completion callback once (a second call for the job changes nothing)."""
        self._exec(
            "INSERT OR IGNORE INTO outbox (job_id, url, body, next_at) VALUES (?, ?, ?, ?)", (job_id, url, body, 0.0)
        )

    def due_callbacks(self, now: float, limit: int = 16) -> list[dict]:
        rows = self._exec(
            "SELECT * FROM outbox WHERE state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT ?", (now, limit)
        )
        return [dict(row) for row in rows.fetchall()]

    def record_callback_attempt(self, job_id: str, state: str, next_at: float = 0.0) -> None:
        self._exec(
            "UPDATE outbox SET attempts = attempts + 1, state = ?, next_at = ? WHERE job_id = ?",
            (state, next_at, job_id),
        )

    def finished_without_callback(self) -> list[Job]:
        """Finished jobs with a callback URL whose callback was never queued (a crash between
        the two writes): queued again on start."""
        rows = self._exec(
            "SELECT j.* FROM jobs j LEFT JOIN outbox o ON o.job_id = j.id WHERE j.callback_url IS NOT NULL"
            f" AND j.status IN ({', '.join('?' * len(FINAL))}) AND o.job_id IS NULL",
            FINAL,
        )
        return [_row_to_job(row) for row in rows.fetchall()]

    def remember_signature(self, digest: str, expires_at: float, idempotency_key: str = "") -> bool:
        """Record a signed trigger (`digest`: the SHA-256 of its string to sign, the same whichever
        secrets signed it) until its signature expires. False for a replay: the request was seen
        before, unless both times with the same non-empty Idempotency-Key (a safe repeat: it
        answers the same job). A key added to a captured request does not make it new."""
        with self._lock:
            self._db.execute("DELETE FROM seen_signatures WHERE expires_at < ?", (time.time(),))
            row = self._db.execute("SELECT idem_key FROM seen_signatures WHERE mac = ?", (digest,)).fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO seen_signatures (mac, expires_at, idem_key) VALUES (?, ?, ?)",
                    (digest, expires_at, idempotency_key),
                )
                return True
        return bool(idempotency_key) and row["idem_key"] == idempotency_key

    def check(self) -> str | None:
        """For /ready: a write transaction that commits nothing."""
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("ROLLBACK")
            return None
        except sqlite3.Error:
            return "not writable"
