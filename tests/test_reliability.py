"""Reliability and security against real servers: limits, hostile input, secrets, the bad-dataset
corpus, crash recovery, and a burst of concurrent triggers."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from core.auth import HEADER, sign
from core.errors import JOB_NOT_FOUND
from tests.service_helpers import FAST, wait_for
from tools.serve import Server
from tools.trigger import Client

LIMITS = {
    "DPO_MAX_BODY_BYTES": "200000",
    "DPO_MAX_RECORDS": "50",
    "DPO_MAX_FIELD_CHARS": "2000",
    "DPO_MAX_QUEUED_JOBS": "3",
}
CORPUS = json.loads((Path(__file__).parent / "data" / "bad_datasets.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("reliability"), env=LIMITS) as srv:
        yield srv


@pytest.fixture
def client(server):
    return Client(server.url, server.secret)


def leftovers(server) -> list[str]:
    """Files a failed job must not leave: working dirs, checkpoints, artifacts."""
    root = Path(server.root)
    found = []
    for sub in ("data/work", "data/checkpoints", "artifacts"):
        base = root / sub
        if base.exists():
            found += [str(p.relative_to(root)) for p in base.rglob("*") if p.is_file()]
    return found


# -- limits -------------------------------------------------------------------------------------
def test_body_over_the_limit_is_413_declared_or_streamed(server):
    body = json.dumps(
        {"communityId": "big", "dataset": [{"prompt": "p" * 1000, "chosen": "a", "rejected": "b"}] * 250}
    ).encode()
    headers = {HEADER: sign(server.secret, "POST", "/trigger-finetune", body), "Content-Type": "application/json"}
    declared = httpx.post(server.url + "/trigger-finetune", content=body, headers=headers)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "payload_too_large"

    def chunks():
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    streamed = httpx.post(server.url + "/trigger-finetune", content=chunks(), headers=headers)
    assert streamed.status_code == 413


def test_queue_full_is_429_with_retry_after_and_one_job_per_community(client, toy):
    blocker = client.trigger("q-blocker", toy(50), {"epochs": 100}).json()["job_id"]
    wait_for(client, blocker, states=("running",), step_at_least=1)
    busy = client.trigger("q-blocker", toy(8), FAST)
    assert busy.status_code == 409
    assert busy.json()["error"]["message"] == f"community 'q-blocker' already has an active job: {blocker}"
    queued = [client.trigger(f"q-{i}", toy(8), FAST).json()["job_id"] for i in range(3)]
    full = client.trigger("q-overflow", toy(8), FAST)
    assert full.status_code == 429 and full.headers["Retry-After"] == "60"
    assert "the job queue is full (3 queued)" in full.json()["error"]["message"]
    for job_id in queued + [blocker]:
        client.post(f"/jobs/{job_id}/cancel")
    wait_for(client, blocker)


@pytest.mark.parametrize("mode", ["inprocess", "subprocess"])
def test_a_job_over_its_time_limit_fails_with_timeout(tmp_path, toy, mode):
    """Stopped at the limit in both runner modes, not after all its steps."""
    with Server(tmp_path, env={"DPO_JOB_TIMEOUT_S": "3", "DPO_RUNNER_MODE": mode}) as srv:
        client = Client(srv.url, srv.secret)
        job = wait_for(client, client.trigger("slow", toy(256), {"epochs": 50}).json()["job_id"], timeout_s=120)
    assert job["status"] == "failed" and job["error"]["type"] == "timeout"
    assert job["error"]["message"] == "ran longer than DPO_JOB_TIMEOUT_S (3 s); training stopped"
    assert job["artifact"] is None and job["progress"]["step"] < (job["progress"]["total_steps"] or 1)
    assert not any((tmp_path / "data" / "work").iterdir()) and not any((tmp_path / "data" / "checkpoints").glob("*"))


def bare_constants(text: str) -> list[str]:
    """The NaN / Infinity literals a lenient parser accepts in `text` (strict JSON has none)."""
    found: list[str] = []
    json.loads(text, parse_constant=found.append)
    return found


@pytest.fixture(scope="module")
def nan_model_path(tiny_model_path, tmp_path_factory):
    """The tiny model with one weight NaN: a broken checkpoint whose every log-prob is NaN."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("nan-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["inprocess", "subprocess"])
