"""The job stores side by side: claim latency, trigger accept rate and latency through a real
server, and (Firestore) how long a takeover takes after a replica dies.

    python tools/bench_stores.py [--jobs 200] [--triggers 200] [--senders 16] [--leases 4 10]

SQLite on local disk against Firestore on the real emulator (fake-gcs-server for the bucket).
The emulator runs on this machine, so Firestore numbers here leave out the network round trips
of the real service (~5-20 ms each from a nearby region): they measure our code's number of
calls and its contention, not Google's latency. Writes bench-results/stores.json.
Goals (issue 14): trigger accept p99 < 500 ms with Firestore on the emulator; a takeover within
2x the lease length.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.bench_api import percentile  # noqa: E402
from tools.emulators import Emulators  # noqa: E402
from tools.serve import Server  # noqa: E402
from tools.toy_data import toy_records  # noqa: E402
from tools.trigger import Client  # noqa: E402

DATASET = [{"prompt": "Can you help?", "chosen": "Of course, glad to help.", "rejected": "No."}]


def summary(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 0.5), 2), "p99_ms": round(percentile(ms, 0.99), 2)}


def open_store(kind: str, root: Path, env: dict):
    if kind == "sqlite":
        from core.jobs import SqliteJobStore

        return SqliteJobStore(root / "jobs.sqlite3")
    from core.firestore_jobs import FirestoreJobStore
    from storage.firebase import FirebaseClients

    return FirestoreJobStore(FirebaseClients(env["DPO_FIREBASE_PROJECT_ID"], env["DPO_FIREBASE_STORAGE_BUCKET"], None))


def bench_claims(kind: str, root: Path, env: dict, jobs: int) -> dict:
    """Create `jobs` queued jobs, then claim them all, one call at a time (one worker's view)."""
    from core.store import NewJob

    store = open_store(kind, root, env)
    created = []
    for i in range(jobs):
        started = time.perf_counter()
        store.create(NewJob(f"bench-{i}", {}, "inline", dataset=DATASET, one_per_community=True))
        created.append(time.perf_counter() - started)
    claims = []
    for _ in range(jobs):
        started = time.perf_counter()
        assert store.claim_next("bench", 30, "inprocess") is not None
        claims.append(time.perf_counter() - started)
    started = time.perf_counter()
    assert store.claim_next("bench", 30, "inprocess") is None
    empty = time.perf_counter() - started
    store.close()
    return {"create": summary(created), "claim": summary(claims), "claim_empty_queue_ms": round(empty * 1000, 2)}


def bench_triggers(kind: str, root: Path, env: dict, triggers: int, senders: int) -> dict:
    """Signed triggers through a real server while its worker is busy: accept latency and rate."""
    extra = {"DPO_MAX_QUEUED_JOBS": str(2 * triggers)}
    if kind == "firestore":
        extra.update(DPO_STORAGE_BACKEND="firebase", DPO_JOB_STORE="firestore", **env)
    with Server(root / "srv", env=extra) as srv:
        client = Client(srv.url, srv.secret, timeout=60)
        blocker = client.trigger("blocker", toy_records(64), {"epochs": 100}).json()["job_id"]

        def one(i: int) -> float:
            started = time.perf_counter()
            response = Client(srv.url, srv.secret, timeout=60).trigger(f"t-{i}", DATASET, {"epochs": 1})
            assert response.status_code == 202, response.text
            return time.perf_counter() - started

        sequential = [one(i) for i in range(triggers // 4)]  # latency: one sender, nothing queued ahead
        started = time.perf_counter()
        with ThreadPoolExecutor(senders) as pool:  # rate: many senders at once
            latencies = list(pool.map(one, range(triggers // 4, triggers + triggers // 4)))
        wall = time.perf_counter() - started
        client.post(f"/jobs/{blocker}/cancel")  # the server's shutdown leaves the queued ones queued
    return {
        "accept_one_sender": summary(sequential),
        "accept_concurrent": summary(latencies),
        "triggers_per_s": round(triggers / wall, 1),
        "senders": senders,
    }


def bench_takeover(root: Path, env: dict, lease_s: float) -> dict:
    """Two replicas; kill -9 the one running a job; time until the other takes it over."""
    replica_env = {
        **env,
        "DPO_STORAGE_BACKEND": "firebase",
        "DPO_JOB_STORE": "firestore",
        "DPO_JOB_LEASE_S": str(lease_s),
        "DPO_CHECKPOINT_EVERY": "5",
    }
    a = Server(root / f"a{lease_s}", env=replica_env)
    b = Server(root / f"b{lease_s}", env=replica_env, secret=a.secret)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: s.start(), (a, b)))
    try:
        client = Client(a.url, a.secret)
        job_id = client.trigger(f"takeover-{int(lease_s)}", toy_records(256), {"epochs": 3}).json()["job_id"]
        while True:
            events = client.get(f"/jobs/{job_id}/events").json()["events"]
            if any(e["kind"] == "checkpoint" for e in events):
                break
            time.sleep(0.1)
        owner = [e["data"]["owner"] for e in events if e["kind"] == "state" and "owner" in e["data"]][-1]
        victim = a if a.proc.pid == int(owner.split(":")[1]) else b
        survivor = b if victim is a else a
        killed = time.time()
        victim.stop(sig=signal.SIGKILL)
        client = Client(survivor.url, survivor.secret)
        while True:
            events = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["events"]
            taken = [e for e in events if (e["data"].get("reason") or "").startswith("taken over")]
            resumed = [e for e in events if e["kind"] == "resumed"]
            if taken and resumed:
                break
            time.sleep(0.1)
        return {
            "lease_s": lease_s,
            "taken_over_after_s": round(taken[0]["ts"] - killed, 2),
            "training_resumed_after_s": round(resumed[0]["ts"] - killed, 2),
            "resumed_at_step": resumed[0]["data"]["step"],
        }
    finally:
        for server in (a, b):
            server.stop(timeout_s=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--triggers", type=int, default=200)
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--leases", type=float, nargs="*", default=[4.0, 10.0])
    parser.add_argument("--out", default="bench-results/stores.json")
    args = parser.parse_args(argv)
    results: dict = {"stores": {}, "takeover": []}
    with tempfile.TemporaryDirectory() as tmp, Emulators(Path(tmp) / "emu") as emu:
        root = Path(tmp)
        for kind in ("sqlite", "firestore"):
            emu.reset()
            os.environ.update(emu.env)  # this process's Firestore client talks to the emulator
            results["stores"][kind] = {
                **bench_claims(kind, root / kind, emu.env, args.jobs),
                **bench_triggers(kind, root / kind, emu.env, args.triggers, args.senders),
            }
            print(kind, json.dumps(results["stores"][kind]), flush=True)
        for lease in args.leases:
            emu.reset()
            results["takeover"].append(bench_takeover(root, emu.env, lease))
            print("takeover", json.dumps(results["takeover"][-1]), flush=True)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
