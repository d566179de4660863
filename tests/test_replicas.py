"""Several replicas, one queue: two real service processes on different ports share one Firestore
emulator project and one fake-gcs-server bucket (DPO_JOB_STORE=firestore). No mocks."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service_helpers import FAST, wait_for
from tools.serve import Server
from tools.trigger import Client

pytestmark = [pytest.mark.emulators, pytest.mark.slow]
LEASE_S = 4
PUBLIC = "https://dpo.example.com"
DATASET = [{"prompt": "Can you help?", "chosen": "Of course, glad to help.", "rejected": "No."}]


def replica_env(emulator_env: dict) -> dict:
    return {
        **emulator_env,
        "DPO_STORAGE_BACKEND": "firebase",
        "DPO_JOB_STORE": "firestore",
        "DPO_JOB_LEASE_S": str(LEASE_S),
        "DPO_CHECKPOINT_EVERY": "5",
        "DPO_MAX_QUEUED_JOBS": "1000",
        "DPO_PUBLIC_BASE_URL": PUBLIC,
    }


@pytest.fixture(scope="module")
def replicas(emulators, tmp_path_factory):
    """Replicas A and B (one worker each) on one emulator project, started together once for
    the module (the take-over test, which kills one, runs last)."""
    root = tmp_path_factory.mktemp("replicas")
    a = Server(root / "a", env=replica_env(emulators.env))
    b = Server(root / "b", env=replica_env(emulators.env), secret=a.secret)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: s.start(), (a, b)))
    yield a, b
    for server in (a, b):
        server.stop(timeout_s=30)


def runner_of(client: Client, job_id: str, servers) -> Server:
    """The replica whose worker holds the job's lease now (from the latest `running` event)."""
    events = client.get(f"/jobs/{job_id}/events").json()["events"]
    owner = [e["data"]["owner"] for e in events if e["kind"] == "state" and "owner" in e["data"]][-1]
    pid = int(owner.split(":")[1])
    return next(s for s in servers if s.proc.pid == pid)


def blobs(env, prefix: str) -> list[str]:
    from storage.firebase import FirebaseClients

    clients = FirebaseClients(env["DPO_FIREBASE_PROJECT_ID"], env["DPO_FIREBASE_STORAGE_BUCKET"], None)
    return sorted(b.name for b in clients.bucket().list_blobs(prefix=prefix))


def blobs_left(env, prefix: str, timeout_s: float = 10) -> list[str]:
    """The objects under prefix once they are gone, or after timeout_s: a job's checkpoints are
    removed right after its end is recorded, not with it."""
    deadline = time.time() + timeout_s
    while (left := blobs(env, prefix)) and time.time() < deadline:
        time.sleep(0.2)
    return left


def cancel(client: Client, job_id: str, patience_s: float = 60) -> httpx.Response:
    """POST /jobs/{id}/cancel as a caller would: a 503 (the shared store contended, here under a
    burst of triggers on a loaded machine) is retried after its Retry-After."""
    deadline = time.time() + patience_s
    while (response := client.post(f"/jobs/{job_id}/cancel")).status_code == 503 and time.time() < deadline:
        time.sleep(float(response.headers.get("Retry-After", "1")))
    return response