def test_a_non_finite_run_fails_at_once_and_every_answer_is_strict_json(tmp_path, toy, nan_model_path, mode):
    """A NaN used to train to the end and succeed; its NaN metrics then made the dashboard's and
    the API's JSON answers 500 and the callback body invalid JSON. Now the job fails
    `non_finite` naming the step and the term, stores nothing, and all it answers parses."""
    env = {"DPO_DEFAULT_MODEL": str(nan_model_path), "DPO_RUNNER_MODE": mode}
    with Server(tmp_path, env=env) as srv:
        client = Client(srv.url, srv.secret)
        job = wait_for(client, client.trigger("nan", toy(24), {"epochs": 1}).json()["job_id"], timeout_s=120)
        assert job["status"] == "failed" and job["error"]["type"] == "non_finite", job["error"]
        assert job["error"]["message"].startswith("step 0: reference log-probs is not finite"), job["error"]
        assert job["artifact"] is None
        for path in (f"/jobs/{job['job_id']}", f"/jobs/{job['job_id']}/events", "/jobs"):
            response = client.get(path)
            assert response.status_code == 200
            assert not {"NaN", "Infinity", "-Infinity"} & set(bare_constants(response.text)), path
    assert not any((tmp_path / "data" / "work").iterdir())


def test_a_nan_metric_never_counts_as_not_regressed_and_is_stored_as_null(tmp_path):
    from core.jobs import SqliteJobStore
    from core.progress import ProgressRecorder
    from core.store import NewJob
    from training.loop import heldout_regressed

    baseline = {"eval/loss": 0.69, "eval/rewards/margins": 0.0}
    assert heldout_regressed(baseline, {"eval/loss": float("nan"), "eval/rewards/margins": 1.0})
    assert heldout_regressed(baseline, {"eval/loss": 0.5, "eval/rewards/margins": float("nan")})
    assert not heldout_regressed(baseline, {"eval/loss": 0.5, "eval/rewards/margins": 1.0})

    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    job, _ = store.create(NewJob(community_id="c", config={}, source="inline"))
    record = ProgressRecorder(store, job.id, event_interval_s=0)
    record({"kind": "step", "step": 1, "total_steps": 2, "metrics": {"loss": float("nan"), "lr": 1.0}})
    record({"kind": "eval", "step": 1, "metrics": {"eval/loss": float("inf")}})
    assert store.get(job.id).metrics == {"lr": 1.0}  # the NaN loss is not stored
    assert [e["data"] for e in store.events(job.id, 0, 10) if e["kind"] == "eval"] == [{"step": 1, "eval/loss": None}]


def test_a_wait_is_bounded_and_ends_when_its_client_goes_away(tmp_path, toy):
    """?wait=true used to poll until the job ended, even for a client long gone (400 abandoned
    waits tripled /health's latency). Now it answers 202 after DPO_WAIT_MAX_S, and a client that
    disconnects ends its wait (the job goes on either way)."""
    with Server(tmp_path, env={"DPO_WAIT_MAX_S": "1"}) as srv:
        client = Client(srv.url, srv.secret)
        response = client.trigger("long-wait", toy(256), {"epochs": 50}, params={"wait": "true"})
        assert response.status_code == 202 and response.headers["Retry-After"] == "10", response.text
        assert response.json()["status"] in ("queued", "running")
        job_id = response.json()["job_id"]
        client.post(f"/jobs/{job_id}/cancel")
        wait_for(client, job_id)
    with Server(tmp_path / "again", env={"DPO_WAIT_MAX_S": "600"}) as srv:
        client = Client(srv.url, srv.secret, timeout=1.0)
        with pytest.raises(httpx.ReadTimeout):
            client.trigger("gone", toy(256), {"epochs": 50}, params={"wait": "true"})
        deadline = time.monotonic() + 30
        while "the ?wait=true client went away" not in srv.log_path.read_text():
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.2)
        job_id = Client(srv.url, srv.secret).get("/jobs").json()["jobs"][0]["job_id"]
        Client(srv.url, srv.secret).post(f"/jobs/{job_id}/cancel")


