"""A durable job store: SQLite in WAL mode, one row per job plus an ordered event log."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

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
    attempts        INTEGER NOT NULL DEFAULT 0  -- restarts after an interruption
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
    mac        TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    idem_key   TEXT NOT NULL DEFAULT ''  -- the Idempotency-Key it came with ('' for none)
);
CREATE INDEX IF NOT EXISTS seen_signatures_by_expiry ON seen_signatures (expires_at);
"""

FINAL = ("succeeded", "failed", "cancelled")


class ActiveJobConflict(Exception):
    """The community already has a queued or running job (`job_id`)."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


class QueueFull(Exception):
    pass


class IdempotencyConflict(Exception):
    """The key exists with another body; `job_id` is the job it belongs to."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


def _row_to_job(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    for key in ("progress", "metrics", "final_eval", "config"):
        job[key] = json.loads(job[key]) if job[key] else {}
    job["artifact_files"] = json.loads(job["artifact_files"]) if job["artifact_files"] else None
    job.pop("dataset", None)
    return job


class JobStore:
    """Thread-safe: one connection, one lock. Every state change is a single conditional UPDATE,
    so a cancel and a worker can never both win."""

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
        if "attempts" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
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
                pass

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    # -- creating and reading ------------------------------------------------------------
    def create(
        self,
        community_id: str,
        config: dict,
        source: str,
        dataset: list | None = None,
        records: int | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        body_sha256: str | None = None,
        max_queued: int | None = None,
        one_per_community: bool = False,
        idempotency_ttl_s: float | None = None,
    ) -> tuple[dict, bool]:
        """Insert a queued job. Returns (job, created); an idempotent replay returns the existing job.
        A key older than `idempotency_ttl_s` is released: the request makes a new job.

        All checks and the insert happen under one lock, so concurrent triggers cannot both pass
        a limit or both create a job for one community or one key."""
        job_id = uuid.uuid4().hex
        now = time.time()
        with self._lock:
            if idempotency_key is not None:
                row = self._db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None and idempotency_ttl_s is not None and row["created_at"] < now - idempotency_ttl_s:
                    self._db.execute("UPDATE jobs SET idempotency_key = NULL WHERE id = ?", (row["id"],))
                    row = None
                if row is not None:
                    if row["body_sha256"] != body_sha256:
                        raise IdempotencyConflict(row["id"])
                    return _row_to_job(row), False
            if one_per_community:
                row = self._db.execute(
                    "SELECT id FROM jobs WHERE community_id = ? AND status IN ('queued', 'running') LIMIT 1",
                    (community_id,),
                ).fetchone()
                if row is not None:
                    raise ActiveJobConflict(row["id"])
            if max_queued is not None:
                queued = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
                if queued >= max_queued:
                    raise QueueFull()
            self._db.execute(
                "INSERT INTO jobs (id, community_id, status, created_at, source, dataset, records, config, callback_url,"
                " idempotency_key, body_sha256) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    community_id,
                    now,
                    source,
                    None if dataset is None else json.dumps(dataset),
                    records,
                    json.dumps(config),
                    callback_url,
                    idempotency_key,
                    body_sha256,
                ),
            )
            self._add_event(job_id, "state", {"status": "queued"})
        self._changed(job_id)
        return self.get(job_id), True

    def get(self, job_id: str) -> dict | None:
        row = self._exec("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def dataset(self, job_id: str) -> list | None:
        row = self._exec("SELECT dataset FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row["dataset"]) if row and row["dataset"] else None

    def list(
        self, community_id: str | None = None, status: str | None = None, limit: int = 50, cursor: int | None = None
    ):
        """Newest first. Returns (jobs, next_cursor); the cursor is the last row's sequence number."""
        where, args = [], []
        if community_id:
            where.append("community_id = ?")
            args.append(community_id)
        if status:
            where.append("status = ?")
            args.append(status)
        if cursor is not None:
            where.append("seq < ?")
            args.append(cursor)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?"
        rows = self._exec(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_row_to_job(r) for r in rows], (rows[-1]["seq"] if more else None)

    def counts_by_status(self) -> dict[str, int]:
        rows = self._exec("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {r["status"]: r["n"] for r in rows}

    # -- state changes -------------------------------------------------------------------
    def claim_next(self, runner: str) -> dict | None:
        """Oldest queued job -> running, atomically. None when the queue is empty."""
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, runner = ? WHERE id = ? AND status = 'queued'",
                (time.time(), runner, row["id"]),
            )
            self._add_event(row["id"], "state", {"status": "running"})
        self._changed(row["id"])
        return self.get(row["id"])

    def cancel_if_queued(self, job_id: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, dataset = NULL,"
                " error_type = 'cancelled', error_message = 'cancelled before it started'"
                " WHERE id = ? AND status = 'queued'",
                (time.time(), job_id),
            )
            if cur.rowcount:
                self._add_event(job_id, "state", {"status": "cancelled"})
        if cur.rowcount:
            self._changed(job_id)
        return cur.rowcount == 1

    def set_progress(self, job_id: str, progress: dict, metrics: dict | None = None) -> None:
        if metrics is None:
            self._exec("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))
        else:
            self._exec(
                "UPDATE jobs SET progress = ?, metrics = ? WHERE id = ?",
                (json.dumps(progress), json.dumps(metrics), job_id),
            )
        self._changed(job_id, state_change=False)

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        error_type: str | None = None,
        error_message: str | None = None,
        final_eval: dict | None = None,
        metrics: dict | None = None,
        artifact_uri: str | None = None,
        artifact_files: list[str] | None = None,
        records: int | None = None,
    ) -> dict:
        """running -> a final state (only from running, so a finished job never changes again)."""
        assert status in FINAL
        with self._lock:
            sets = ["status = ?", "finished_at = ?", "dataset = NULL", "error_type = ?", "error_message = ?"]
            args: list[Any] = [status, time.time(), error_type, error_message]
            for column, value in (
                ("final_eval", final_eval),
                ("metrics", metrics),
                ("artifact_files", artifact_files),
            ):
                if value is not None:
                    sets.append(f"{column} = ?")
                    args.append(json.dumps(value))
            for column, value in (("artifact_uri", artifact_uri), ("records", records)):
                if value is not None:
                    sets.append(f"{column} = ?")
                    args.append(value)
            self._db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND status = 'running'", (*args, job_id))
            data = {"status": status}
            if error_type:
                data["error"] = {"type": error_type, "message": error_message}
            self._add_event(job_id, "state", data)
        self._changed(job_id)
        return self.get(job_id)

    def requeue(self, job_id: str, reason: str, count_attempt: bool = False) -> bool:
        """running -> queued (to resume after a shutdown or a crash)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = 'queued', attempts = attempts + ? WHERE id = ? AND status = 'running'",
                (1 if count_attempt else 0, job_id),
            )
            if cur.rowcount:
                self._add_event(job_id, "state", {"status": "queued", "reason": reason})
        if cur.rowcount:
            self._changed(job_id)
        return cur.rowcount == 1

    def running_jobs(self) -> list[dict]:
        rows = self._exec("SELECT * FROM jobs WHERE status = 'running' ORDER BY seq").fetchall()
        return [{**_row_to_job(r), "attempts": r["attempts"]} for r in rows]

    # -- events --------------------------------------------------------------------------
    def _add_event(self, job_id: str, kind: str, data: dict) -> None:
        self._db.execute(
            "INSERT INTO events (job_id, seq, ts, kind, data) VALUES "
            "(?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?), ?, ?, ?)",
            (job_id, job_id, time.time(), kind, json.dumps(data)),
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

    def finished_without_callback(self) -> list[dict]:
        """Finished jobs with a callback URL whose callback was never queued (a crash between
        the two writes): queued again on start."""
        rows = self._exec(
            "SELECT j.* FROM jobs j LEFT JOIN outbox o ON o.job_id = j.id WHERE j.callback_url IS NOT NULL"
            f" AND j.status IN ({', '.join('?' * len(FINAL))}) AND o.job_id IS NULL",
            FINAL,
        )
        return [_row_to_job(row) for row in rows.fetchall()]

    def remember_signature(self, mac: str, expires_at: float, idempotency_key: str = "") -> bool:
        """Record a trigger's signature until it expires. False for a replay: the signature was seen
        before, unless both times with the same non-empty Idempotency-Key (a safe repeat: it
        answers the same job). A key added to a captured request does not make it new."""
        with self._lock:
            self._db.execute("DELETE FROM seen_signatures WHERE expires_at < ?", (time.time(),))
            row = self._db.execute("SELECT idem_key FROM seen_signatures WHERE mac = ?", (mac,)).fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO seen_signatures (mac, expires_at, idem_key) VALUES (?, ?, ?)",
                    (mac, expires_at, idempotency_key),
                )
                return True
        return bool(idempotency_key) and row["idem_key"] == idempotency_key

    def writable(self) -> bool:
        """For /ready: a write transaction that commits nothing."""
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("ROLLBACK")
            return True
        except sqlite3.Error:
            return False
