"""The service stays responsive while it trains: /health latency under load, /health latency
while unsigned 60 MB bodies arrive, and trigger accept latency for a large inline dataset, against
a real server on loopback.

    python tools/bench_api.py [--rate 100] [--seconds 30] [--records 10000] [--triggers 20]
                              [--hostile-mb 60] [--hostile-senders 4]

Writes bench-results/api.json. Goals: /health p99 < 100 ms with no errors while a job trains, and
again while hostile bodies arrive (each refused with a 401); accepting a 10,000-record trigger
p99 < 500 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.serve import Server  # noqa: E402
from tools.toy_data import toy_records  # noqa: E402
from tools.trigger import Client  # noqa: E402


def server_rss_mb(server) -> float:
    import psutil

    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def drive_health(url: str, rate: float, seconds: float) -> dict:
    """Requests at a fixed schedule (open loop: a slow answer does not slow the sender down)."""
    latencies, errors, lock = [], [], threading.Lock()
    http = httpx.Client(timeout=5)

    def one():
        started = time.perf_counter()
        try:
            ok = http.get(url + "/health").status_code == 200
        except httpx.HTTPError as err:
            ok = False
            with lock:
                errors.append(type(err).__name__)
        with lock:
            latencies.append(time.perf_counter() - started)
            if not ok and not errors:
                errors.append("status")

    threads, start = [], time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * max(latencies),
    }


def send_hostile_bodies(url: str, megabytes: int, senders: int, seconds: float) -> dict:
    """`senders` threads each POST unsigned (half: a well-formed forged signature) bodies of
    `megabytes` MB to /trigger-finetune, back to back, for `seconds`. Returns their answers."""
    body = b'{"communityId": "x", "dataset": "' + b"x" * (megabytes * 1024 * 1024) + b'"}'
    codes, latencies, lock = [], [], threading.Lock()
    stop_at = time.perf_counter() + seconds

    def sender(i: int):
        http = httpx.Client(timeout=60)
        while time.perf_counter() < stop_at:
            headers = {"Content-Type": "application/json"}
            if i % 2:  # a fresh, well-formed header with a made-up MAC: the body must be read and hashed
                headers["X-DPO-Signature"] = f"t={int(time.time())},v1={'ab' * 32}"
            started = time.perf_counter()
            try:
                code = http.post(url + "/trigger-finetune", content=body, headers=headers).status_code
            except httpx.HTTPError as err:
                code = type(err).__name__
            with lock:
                codes.append(code)
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "bodies": len(codes),
        "megabytes_each": megabytes,
        "answers": {str(c): codes.count(c) for c in set(codes)},
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "max_ms": 1000 * max(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--triggers", type=int, default=20)
    parser.add_argument("--hostile-mb", type=int, default=60)
    parser.add_argument("--hostile-senders", type=int, default=4)
    parser.add_argument("--out", default="bench-results/api.json")
    parser.add_argument("--hostile-only", metavar="URL", help=argparse.SUPPRESS)  # the sender process
    args = parser.parse_args(argv)
    if args.hostile_only:
        print(json.dumps(send_hostile_bodies(args.hostile_only, args.hostile_mb, args.hostile_senders, args.seconds)))
        return 0

    with tempfile.TemporaryDirectory() as root, Server(Path(root), env={"DPO_MAX_QUEUED_JOBS": "1000"}) as server:
        client = Client(server.url, server.secret, timeout=60)
        job_id = client.trigger("bench-busy", toy_records(256), {"epochs": 100}).json()["job_id"]
        while client.get(f"/jobs/{job_id}").json()["progress"].get("step", 0) < 1:
            time.sleep(0.2)
        print(f"training job {job_id} running; driving /health at {args.rate:g}/s for {args.seconds:g} s")
        health = drive_health(server.url, args.rate, args.seconds)
        health["job_still_running"] = client.get(f"/jobs/{job_id}").json()["status"] == "running"

        print(f"/health again while {args.hostile_senders} senders post unsigned {args.hostile_mb} MB bodies")
        # the senders run in their own process: their work must not slow this process's /health client
        sender = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--hostile-only",
                server.url,
                "--hostile-mb",
                str(args.hostile_mb),
                "--hostile-senders",
                str(args.hostile_senders),
                "--seconds",
                str(args.seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        health_hostile = drive_health(server.url, args.rate, args.seconds)
        health_hostile["hostile_bodies"] = json.loads(sender.communicate()[0].splitlines()[-1])
        health_hostile["server_rss_mb"] = server_rss_mb(server)

        big = [
            {
                "prompt": f"Question {i}: can you help me with a task?",
                "chosen": f"Of course, glad to help with task {i}.",
                "rejected": f"No. Task {i} is yours.",
            }
            for i in range(args.records)
        ]
        accept = []
        for i in range(args.triggers):
            started = time.perf_counter()
            response = client.trigger(f"bench-big-{i}", big, {"epochs": 1})
            accept.append(time.perf_counter() - started)
            if response.status_code != 202:
                raise SystemExit(f"trigger {i} answered {response.status_code}: {response.text[:300]}")
            client.post(f"/jobs/{response.json()['job_id']}/cancel")
        client.post(f"/jobs/{job_id}/cancel")
        trigger = {
            "records": args.records,
            "triggers": args.triggers,
            "p50_ms": 1000 * statistics.median(accept),
            "p99_ms": 1000 * percentile(accept, 0.99),
            "max_ms": 1000 * max(accept),
        }

    result = {
        "health_under_training": health,
        "health_under_hostile_bodies": health_hostile,
        "trigger_accept": trigger,
        "goals": {"health_p99_ms": 100, "health_errors": 0, "trigger_p99_ms": 500, "hostile_answers": "401 only"},
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    ok = all(h["p99_ms"] < 100 and h["errors"] == 0 for h in (health, health_hostile)) and trigger["p99_ms"] < 500
    ok = ok and set(health_hostile["hostile_bodies"]["answers"]) == {"401"}
    print("goals met" if ok else "goals NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