# -- hostile input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "community",
    [
        "${oc.env:DPO_WEBHOOK_SECRET}",
        "..",
        "../etc",
        "a/b",
        "a,b=c",
        "a b",
        "a\\b",
        "communities/x/preferences",
        "é",
        "",
        "a" * 129,
    ],
)
def test_hostile_community_ids_never_reach_a_path(client, community):
    response = client.post(
        "/trigger-finetune", {"communityId": community, "dataset": [{"prompt": "p", "chosen": "a", "rejected": "b"}]}
    )
    assert response.status_code == 422 and response.json()["error"]["field"] == "communityId"


@pytest.mark.parametrize(
    "config, field",
    [
        ({"learning_rate": "${oc.env:DPO_WEBHOOK_SECRET}"}, "config.learning_rate"),
        ({"model": "tiny,loss=sft"}, "config.model"),
        ({"loss": "dpo train.epochs=100"}, "config.loss"),
        ({"model": "../../config"}, "config.model"),
        ({"seed": "1,2"}, "config.seed"),
        ({"hydra.run.dir": "/"}, "config.hydra.run.dir"),
        ({"lora": "true"}, "config.lora"),
    ],
)
def test_hostile_config_values_are_rejected(client, config, field):
    response = client.post("/trigger-finetune", {"communityId": "c", "config": config})
    assert response.status_code == 422 and response.json()["error"]["field"] == field