def test_200_concurrent_triggers_over_two_replicas_make_exactly_the_jobs_expected(firebase_env, replicas, toy):
    a, b = replicas
    clients = [Client(a.url, a.secret, timeout=60), Client(b.url, b.secret, timeout=60)]
    # one long job per replica holds its worker, so the burst stays queued
    blockers = [clients[i].trigger(f"blocker-{i}", toy(256), {"epochs": 100}).json()["job_id"] for i in range(2)]

    def fire(i: int):
        server = replicas[i % 2]  # spread over both, as a load balancer would
        client = Client(server.url, server.secret, timeout=60)  # a connection each, as separate callers
        if i < 100:  # 100 communities, no key: a job each
            return client.trigger(f"solo-{i}", DATASET, FAST)
        # 25 communities, 4 triggers each over both replicas: two with the community's key
        # (and the same body), two without: one job per community, whatever the order
        community = f"busy-{i % 25}"
        if (i // 25) % 2:
            return client.trigger(community, DATASET, FAST, headers={"Idempotency-Key": f"key-{community}"})
        return client.trigger(community, DATASET, {**FAST, "seed": i})

    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(fire, range(200)))
    codes = [r.status_code for r in responses]
    assert all(code == 202 for code in codes[:100]), set(codes[:100])
    per_community: dict[str, set] = {}
    for i, response in enumerate(responses[100:], start=100):
        body = response.json()
        if response.status_code == 409:
            assert body["error"]["code"] == "community_busy", body
            job_id = body["error"]["message"].rsplit(": ", 1)[1]
        else:
            assert response.status_code == 202, body
            assert body["status_url"] == f"{PUBLIC}/jobs/{body['job_id']}"
            job_id = body["job_id"]
        per_community.setdefault(f"busy-{i % 25}", set()).add(job_id)
    assert all(len(ids) == 1 for ids in per_community.values()), per_community
    expected = {r.json()["job_id"] for r in responses[:100]} | set().union(*per_community.values()) | set(blockers)
    assert len(expected) == 127

    for client in clients:  # every job is visible from both replicas, listed in pages
        listed, cursor = [], None
        while True:
            page = client.get("/jobs", params={"limit": 50, **({"cursor": cursor} if cursor else {})}).json()
            listed += page["jobs"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert {j["job_id"] for j in listed} == expected
        active = [j["community_id"] for j in listed if j["status"] in ("queued", "running")]
        assert len(active) == len(set(active))  # no community with two active jobs
    for job_id in sorted(expected)[:20]:
        assert all(c.get(f"/jobs/{job_id}").status_code == 200 for c in clients)

    with ThreadPoolExecutor(max_workers=16) as pool:  # clean up through either replica
        list(pool.map(lambda j: cancel(clients[hash(j) % 2], j), expected))
    # the blockers only keep the burst queued; on a slow machine one may finish before the cancel
    # (cancelling across replicas has its own test below), so wait for them to end either way
    for job_id in blockers:
        assert wait_for(clients[0], job_id)["status"] in ("cancelled", "succeeded")


def test_cancel_through_one_replica_stops_the_job_running_on_the_other(firebase_env, replicas, toy):
    a, _ = replicas
    client = Client(a.url, a.secret)
    job_id = client.trigger("cancel-across", toy(256), {"epochs": 20}).json()["job_id"]
    wait_for(client, job_id, states=("running",), step_at_least=2)
    runner = runner_of(client, job_id, replicas)
    other = next(s for s in replicas if s is not runner)
    response = cancel(Client(other.url, other.secret), job_id)
    asked = time.time()  # once the cancel is recorded (a contended store may have asked for a retry)
    assert response.status_code == 200 and response.json()["status"] == "running"
    job = wait_for(client, job_id, timeout_s=60)
    assert job["status"] == "cancelled" and job["artifact"] is None
    assert time.time() - asked < LEASE_S + 5  # at its next lease renewal, then its next step
    assert job["progress"]["step"] < job["progress"]["total_steps"]
    assert blobs(firebase_env, f"policies/cancel-across/{job_id}/") == []
    assert blobs_left(firebase_env, f"checkpoints/{job_id}/") == []


def test_a_replica_killed_mid_job_is_taken_over_and_the_job_resumes_from_its_checkpoint(firebase_env, replicas, toy):
    a, b = replicas
    client = Client(a.url, a.secret)
    job_id = client.trigger("takeover", toy(128), {"epochs": 3}).json()["job_id"]
    wait_for(client, job_id, states=("running",), step_at_least=7)
    while not any(e["kind"] == "checkpoint" for e in client.get(f"/jobs/{job_id}/events").json()["events"]):
        time.sleep(0.1)  # its first checkpoint is in the bucket
    victim = runner_of(client, job_id, replicas)
    survivor = b if victim is a else a
    killed_at = time.time()
    victim.stop(sig=signal.SIGKILL)

    client = Client(survivor.url, survivor.secret)
    job = wait_for(client, job_id, timeout_s=300)
    events = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["events"]
    assert job["status"] == "succeeded", job["error"]
    taken = [e for e in events if e["kind"] == "state" and (e["data"].get("reason") or "").startswith("taken over")]
    assert len(taken) == 1 and taken[0]["ts"] - killed_at <= 2 * LEASE_S + 1  # within 2x the lease (+ a poll)
    assert runner_of(client, job_id, replicas) is survivor
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] >= 5  # it continued, it did not start over
    assert job["progress"]["step"] == job["progress"]["total_steps"]
    assert job["final_eval"]["eval/rewards/accuracies"] >= 0.9
    assert blobs(firebase_env, f"policies/takeover/{job_id}/manifest.json")
    assert blobs_left(firebase_env, f"checkpoints/{job_id}/") == []  # removed when the job ended
    print(f"takeover: {taken[0]['ts'] - killed_at:.2f} s after the kill (lease {LEASE_S} s)")


def test_a_replica_that_loses_firestore_answers_503_and_loses_no_job(firebase_env, emulators, tmp_path, toy):
    with Server(tmp_path / "srv", env=replica_env(firebase_env)) as srv:
        client = Client(srv.url, srv.secret)
        job_id = client.trigger("partition", toy(128), {"epochs": 3}).json()["job_id"]
        wait_for(client, job_id, states=("running",), step_at_least=1)
        emulators.pause("firestore")  # frozen: its port stays open, nothing answers
        try:
            started = time.time()
            ready = httpx.get(srv.url + "/ready", timeout=30)
            assert ready.status_code == 503 and ready.json()["checks"]["job_store"].startswith("Firestore unreachable")
            refused = client.trigger("during-partition", DATASET, FAST)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
            assert time.time() - started < 30
            assert httpx.get(srv.url + "/health").status_code == 200
        finally:
            emulators.pause("firestore", False)
        job = wait_for(client, job_id, timeout_s=300)
        assert job["status"] == "succeeded", job["error"]
        assert httpx.get(srv.url + "/ready").status_code == 200