def test_record_text_is_data_never_interpolated(server, client, toy):
    tricky = [
        {
            "prompt": f"${{oc.env:DPO_WEBHOOK_SECRET}} {i} ${{hydra:runtime.cwd}}",
            "chosen": "Glad to help, ${x}.",
            "rejected": "No, ../..",
        }
        for i in range(6)
    ]
    job = wait_for(client, client.trigger("tricky", tricky + toy(10), FAST).json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    artifact = Path(job["artifact"]["uri"].removeprefix("file://"))
    assert server.secret not in (artifact / "training_config.yaml").read_text()


def test_malformed_job_ids_are_refused_before_the_store(client):
    """A 422 from validation, or a 404 because no route matched: never the store's 'job not found'."""
    for bad in ("..", "%2e%2e", "0" * 31, "0" * 33, "G" * 32, "x;drop"):
        response = client.get(f"/jobs/{bad}")
        assert response.status_code in (404, 422), bad
        assert response.json()["error"]["message"] != JOB_NOT_FOUND, bad


def test_unexpected_errors_are_500_with_an_error_id_and_no_internals(tmp_path):
    import asyncio

    from core.settings import Settings
    from webhook_handler import create_app

    app = create_app(Settings(webhook_secret="s", data_dir=tmp_path / "d", artifacts_dir=tmp_path / "a"))

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals: /etc/shadow line 3")

    async def call():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.get("/boom", headers={HEADER: sign("s", "GET", "/boom")})

    response = asyncio.run(call())
    body = response.json()
    assert response.status_code == 500 and body["error"]["code"] == "internal_error"
    assert len(body["error"]["error_id"]) == 32 and body["error"]["error_id"] in body["error"]["message"]
    assert "shadow" not in response.text and "RuntimeError" not in response.text


def test_the_secret_never_appears_in_logs_or_responses(tmp_path, toy):
    secret = "s3cr3t-" + "9f8e7d6c5b4a" * 4
    srv = Server(tmp_path, secret=secret, env={"DPO_CALLBACK_ALLOWED_HOSTS": "127.0.0.1"})
    bodies = []
    with srv:
        client = Client(srv.url, secret)
        job_id = client.trigger("secretive", toy(16), FAST).json()["job_id"]
        wait_for(client, job_id)
        bodies.append(client.get(f"/jobs/{job_id}").text)
        bodies.append(client.get(f"/jobs/{job_id}/events").text)
        bodies.append(
            httpx.post(
                srv.url + "/trigger-finetune",
                content=b"{}",
                headers={HEADER: sign("wrong", "POST", "/trigger-finetune", b"{}")},
            ).text
        )
        bodies.append(
            httpx.post(srv.url + "/trigger-finetune", content=b"{}", headers={HEADER: "t=1,v1=" + secret}).text
        )
        bodies.append(client.post("/trigger-finetune", {"communityId": "x", "config": {"seed": secret}}).text)
        bodies.append(
            httpx.get(srv.url + "/metrics").text
            + httpx.get(srv.url + "/ready").text
            + httpx.get(srv.url + "/openapi.json").text
        )
    log = srv.log_path.read_text()
    assert "POST /trigger-finetune" in log  # the log was captured
    assert secret not in log
    for body in bodies:
        assert secret not in body


# -- the bad-dataset corpus ---------------------------------------------------------------------
@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_bad_dataset_gives_a_clear_answer_and_leaves_nothing(server, client, case):
    community = "bad-" + "".join(ch if ch.isalnum() else "-" for ch in case["name"])[:60]
    response = client.post("/trigger-finetune", {"communityId": community, "dataset": case["dataset"]})
    root = Path(server.root)
    if case["expect"] == "422":
        assert response.status_code == 422, response.text
        assert case["message"] in response.json()["error"]["message"], response.json()
        assert client.get("/jobs", params={"communityId": community}).json()["jobs"] == []
    else:
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        job = wait_for(client, job_id)
        assert job["status"] == "failed" and job["error"]["type"] == "invalid_data"
        assert case["message"] in job["error"]["message"], job["error"]
        assert not (root / "data" / "work" / job_id).exists() and not (root / "data" / "checkpoints" / job_id).exists()
    assert not (root / "artifacts" / community).exists()


def test_non_utf8_body_is_a_clear_400(server):
    body = b'{"communityId": "x", "dataset": [{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}]}'
    response = httpx.post(
        server.url + "/trigger-finetune",
        content=body,
        headers={HEADER: sign(server.secret, "POST", "/trigger-finetune", body), "Content-Type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"
    assert "parsing the body" in response.json()["error"]["message"]


# -- crash recovery -----------------------------------------------------------------------------
def start_and_trigger(tmp_path, env: dict, community: str, records: list, overrides: dict):
    """A real server on tmp_path with env, and one job triggered on it: (server, client, job_id)."""
    srv = Server(tmp_path, env=env)
    srv.start()
    client = Client(srv.url, srv.secret)
    return srv, client, client.trigger(community, records, overrides).json()["job_id"]


def test_sigkill_mid_training_then_restart_resumes_from_the_checkpoint(tmp_path, toy):
    env = {"DPO_CHECKPOINT_EVERY": "5"}
    srv, client, job_id = start_and_trigger(tmp_path, env, "crashy", toy(256), {"epochs": 3})
    wait_for(client, job_id, states=("running",), step_at_least=12)
    srv.stop(sig=signal.SIGKILL)
    assert (tmp_path / "data" / "checkpoints" / job_id / "checkpoint" / "state.pt").exists()
    with Server(tmp_path, secret=srv.secret, env=env) as again:
        client = Client(again.url, again.secret)
        job = wait_for(client, job_id)
        events = client.get(f"/jobs/{job_id}/events").json()["events"]
    assert job["status"] == "succeeded", job["error"]
    assert job["final_eval"]["eval/rewards/accuracies"] >= 0.9
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] >= 10
    assert not (tmp_path / "data" / "checkpoints" / job_id).exists()


def test_without_a_checkpoint_a_job_is_rerun_once_then_failed_interrupted(tmp_path, toy):
    env = {"DPO_CHECKPOINT_EVERY": "0"}
    srv, client, job_id = start_and_trigger(tmp_path, env, "twice", toy(256), {"epochs": 50})
    for _ in range(2):
        wait_for(client, job_id, states=("running",), step_at_least=1)
        srv.stop(sig=signal.SIGKILL)
        srv = Server(tmp_path, secret=srv.secret, env=env)
        srv.start()
        client = Client(srv.url, srv.secret)
    job = wait_for(client, job_id)  # the worker that takes it over after the second crash fails it
    srv.stop()
    assert job["status"] == "failed" and job["error"]["type"] == "interrupted"
    states = [e["data"].get("reason", e["data"]["status"]) for e in client_events(tmp_path, srv.secret, job_id)]
    assert "restarting from the beginning after an interruption (no checkpoint)" in states


def client_events(root, secret, job_id):
    with Server(root, secret=secret) as srv:
        return [
            e for e in Client(srv.url, secret).get(f"/jobs/{job_id}/events").json()["events"] if e["kind"] == "state"
        ]


# -- load ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_200_concurrent_signed_triggers(tmp_path):
    dataset = [{"prompt": "Can you help?", "chosen": "Of course, glad to help.", "rejected": "No."}]
    with Server(tmp_path, env={"DPO_MAX_QUEUED_JOBS": "1000"}) as srv:
        client = Client(srv.url, srv.secret, timeout=60)
        # a long job holds the worker, so the burst queues up behind it
        blocker = client.trigger(
            "load-blocker", dataset * 1 + [{"prompt": "x", "chosen": "y", "rejected": "z"}], {"epochs": 100}
        ).json()["job_id"]

        def fire(i: int):
            c = Client(srv.url, srv.secret, timeout=60)
            if i < 100:  # 100 distinct communities, no key
                return c.trigger(f"load-{i}", dataset, FAST)
            key = f"key-{i % 50}"  # 50 keys, each sent twice, concurrently
            return c.trigger(f"idem-{i % 50}", dataset, FAST, headers={"Idempotency-Key": key})

        with ThreadPoolExecutor(max_workers=32) as pool:
            responses = list(pool.map(fire, range(200)))
        assert all(r.status_code == 202 for r in responses), {r.status_code for r in responses}
        ids = [r.json()["job_id"] for r in responses]
        assert len(set(ids[:100])) == 100
        for i in range(50):
            assert ids[100 + i] == ids[150 + i]
        assert len(set(ids)) == 150
        everything, cursor = [], None
        while True:
            page = client.get("/jobs", params={"limit": 200, **({"cursor": cursor} if cursor else {})}).json()
            everything += page["jobs"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert len(everything) == 151 and len({j["job_id"] for j in everything}) == 151
        for job_id in set(ids) | {blocker}:
            client.post(f"/jobs/{job_id}/cancel")
        assert wait_for(client, blocker)["status"] == "cancelled"
        counts = {}
        for job in client.get("/jobs", params={"limit": 200}).json()["jobs"]:
            counts[job["status"]] = counts.get(job["status"], 0) + 1
        assert counts.get("queued", 0) == 0 and counts.get("running", 0) == 0


def test_saving_an_artifact_again_keeps_a_complete_copy_and_replaces_an_incomplete_one(tmp_path):
    """A job run again after a crash must not fail after full training on what its first attempt
    left (it used to: 'Directory not empty', with server paths in the message)."""
    from storage.base import StorageError
    from storage.local import LocalArtifactStore

    store = LocalArtifactStore(tmp_path / "artifacts")
    run = tmp_path / "run"
    run.mkdir()
    (run / "weights.bin").write_bytes(b"first")
    leftover = tmp_path / "artifacts" / "c" / "job1"
    leftover.mkdir(parents=True)
    (leftover / "half-written.bin").write_bytes(b"x")  # no manifest: an interrupted copy
    first = store.save(run, "c", "job1")
    assert not (leftover / "half-written.bin").exists() and (leftover / "manifest.json").exists()
    (run / "weights.bin").write_bytes(b"second")
    assert store.save(run, "c", "job1") == first  # a complete copy stays as it is
    assert (leftover / "weights.bin").read_bytes() == b"first"

    (tmp_path / "artifacts" / "blocked").write_text("a file where a directory should be")
    with pytest.raises(StorageError) as info:
        store.save(run, "blocked", "job2")
    assert str(tmp_path) not in str(info.value) and str(info.value).startswith(
        "could not store the artifact of job job2"
    )
    assert store.check() is None and str(tmp_path) not in (
        LocalArtifactStore(tmp_path / "run" / "weights.bin").check() or ""
    )
