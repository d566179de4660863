"""The HTTP service, end to end, against real uvicorn servers on loopback and real tiny-model training."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from core.auth import HEADER, sign, verify
from core.callbacks import sign_webhook
from core.errors import (
    BAD_SIGNATURE,
    CALLBACK_NEEDS_SECRET,
    COMMUNITY_QUEUE_FULL,
    REPLAYED_SIGNATURE,
    ServiceError,
)
from core.runner import HELDOUT_REGRESSED, SHUTDOWN_REQUEUE
from tests.service_helpers import FAST, wait_for
from tools.serve import Server, free_port
from tools.trigger import Client


def artifact_path(job: dict) -> Path:
    return Path(urlsplit(job["artifact"]["uri"]).path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    with Server(root, env={"DPO_CALLBACK_ALLOWED_HOSTS": "127.0.0.1"}) as srv:
        yield srv


@pytest.fixture
def client(server):
    return Client(server.url, server.secret)


def count_jobs(client) -> int:
    return len(client.get("/jobs", params={"limit": 200}).json()["jobs"])


# -- the main path ------------------------------------------------------------------------------
def test_signed_toy_trigger_trains_and_stores_a_loadable_artifact(server, client, toy):
    from transformers import AutoModelForCausalLM

    response = client.trigger("toy-community", toy(200), {"epochs": 2})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["status_url"].endswith(f"/jobs/{body['job_id']}")
    job = wait_for(client, body["job_id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["final_eval"]["eval/rewards/accuracies"] >= 0.9
    assert job["progress"]["percent"] == 100.0 and job["progress"]["step"] == job["progress"]["total_steps"]
    assert job["runner"] == "inprocess" and job["records"] == 200 and job["source"] == "inline"
    path = artifact_path(job)
    assert path == Path(server.root, "artifacts", "toy-community", body["job_id"]).resolve()
    assert {"model.safetensors", "manifest.json", "metrics.json"} <= set(job["artifact"]["files"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["job_id"] == body["job_id"] and len(manifest["files"]) == len(job["artifact"]["files"]) - 1
    AutoModelForCausalLM.from_pretrained(path)
    assert list((Path(server.root) / "data" / "work").iterdir()) == []  # working directory removed

    events = client.get(f"/jobs/{body['job_id']}/events").json()["events"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and seqs[0] == 1
    states = [e["data"]["status"] for e in events if e["kind"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    assert any(e["kind"] == "progress" for e in events) and any(e["kind"] == "eval" for e in events)
    later = client.get(f"/jobs/{body['job_id']}/events", params={"after": seqs[-2]}).json()
    assert [e["seq"] for e in later["events"]] == [seqs[-1]] and later["last_seq"] == seqs[-1]
    evals = [e["data"] for e in events if e["kind"] == "eval"]
    assert len(evals) >= 3 and abs(evals[0]["eval/rewards/margins"]) < 1e-4  # baseline, then over the job
    assert job["final_eval"]["eval/regressed"] is False and not any(e["kind"] == "warning" for e in events)


def test_a_job_that_makes_held_out_pairs_worse_succeeds_with_a_warning(client, toy):
    records = toy(40)  # and each one mirrored: training on a pair's mirror un-learns the pair
    mirrored = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in records]
    response = client.trigger("mirrored", records + mirrored, {"epochs": 4})
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["job_id"])
    assert job["status"] == "succeeded" and job["final_eval"]["eval/regressed"] is True, job["final_eval"]
    events = client.get(f"/jobs/{job['job_id']}/events").json()["events"]
    warnings = [e["data"]["message"] for e in events if e["kind"] == "warning"]
    assert warnings == [HELDOUT_REGRESSED]


def test_records_from_the_local_preference_source(server, client, toy):
    prefs = Path(server.root) / "preferences"
    prefs.mkdir(exist_ok=True)
    (prefs / "from-disk.jsonl").write_text("\n".join(json.dumps(r) for r in toy(40, "ranked")) + "\n")
    job = wait_for(client, client.trigger("from-disk", config=FAST).json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["source"] == "local" and job["records"] == 40


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "bad-json.json",
            '{"prompt": "p"}',
            "bad-json.json: record -: field '<file>': bad-json.json: expected a JSON list",
        ),
        (
            "bad-parquet.parquet",
            "not parquet",
            "bad-parquet.parquet: record -: field '<file>': bad-parquet.parquet: not a",
        ),
        ("bad-line.jsonl", "{nope\n", "bad-line.jsonl: record line 1: field '<json>': not valid JSON"),
    ],
)
def test_a_bad_source_file_is_named_without_the_servers_paths(server, client, name, content, message):
    """Errors reach the caller: they name the community's file, never where the server keeps it."""
    prefs = Path(server.root) / "preferences"
    prefs.mkdir(exist_ok=True)
    (prefs / name).write_text(content)
    job = wait_for(client, client.trigger(name.split(".")[0], config=FAST).json()["job_id"])
    assert job["status"] == "failed" and job["error"]["type"] == "source_error", job["error"]
    assert job["error"]["message"].startswith(message), job["error"]["message"]
    assert str(server.root) not in job["error"]["message"] and "/" not in job["error"]["message"]


def test_empty_community_fails_with_a_clear_message(client):
    job = wait_for(client, client.trigger("nobody-here", config=FAST).json()["job_id"])
    assert job["status"] == "failed"
    assert (
        job["error"]["type"] == "source_error"
        and "no preference records for community 'nobody-here'" in job["error"]["message"]
    )


def test_wait_true_answers_in_the_old_synchronous_shape(client, toy):
    response = client.trigger("sync-community", toy(16), FAST, params={"wait": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (
        body["status"] == "success" and body["policy_path"].startswith("file://") and body["job_status"] == "succeeded"
    )


def test_openapi_declares_the_signature_and_docs_need_no_cdn(server):
    """The signature header is a security scheme (so /docs shows it and explains how to sign);
    Swagger UI's files come from the service itself, unsigned, like /docs."""
    schema = httpx.get(server.url + "/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["DPO-Signature"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-DPO-Signature")
    assert "HMAC-SHA256" in scheme["description"] and "<Idempotency-Key>" in scheme["description"]
    assert schema["paths"]["/trigger-finetune"]["post"]["security"] == [{"DPO-Signature": []}]
    assert "security" not in schema["paths"]["/health"]["get"]
    page = httpx.get(server.url + "/docs")
    assert page.status_code == 200 and "cdn" not in page.text and "/docs/assets/swagger-ui-bundle.js" in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert httpx.get(f"{server.url}/docs/assets/{asset}").status_code == 200
    assert httpx.get(server.url + "/docs/assets/../jobs").status_code in (401, 404)  # no way out of the assets


def test_json_logs_are_one_object_a_line_with_severity_and_the_job(tmp_path, toy):
    with Server(tmp_path, env={"DPO_LOG_FORMAT": "json"}) as srv:
        client = Client(srv.url, srv.secret)
        job = wait_for(client, client.trigger("logged", toy(16), FAST).json()["job_id"])
        lines = [line for line in srv.log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"severity", "message", "logger", "time"} <= set(r) for r in records)
    ours = [r for r in records if r.get("job_id") == job["job_id"]]
    assert ours and all(r["community_id"] == "logged" for r in ours)
    assert any(r["message"].startswith(f"job {job['job_id']}: succeeded") for r in ours)
    assert any(r["logger"] == "uvicorn.access" for r in records)  # uvicorn's own lines too


def test_a_job_shows_its_model_resolved_hyperparameters_tokens_and_the_callers_suffix_and_metadata(client, toy):
    """What a user of OpenAI's fine-tuning API expects to read back: everything the job trained
    with (the preset's values with theirs on top), what it trained on, and their own labels."""
    payload = {"communityId": "shaped", "dataset": toy(24), "config": {"epochs": 1, "batch_size": 4, "beta": 0.2}}
    response = client.post("/trigger-finetune", {**payload, "suffix": "support-v2", "metadata": {"team": "ml"}})
    job = wait_for(client, response.json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    hyper = job["hyperparameters"]
    assert (hyper["train"]["batch_size"], hyper["train"]["epochs"], hyper["loss"]["beta"]) == (4, 1, 0.2)
    assert hyper["train"]["learning_rate"] == 5e-4 and hyper["model"]["lora"]["enabled"] is False  # the preset's
    assert job["model"] == hyper["model"]["name_or_path"] == ".cache/models/tiny-llama"
    history = json.loads((artifact_path(job) / "metrics.json").read_text())["history"]
    assert job["trained_tokens"] == sum(h["tokens"] for h in history) > 0
    assert (job["suffix"], job["metadata"]) == ("support-v2", {"team": "ml"})
    assert job["result_files"] == [f"{job['artifact']['uri']}/{name}" for name in job["artifact"]["files"]]
    assert "hyperparameters" not in job["config"]


def test_a_job_answers_held_out_prompts_before_and_after_and_counts_the_behaviour(client, toy):
    """eval_samples / eval_contains: greedy answers to held-out prompts in a samples event and
    the artifact, the share matching the caller's regex before and after in final_eval."""
    config = {"epochs": 1, "eval_samples": 3, "eval_max_new_tokens": 8, "eval_contains": "."}
    payload = {"communityId": "answers", "dataset": toy(24), "validation": toy(4, seed=9), "config": config}
    response = client.post("/trigger-finetune", payload)
    job = wait_for(client, response.json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["hyperparameters"]["eval"] == {"samples": 3, "max_new_tokens": 8, "contains": "."}
    final = job["final_eval"]
    assert 0 <= final["eval/contains_share_before"] <= 1 and 0 <= final["eval/contains_share"] <= 1, final
    events = client.get(f"/jobs/{job['job_id']}/events").json()["events"]
    phases = [e["data"]["phase"] for e in events if e["kind"] == "samples"]
    assert phases == ["before", "after"]
    last = [e["data"]["samples"] for e in events if e["kind"] == "samples"][-1]
    assert len(last) == 3 and all({"prompt", "before", "after"} <= set(s) for s in last)
    lines = (artifact_path(job) / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["after"] for line in lines] == [s["after"] for s in last]
    bad = client.post("/trigger-finetune", {"communityId": "answers", "config": {"eval_contains": "(unclosed"}})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "config.eval_contains", bad.text
    assert "not a valid regex" in bad.json()["error"]["message"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "at most 16 keys, got 17"),
        ({"metadata": {"k": "v" * 513}}, "value of 'k': at most 512 characters, got 513"),
        ({"metadata": {"k": 3}}, "valid string"),
        ({"suffix": "no spaces"}, "should match pattern"),
        ({"metadata": {"a key": "v"}}, "key 'a key': 1 to 64 of A-Z a-z 0-9 _ . - (not __name__)"),
        ({"metadata": {"__name__": "v"}}, "(not __name__)"),
        ({"metadata": {"k": "\ud800"}}, "value of 'k': not valid Unicode text (a lone surrogate)"),
    ],
)
def test_bad_suffix_or_metadata_is_a_422_naming_it(client, extra, message):
    response = client.post("/trigger-finetune", {"communityId": "c", **extra})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"].split(".")[0] == next(iter(extra)) and message in error["message"]


def test_health_keeps_answering_while_a_job_trains(server, client, toy):
    job_id = client.trigger("busy", toy(256), {"epochs": 50}).json()["job_id"]
    wait_for(client, job_id, states=("running",), step_at_least=1)
    latencies = []
    for _ in range(40):
        started = time.perf_counter()
        response = httpx.get(server.url + "/health", timeout=5)
        latencies.append(time.perf_counter() - started)
        assert response.json() == {"status": "healthy", "service": "dpo-microservice", "version": "0.1.0"}
        time.sleep(0.05)
    assert client.get(f"/jobs/{job_id}").json()["status"] == "running", "the job ended before the measurement did"
    assert max(latencies) < 1.0, latencies
    client.post(f"/jobs/{job_id}/cancel")
    wait_for(client, job_id)


# -- signatures ---------------------------------------------------------------------------------
def _raw_post(server, body: bytes, signature: str | None):
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers[HEADER] = signature
    return httpx.post(server.url + "/trigger-finetune", content=body, headers=headers)


PATH = "/trigger-finetune"


@pytest.mark.parametrize(
    "make_signature, message",
    [
        (lambda secret, body: None, "missing X-DPO-Signature header"),
        (lambda secret, body: "v1=abc", "malformed X-DPO-Signature header"),
        (lambda secret, body: "t=now,v1=zz", "malformed X-DPO-Signature header"),
        (
            lambda secret, body: sign(secret, "POST", PATH, body).replace("t=", "t=+"),
            "malformed X-DPO-Signature header",
        ),
        (lambda secret, body: sign("wrong-secret", "POST", PATH, body), BAD_SIGNATURE),
        (lambda secret, body: sign(secret, "POST", PATH, body.replace(b"sig", b"SIG")), BAD_SIGNATURE),
        (lambda secret, body: sign(secret, "GET", PATH, body), BAD_SIGNATURE),  # another method
        (lambda secret, body: sign(secret, "POST", "/jobs", body), BAD_SIGNATURE),  # another path
        (lambda secret, body: sign(secret, "POST", PATH, body, query="wait=true"), BAD_SIGNATURE),  # another query
        (
            lambda secret, body: sign(secret, "POST", PATH, body, timestamp=int(time.time()) - 301),
            "signature timestamp is more than 300 s",
        ),
        # well past the limit: a slow request must not bring a 301 s lead back under it
        (
            lambda secret, body: sign(secret, "POST", PATH, body, timestamp=int(time.time()) + 330),
            "signature timestamp is more than 300 s",
        ),
    ],
    ids=[
        "missing",
        "malformed",
        "bad-timestamp",
        "signed-t",
        "wrong-secret",
        "tampered",
        "method",
        "path",
        "query",
        "too-old",
        "future",
    ],
)
def test_bad_signatures_are_401(server, client, make_signature, message):
    before = count_jobs(client)
    body = json.dumps({"communityId": "sig", "dataset": [{"prompt": "p", "chosen": "a", "rejected": "b"}]}).encode()
    response = _raw_post(server, body, make_signature(server.secret, body))
    assert response.status_code == 401
    assert response.json()["error"]["message"].startswith(message)
    assert count_jobs(client) == before


def test_a_signature_authorises_only_its_own_request(server, client, toy):
    """A GET's signature (empty body) must not cancel a job or list another community's jobs."""
    job_id = client.trigger("own-request", toy(8), FAST).json()["job_id"]
    get_signature = sign(server.secret, "GET", f"/jobs/{job_id}")
    assert httpx.get(f"{server.url}/jobs/{job_id}", headers={HEADER: get_signature}).status_code == 200
    cancel = httpx.post(f"{server.url}/jobs/{job_id}/cancel", headers={HEADER: get_signature})
    assert cancel.status_code == 401 and cancel.json()["error"]["message"] == BAD_SIGNATURE
    listing = sign(server.secret, "GET", "/jobs", query="communityId=own-request")
    assert (
        httpx.get(f"{server.url}/jobs", params={"communityId": "own-request"}, headers={HEADER: listing}).status_code
        == 200
    )
    other = httpx.get(f"{server.url}/jobs", params={"communityId": "someone-else"}, headers={HEADER: listing})
    assert other.status_code == 401
    wait_for(client, job_id)


def test_a_replayed_post_is_refused(server, client, toy):
    body = json.dumps({"communityId": "replayed", "dataset": toy(8), "config": FAST}).encode()
    signature = sign(server.secret, "POST", PATH, body)
    first = _raw_post(server, body, signature)
    assert first.status_code == 202, first.text
    again = _raw_post(server, body, signature)
    assert again.status_code == 401 and again.json()["error"]["message"] == REPLAYED_SIGNATURE
    # the Idempotency-Key is signed: adding one to a captured request breaks its signature
    keyed = httpx.post(
        server.url + PATH,
        content=body,
        headers={"Content-Type": "application/json", HEADER: signature, "Idempotency-Key": "fresh-key"},
    )
    assert keyed.status_code == 401 and keyed.json()["error"]["message"] == BAD_SIGNATURE
    wait_for(client, first.json()["job_id"])


def test_rotated_secrets_both_verify(tmp_path_factory):
    root = tmp_path_factory.mktemp("rotation")
    with Server(root, secret="new-secret,old-secret") as srv:
        for secret in ("new-secret", "old-secret"):
            assert Client(srv.url, secret).get("/jobs").status_code == 200
        both = sign(["new-secret", "old-secret"], "GET", "/jobs")
        assert httpx.get(srv.url + "/jobs", headers={HEADER: both}).status_code == 200
        assert Client(srv.url, "retired-secret").get("/jobs").status_code == 401


def test_a_trigger_signed_with_both_rotated_secrets_is_still_accepted_once(tmp_path_factory, toy):
    """Issue 24.1: the replay cache keys on the request (its string to sign), not on the v1
    value the caller sent, so the same trigger re-sent with fewer or other v1 values is a replay."""
    root = tmp_path_factory.mktemp("rotation-replay")
    with Server(root, secret="new-secret,old-secret") as srv:
        body = json.dumps({"communityId": "rotating", "dataset": toy(8), "config": FAST}).encode()
        t = int(time.time())
        both = sign(["new-secret", "old-secret"], "POST", PATH, body, timestamp=t)
        first = _raw_post(srv, body, both)
        assert first.status_code == 202, first.text
        wait_for(Client(srv.url, "new-secret"), first.json()["job_id"])  # ended: no 409 for the community
        for secrets in (["new-secret"], ["old-secret"], ["old-secret", "new-secret"]):
            again = _raw_post(srv, body, sign(secrets, "POST", PATH, body, timestamp=t))
            assert again.status_code == 401, (secrets, again.text)
            assert again.json()["error"]["message"] == REPLAYED_SIGNATURE
        assert len(Client(srv.url, "new-secret").get("/jobs").json()["jobs"]) == 1


def test_unsigned_bodies_are_refused_before_they_are_parsed(server):
    """Not a 422 about the JSON: the gate answers before any parser sees the bytes."""
    for headers in ({}, {HEADER: sign("wrong", "POST", PATH, b"{not json")}):
        response = httpx.post(
            server.url + PATH, content=b"{not json", headers={"Content-Type": "application/json", **headers}
        )
        assert response.status_code == 401, response.text


def test_reads_need_a_signature_too_but_probes_do_not(server):
    assert httpx.get(server.url + "/jobs").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_verify_binds_method_path_query_and_body_exactly():
    header = sign("k", "POST", "/jobs/x/cancel", b'{"a": 1}', query={"b": "2", "a": "1"}, timestamp=1000)
    verify(header, "POST", "/jobs/x/cancel", "a=1&b=2", b'{"a": 1}', "k", now=1000)  # query order does not matter
    for method, path, query, body in (
        ("POST", "/jobs/x/cancel", "a=1&b=2", b'{"a":1}'),
        ("GET", "/jobs/x/cancel", "a=1&b=2", b'{"a": 1}'),
        ("POST", "/jobs/y/cancel", "a=1&b=2", b'{"a": 1}'),
        ("POST", "/jobs/x/cancel", "a=1&b=3", b'{"a": 1}'),
    ):
        with pytest.raises(ServiceError, match="does not match"):
            verify(header, method, path, query, body, "k", now=1000)


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "payload, field, message",
    [
        ({"communityId": "c", "config": {"nope": 1}}, "config.nope", "unknown key"),
        ({"communityId": "c", "config": {"beta": 0}}, "config.beta", "greater than or equal to 0.001"),
        (
            {"communityId": "c", "config": {"loss": "ipo", "beta": 1e-40}},
            "config.beta",
            "greater than or equal to 0.001",
        ),
        ({"communityId": "c", "config": {"epochs": 1000}}, "config.epochs", "less than or equal to 100"),
        ({"communityId": "c", "config": {"learning_rate": "0.1"}}, "config.learning_rate", "valid number"),
        (
            {"communityId": "c", "config": {"model": "../../etc"}},
            "config.model",
            "expected a preset (pythia-2.8b, qwen2.5-0.5b, smollm2-135m, tiny, zephyr-7b) or a model in DPO_ALLOWED_MODELS",
        ),
        (
            {"communityId": "c", "config": {"model": "custom"}},
            "config.model",
            "or a model in DPO_ALLOWED_MODELS, got 'custom'",
        ),
        ({"communityId": "c", "config": {"precision": "bf16"}}, "config.precision", "'auto', 'fp32' or 'bf16-mixed'"),
        ({"communityId": "c", "config": {"gradient_checkpointing": "on"}}, "config.gradient_checkpointing", "boolean"),
        ({"communityId": "c", "config": {"lora_alpha": 0}}, "config.lora_alpha", "greater than 0"),
        ({"communityId": "c", "config": {"lora_alpha": 5000}}, "config.lora_alpha", "less than or equal to 4096"),
        (
            {"communityId": "c", "config": {"lora_target_modules": "q_proj|.*"}},
            "config.lora_target_modules",
            'expected "all-linear" or a list of 1 to 64 module names such as ["q_proj", "v_proj"]',
        ),
        (
            {"communityId": "c", "config": {"lora_target_modules": ["q_proj", "model.layers.0.v_proj"]}},
            "config.lora_target_modules",
            "'model.layers.0.v_proj': a module name is 1 to 64 of A-Z a-z 0-9 _, not starting with a digit",
        ),
        (
            {"communityId": "c", "config": {"lora_target_modules": ["q_proj"] * 65}},
            "config.lora_target_modules",
            "a list of 1 to 64 module names",
        ),
        (
            {"communityId": "c", "config": {"max_length": 64, "max_prompt_length": 64}},
            "config.max_prompt_length",
            "config.max_prompt_length: must be smaller than max_length (64), got 64",
        ),
        (
            {"communityId": "c", "config": {"merge": True}},
            "config.merge",
            "config.merge: needs lora: true (a full fine-tune stores full weights already)",
        ),
        (
            {"communityId": "c", "config": {"gpus": 2}},
            "config.gpus",
            "config.gpus: this service runs a job on at most 1 GPU (DPO_GPUS lists 0), got 2",
        ),
        (
            {
                "communityId": "c",
                "dataset": [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"}],
            },
            "dataset[0].prompt",
            "record 0: field 'prompt': expected a string, got list (in TRL's conversational format 'chosen' and",
        ),
        ({"communityId": "c", "config": {"loss": "${oc.env:DPO_WEBHOOK_SECRET}"}}, "config.loss", "expected one of"),
        ({"communityId": "../x"}, "communityId", "should match pattern"),
        ({"communityId": "a,b=c"}, "communityId", "should match pattern"),
        ({"communityId": "x" * 129}, "communityId", "should match pattern"),
        ({}, "communityId", "Field required"),
        ({"communityId": "c", "extra": 1}, "extra", "unknown key"),
        ({"communityId": "c", "dataset": "not a list"}, "dataset", "valid list"),
        (
            {
                "communityId": "c",
                "dataset": [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}],
            },
            "dataset[1].rejected",
            "record 1: field 'rejected': is required",
        ),
        ({"communityId": "c", "dataset": []}, "dataset", "no usable preference records"),
        (
            {
                "communityId": "c",
                "validation": [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}],
            },
            "validation[1].rejected",
            "record 1: field 'rejected': is required",
        ),
        (
            {"communityId": "c", "callbackUrl": "http://evil.example/hook"},
            "callbackUrl",
            "not in DPO_CALLBACK_ALLOWED_HOSTS",
        ),
        (
            {"communityId": "c", "dataset": [{"prompt": "a\ud800b", "chosen": "x", "rejected": "y"}]},
            "dataset[0].prompt",
            "not valid Unicode text: a lone surrogate (\\ud800) at character 1",
        ),
        (
            {"communityId": "c", "dataset": [{"prompt": "p", "chosen": "x", "rejected": "y", "k" * 100_001: 1}]},
            "dataset[0]." + "k" * 64 + "...",
            "a key of 100001 characters, more than the limit of 100000",
        ),
        ({"communityId": "c", "callbackUrl": "http://[::1"}, "callbackUrl", "callbackUrl: not a valid URL"),
        (
            {"communityId": "c", "callbackUrl": "http://127.0.0.1:99999/x"},
            "callbackUrl",
            "callbackUrl: not a valid URL",
        ),
        (
            {"communityId": "c", "callbackUrl": "http://127.0.0.1/a\tb"},
            "callbackUrl",
            "callbackUrl: expected an http(s) URL without spaces or control characters",
        ),
    ],
)
def test_invalid_requests_are_422_naming_the_field_and_queue_nothing(client, payload, field, message):
    before = count_jobs(client)
    response = client.post("/trigger-finetune", payload)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and message in error["message"], error
    assert count_jobs(client) == before


# -- jobs API -----------------------------------------------------------------------------------
def test_cancel_a_running_job(server, client, toy):
    job_id = client.trigger("cancel-me", toy(256), {"epochs": 20}).json()["job_id"]
    wait_for(client, job_id, states=("running",), step_at_least=2)
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200
    job = wait_for(client, job_id)
    assert job["status"] == "cancelled" and job["artifact"] is None
    assert job["progress"]["step"] < job["progress"]["total_steps"]
    assert not (Path(server.root) / "artifacts" / "cancel-me").exists() or not any(
        (Path(server.root) / "artifacts" / "cancel-me").iterdir()
    )
    assert not (Path(server.root) / "data" / "work" / job_id).exists()
    again = client.post(f"/jobs/{job_id}/cancel")
    assert (
        again.status_code == 409 and again.json()["error"]["message"] == "job already finished with status 'cancelled'"
    )


def test_cancel_a_queued_job_before_it_starts(client, toy):
    blocker = client.trigger("blocker", toy(256), {"epochs": 20}).json()["job_id"]
    queued = client.trigger("queued-one", toy(8), FAST).json()["job_id"]
    assert client.get(f"/jobs/{queued}").json()["status"] == "queued"
    assert client.post(f"/jobs/{queued}/cancel").json()["status"] == "cancelled"
    client.post(f"/jobs/{blocker}/cancel")
    wait_for(client, blocker)
    job = client.get(f"/jobs/{queued}").json()
    assert job["status"] == "cancelled" and job["started_at"] is None


def test_idempotency_key(client, toy):
    dataset = toy(8)
    first = client.trigger("idem", dataset, FAST, headers={"Idempotency-Key": "key-1"})
    second = client.trigger("idem", dataset, FAST, headers={"Idempotency-Key": "key-1"})
    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] == second.json()["job_id"]
    conflict = client.trigger("idem", dataset[:4], FAST, headers={"Idempotency-Key": "key-1"})
    assert conflict.status_code == 409
    assert "Idempotency-Key was already used with a different request body" in conflict.json()["error"]["message"]
    wait_for(client, first.json()["job_id"])
    finished = client.trigger("idem", dataset, FAST, headers={"Idempotency-Key": "key-1"})
    assert finished.status_code == 202 and finished.json()["status"] == "succeeded"  # the job as it is now
    empty = client.trigger("idem-empty", dataset, FAST, headers={"Idempotency-Key": ""})
    assert empty.status_code == 422 and empty.json()["error"]["field"] == "Idempotency-Key"


def test_list_paginates_newest_first_and_filters(client, toy):
    ids = []
    for _ in range(3):  # one active job per community: each waits for the one before
        ids.append(client.trigger("listing", toy(4), FAST).json()["job_id"])
        wait_for(client, ids[-1])
    page1 = client.get("/jobs", params={"communityId": "listing", "limit": 2}).json()
    assert [j["job_id"] for j in page1["jobs"]] == ids[::-1][:2] and page1["next_cursor"]
    page2 = client.get("/jobs", params={"communityId": "listing", "limit": 2, "cursor": page1["next_cursor"]}).json()
    assert [j["job_id"] for j in page2["jobs"]] == ids[:1] and page2["next_cursor"] is None
    for job_id in ids:
        wait_for(client, job_id)
    done = client.get("/jobs", params={"communityId": "listing", "status": "succeeded"}).json()["jobs"]
    assert {j["job_id"] for j in done} == set(ids)


def test_unknown_and_malformed_job_ids(client):
    assert client.get("/jobs/" + "0" * 32).status_code == 404
    traversal = client.get("/jobs/..%2F..%2Fetc")
    assert traversal.status_code in (404, 422) and traversal.json()["error"]["message"] != "job not found"
    assert client.get("/jobs/not-a-job-id").status_code == 422


def test_every_answer_is_nosniff_under_a_strict_csp_and_docs_serve_only_their_own_files(server, client):
    """Issue 24.11: JSON (also a gate's 401 and a 404) and /docs carry nosniff and a CSP; /docs
    has no inline script or style to need 'unsafe-inline'; /docs/assets/ serves only the files
    the page loads (not the vendor's standalone index.html with its petstore URL bar)."""
    answers = {
        "/health": httpx.get(server.url + "/health"),
        "/jobs (unsigned)": httpx.get(server.url + "/jobs"),
        "/jobs": client.get("/jobs"),
        "/openapi.json": httpx.get(server.url + "/openapi.json"),
        "/nowhere": httpx.get(server.url + "/nowhere"),
    }
    for name, answer in answers.items():
        assert answer.headers.get("x-content-type-options") == "nosniff", name
        assert answer.headers.get("content-security-policy", "").startswith("default-src 'none'"), name
    docs = httpx.get(server.url + "/docs")
    csp = docs.headers["content-security-policy"]
    assert docs.status_code == 200 and docs.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in csp and "unsafe" not in csp and "frame-ancestors 'none'" in csp
    assert "<script>" not in docs.text and "<style" not in docs.text and "style=" not in docs.text
    assert "jsdelivr" not in docs.text and "cdn" not in docs.text.lower()
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "init.js"):
        asset = httpx.get(f"{server.url}/docs/assets/{name}")
        assert asset.status_code == 200 and asset.headers["x-content-type-options"] == "nosniff", name
    assert "'/openapi.json'" in httpx.get(server.url + "/docs/assets/init.js").text.replace('"', "'")
    for name in (
        "index.html",
        "swagger-initializer.js",
        "oauth2-redirect.html",
        "swagger-ui.js",
        "..%2F..%2Fsettings.py",
    ):
        assert httpx.get(f"{server.url}/docs/assets/{name}").status_code == 404, name


def test_one_community_cannot_fill_the_queue(tmp_path, toy):
    """Issue 24.11: one caller filled the global queue of 100 in 1.3 s; a community now queues
    at most DPO_MAX_QUEUED_PER_COMMUNITY jobs (its running job does not count)."""
    env = {"DPO_ONE_JOB_PER_COMMUNITY": "0", "DPO_MAX_QUEUED_PER_COMMUNITY": "2"}
    with Server(tmp_path, env=env) as srv:
        client = Client(srv.url, srv.secret)
        running = client.trigger("greedy", toy(256), {"epochs": 40}).json()["job_id"]
        wait_for(client, running, states=("running",))
        queued = [client.trigger("greedy", toy(8), FAST) for _ in range(2)]
        assert [r.status_code for r in queued] == [202, 202]
        over = client.trigger("greedy", toy(8), FAST)
        assert over.status_code == 429 and over.headers["Retry-After"] == "60"
        error = over.json()["error"]
        assert error == {
            "code": "community_queue_full",
            "message": COMMUNITY_QUEUE_FULL.format(community="greedy", limit=2),
            "field": "communityId",
        }
        assert "DPO_MAX_QUEUED_PER_COMMUNITY" in error["message"]
        other = client.trigger("modest", toy(8), FAST)
        assert other.status_code == 202  # another community still queues
        for job_id in [running, other.json()["job_id"], *(r.json()["job_id"] for r in queued)]:
            client.post(f"/jobs/{job_id}/cancel")
        wait_for(client, running)


def test_metrics_labels_stay_bounded_under_made_up_methods_and_paths(server, client):
    methods = ["PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "SEARCH", "PURGE", "REPORT", "MKACTIVITY"]
    for i, method in enumerate(methods * 4):
        httpx.request(method, f"{server.url}/made-up-{i}")
    text = httpx.get(server.url + "/metrics").text
    assert not any(f'method="{m}"' in text for m in methods) and "made-up-1" not in text
    assert 'method="other"' in text


def test_metrics_are_prometheus_text(server, client):
    text = httpx.get(server.url + "/metrics").text
    for name in (
        'dpo_jobs{state="succeeded"}',
        "dpo_queue_depth",
        "dpo_job_duration_seconds_bucket",
        "dpo_http_request_duration_seconds_bucket",
        "dpo_training_tokens_per_second",
    ):
        assert name in text, name


def test_callback_is_signed_and_carries_the_final_record(server, client, toy):
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{hook.server_port}/done"
        response = client.post(
            "/trigger-finetune", {"communityId": "callback", "dataset": toy(8), "config": FAST, "callbackUrl": url}
        )
        job_id = response.json()["job_id"]
        wait_for(client, job_id)
        deadline = time.time() + 30
        while not received and time.time() < deadline:
            time.sleep(0.1)
        headers, body = received[0]
        assert headers["webhook-id"] == f"msg_{job_id}"
        assert headers["webhook-signature"] == sign_webhook(
            server.callback_secret, headers["webhook-id"], int(headers["webhook-timestamp"]), body
        )
        assert HEADER not in headers  # a callback can never pass as a request to the service
        record = json.loads(body)
        assert record["job_id"] == job_id and record["status"] == "succeeded" and record["artifact"]["uri"]
        events = client.get(f"/jobs/{job_id}/events").json()["events"]
        assert [e["data"] for e in events if e["kind"] == "callback"] == [
            {"attempt": 1, "result": "HTTP 204", "outcome": "delivered"}
        ]
    finally:
        hook.shutdown()


class Receiver:
    """A callback receiver on loopback answering `status` (changeable), recording what it gets."""

    def __init__(self, status: int = 204, port: int = 0):
        received, self.status = [], status
        outer = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.received = received
        self.http = HTTPServer(("127.0.0.1", port), Hook)
        self.url = f"http://127.0.0.1:{self.http.server_port}/done"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def callback_events(client, job_id, want: int, timeout_s: float = 30) -> list[dict]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = [e["data"] for e in client.get(f"/jobs/{job_id}/events").json()["events"] if e["kind"] == "callback"]
        if len(found) >= want:
            return found
        time.sleep(0.1)
    raise AssertionError(f"fewer than {want} callback events for job {job_id}: {found}")


def test_a_callback_answered_with_a_4xx_is_not_retried(server, client, toy):
    receiver = Receiver(status=400)
    try:
        payload = {"communityId": "cb-400", "dataset": toy(8), "config": FAST, "callbackUrl": receiver.url}
        job_id = client.post("/trigger-finetune", payload).json()["job_id"]
        wait_for(client, job_id)
        assert callback_events(client, job_id, 1) == [{"attempt": 1, "result": "HTTP 400", "outcome": "gave_up"}]
        time.sleep(2)
        assert len(receiver.received) == 1
    finally:
        receiver.close()


class Trickler:
    """A receiver that reads the request, then answers one byte every 0.5 s for `seconds`."""

    def __init__(self, seconds: float = 30):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/slow"
        self.trickling = threading.Event()
        self.seconds = seconds
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(65536)
            self.trickling.set()
            deadline = time.monotonic() + self.seconds
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while time.monotonic() < deadline:
                    conn.sendall(b"X")
                    time.sleep(0.5)
            except OSError:
                pass  # the sender gave up and closed the connection
            finally:
                self.trickling.clear()

    def close(self):
        self.sock.close()


def test_a_trickling_receiver_is_cut_off_at_the_deadline_and_holds_up_no_other(tmp_path, toy):
    """DPO_CALLBACK_TIMEOUT_S used to be a per-read timeout, and one thread delivered every
    callback: a receiver answering a byte every 0.5 s delayed every other job's callback. Now
    each attempt has the whole timeout, and receivers are delivered to concurrently."""
    env = {"DPO_CALLBACK_ALLOWED_HOSTS": "127.0.0.1", "DPO_CALLBACK_RETRIES": "1", "DPO_CALLBACK_TIMEOUT_S": "2"}
    slow, fast = Trickler(seconds=60), Receiver()
    try:
        with Server(tmp_path, env=env) as srv:
            client = Client(srv.url, srv.secret)
            jobs = {}
            for name, url in (("cb-slow", slow.url), ("cb-fast", fast.url)):
                payload = {"communityId": name, "dataset": toy(8), "config": FAST, "callbackUrl": url}
                jobs[name] = wait_for(client, client.post("/trigger-finetune", payload).json()["job_id"])["job_id"]
            # within 40 s, while the trickle would go on for 60: it holds up neither callback
            assert callback_events(client, jobs["cb-fast"], 1, timeout_s=40)[0]["outcome"] == "delivered"
            gave_up = callback_events(client, jobs["cb-slow"], 1, timeout_s=40)[0]
            assert gave_up == {"attempt": 1, "result": "no answer within 2 s", "outcome": "gave_up"}, gave_up
    finally:
        slow.close()
        fast.close()


def test_callbacks_survive_a_restart(tmp_path, toy):
    """The receiver is down when the job ends; the server restarts; the callback still arrives."""
    env = {"DPO_CALLBACK_ALLOWED_HOSTS": "127.0.0.1", "DPO_CALLBACK_RETRIES": "20"}
    port = free_port()
    srv = Server(tmp_path, env=env)
    with srv:
        client = Client(srv.url, srv.secret)
        payload = {
            "communityId": "cb-later",
            "dataset": toy(8),
            "config": FAST,
            "callbackUrl": f"http://127.0.0.1:{port}/done",
        }
        job_id = client.post("/trigger-finetune", payload).json()["job_id"]
        wait_for(client, job_id)
        first = callback_events(client, job_id, 1)[0]
        assert first["outcome"] == "retrying" and first["result"] == "ConnectError"
    receiver = Receiver(port=port)
    try:
        again = Server(tmp_path, env=env, secret=srv.secret)
        again.callback_secret = srv.callback_secret
        again.env["DPO_CALLBACK_SECRET"] = srv.callback_secret
        with again:
            events = callback_events(Client(again.url, again.secret), job_id, 2, timeout_s=60)
            delivered = [e for e in events if e["outcome"] == "delivered"]
            assert delivered and json.loads(receiver.received[-1])["job_id"] == job_id
    finally:
        receiver.close()


def test_a_callback_url_needs_a_callback_secret(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("no-callback-secret"), env={"DPO_CALLBACK_ALLOWED_HOSTS": "127.0.0.1"})
    del srv.env["DPO_CALLBACK_SECRET"]
    with srv:
        payload = {"communityId": "c", "dataset": toy_pair(), "callbackUrl": "http://127.0.0.1:9/x"}
        response = Client(srv.url, srv.secret).post("/trigger-finetune", payload)
        assert response.status_code == 422 and response.json()["error"]["message"] == CALLBACK_NEEDS_SECRET


def toy_pair() -> list[dict]:
    return [{"prompt": "p", "chosen": "a", "rejected": "b"}]


# -- process lifecycle --------------------------------------------------------------------------
def test_refuses_to_start_without_a_secret(tmp_path):
    srv = Server(tmp_path)
    del srv.env["DPO_WEBHOOK_SECRET"]
    with pytest.raises(RuntimeError, match="server exited"):
        srv.start(timeout_s=30)
    assert "DPO_WEBHOOK_SECRET is not set: refusing to start" in srv.log_tail()


def test_an_idempotency_ttl_shorter_than_a_signature_lives_is_refused_at_start(tmp_path):
    """Issue 24.6: with keys forgotten before a captured trigger goes stale, the trigger re-sent
    with its key would make a second job; the server refuses such settings in one line."""
    from core.settings import Settings

    srv = Server(tmp_path, env={"DPO_IDEMPOTENCY_TTL_S": "3"})
    with pytest.raises(RuntimeError, match="server exited"):
        srv.start(timeout_s=30)
    expected = (
        "invalid settings, refusing to start: DPO_IDEMPOTENCY_TTL_S (3 s) must be at least twice"
        " DPO_SIGNATURE_TOLERANCE_S (300 s): a captured trigger stays valid that long, and an"
        " Idempotency-Key forgotten sooner lets it make a second job"
    )
    assert srv.log_tail(n=1) == expected and "Traceback" not in srv.log_tail()
    with pytest.raises(ValueError, match="at least twice DPO_SIGNATURE_TOLERANCE_S"):
        Settings(idempotency_ttl_s=599, signature_tolerance_s=300)  # a t 300 s ahead lives 600 s
    assert Settings(idempotency_ttl_s=20, signature_tolerance_s=10).idempotency_ttl_s == 20


def test_allow_unsigned_starts_with_a_loud_warning(tmp_path):
    srv = Server(tmp_path, env={"DPO_ALLOW_UNSIGNED": "1"})
    del srv.env["DPO_WEBHOOK_SECRET"]
    with srv:
        assert httpx.get(srv.url + "/jobs").status_code == 200
    assert "DPO_ALLOW_UNSIGNED=1: requests are NOT authenticated" in srv.log_tail()


def test_restart_after_a_crash_runs_the_job_again(tmp_path, toy):
    srv = Server(tmp_path, env={"DPO_CHECKPOINT_EVERY": "0"})
    srv.start()
    client = Client(srv.url, srv.secret)
    job_id = client.trigger("crash", toy(64), {"epochs": 10}).json()["job_id"]
    wait_for(client, job_id, states=("running",), step_at_least=1)
    srv.stop(sig=signal.SIGKILL)
    assert any((tmp_path / "data" / "work").iterdir())  # the crash left its working directory
    with Server(tmp_path, secret=srv.secret) as restarted:
        client = Client(restarted.url, restarted.secret)
        job = wait_for(client, job_id)
        states = [e["data"] for e in client.get(f"/jobs/{job_id}/events").json()["events"] if e["kind"] == "state"]
    assert job["status"] == "succeeded", job["error"]
    assert {
        "status": "running",
        "reason": "restarting from the beginning after an interruption (no checkpoint)",
    } in states


def test_sigterm_checkpoints_the_running_job_and_the_next_start_resumes_it(tmp_path, toy):
    srv = Server(tmp_path)
    srv.start()
    client = Client(srv.url, srv.secret)
    job_id = client.trigger("term", toy(256), {"epochs": 4}).json()["job_id"]
    wait_for(client, job_id, states=("running",), step_at_least=3)
    started = time.time()
    srv.stop(sig=signal.SIGTERM)
    assert time.time() - started < 30
    assert (tmp_path / "data" / "checkpoints" / job_id / "checkpoint").exists()
    with Server(tmp_path, secret=srv.secret) as again:
        client = Client(again.url, again.secret)
        job = wait_for(client, job_id)
        events = client.get(f"/jobs/{job_id}/events").json()["events"]
    assert job["status"] == "succeeded", job["error"]
    reasons = [e["data"].get("reason") for e in events if e["kind"] == "state"]
    assert SHUTDOWN_REQUEUE in reasons
    assert [e["data"]["step"] for e in events if e["kind"] == "resumed"][0] >= 3


# -- the subprocess path ------------------------------------------------------------------------
def swapped(records: list[dict]) -> list[dict]:
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in records]


@pytest.mark.parametrize("mode", ["inprocess", "subprocess"])
def test_a_jobs_validation_records_are_its_held_out_set(tmp_path, toy, mode):
    """Held-out records given with the trigger (here preferring the opposite of the training
    data) are what the job evaluates on, in either trainer path; subprocess mode trains end to end."""
    with Server(tmp_path, env={"DPO_RUNNER_MODE": mode}) as srv:
        client = Client(srv.url, srv.secret)
        payload = {"communityId": "held", "dataset": toy(64), "validation": swapped(toy(16, seed=4))}
        job = wait_for(client, client.post("/trigger-finetune", {**payload, "config": {"epochs": 2}}).json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["runner"] == mode and job["progress"]["percent"] == 100.0
    assert (artifact_path(job) / "model.safetensors").exists()
    assert job["final_eval"]["eval/rewards/accuracies"] <= 0.1, job["final_eval"]
    saved = json.loads((artifact_path(job) / "metrics.json").read_text())
    assert saved["dataset"]["validation_pairs"] == 16 and saved["total_steps"] == 2 * 64 // 8


def test_a_communitys_validation_file_beside_its_records_is_its_held_out_set(tmp_path, toy):
    """A source job (no inline dataset) evaluates on `<communityId>.validation.jsonl` when the
    local source keeps one; a broken held-out record fails the job naming its line."""
    prefs = tmp_path / "preferences"
    prefs.mkdir()
    write = lambda name, records: (prefs / name).write_text("".join(json.dumps(r) + "\n" for r in records))  # noqa: E731
    write("kept.jsonl", toy(64))
    write("kept.validation.jsonl", swapped(toy(16, seed=4)))
    write("broken.jsonl", toy(16))
    write("broken.validation.jsonl", [{"prompt": "p", "chosen": "a"}])
    with Server(tmp_path) as srv:
        client = Client(srv.url, srv.secret)
        job_id = client.trigger("kept", config={"epochs": 2}).json()["job_id"]
        job = wait_for(client, job_id)
        events = client.get(f"/jobs/{job_id}/events").json()["events"]
        broken = wait_for(client, client.trigger("broken", config=FAST).json()["job_id"])
    assert job["status"] == "succeeded", job["error"]
    assert [e["data"] for e in events if e["kind"] == "data"] == [
        {"records": 64, "pairs": 64, "validation_records": 16}
    ]
    assert job["final_eval"]["eval/rewards/accuracies"] <= 0.1, job["final_eval"]
    assert broken["status"] == "failed" and "broken.validation.jsonl:0" in broken["error"]["message"], broken


def test_falls_back_to_a_subprocess_when_the_in_process_trainer_cannot_import(tmp_path, toy):
    # A broken `torch` shadows the real one in the server process only (not a mock of our code:
    # the import genuinely fails); the subprocess gets a clean PYTHONPATH and trains for real.
    broken = tmp_path / "broken"
    (broken / "torch").mkdir(parents=True)
    (broken / "torch" / "__init__.py").write_text("raise ImportError('simulated broken CUDA build')\n")
    srv = Server(tmp_path / "srv")
    srv.env["PYTHONPATH"] = f"{broken}{os.pathsep}{srv.env['PYTHONPATH']}"
    with srv:
        client = Client(srv.url, srv.secret)
        job_id = client.trigger("fallback", toy(64), {"epochs": 2}).json()["job_id"]
        job = wait_for(client, job_id)
        assert job["status"] == "succeeded", job["error"]
        warnings = [e for e in client.get(f"/jobs/{job_id}/events").json()["events"] if e["kind"] == "warning"]
        assert "simulated broken CUDA build" in warnings[0]["data"]["message"]


def test_subprocess_cancel_terminates_the_training_process(tmp_path, toy):
    with Server(tmp_path, env={"DPO_RUNNER_MODE": "subprocess"}) as srv:
        client = Client(srv.url, srv.secret)
        job_id = client.trigger("subcancel", toy(256), {"epochs": 20}).json()["job_id"]
        wait_for(client, job_id, states=("running",), step_at_least=2)
        client.post(f"/jobs/{job_id}/cancel")
        job = wait_for(client, job_id, timeout_s=60)
        assert job["status"] == "cancelled" and job["artifact"] is None
        assert not (tmp_path / "data" / "work" / job_id).exists()


# -- models the operator chooses ---------------------------------------------------------------
def test_allowed_local_paths_match_however_they_are_spelled():
    """A trailing slash, `./` or a doubled separator does not make an allowed local path another
    model (the operator's spelling is what trains); `..` is not folded (through a symlink it leads
    elsewhere), and hub ids compare as given."""
    from core.errors import Invalid
    from core.job_config import resolve_model
    from core.settings import Settings

    settings = Settings(_env_file=None, allowed_models="/models/x, ./local/m/, org/hub", default_model="/srv/base/")
    for asked, chosen in (
        ("/models/x/", "/models/x"),
        ("/models//x", "/models/x"),
        ("/models/./x/", "/models/x"),
        ("./local/m", "./local/m/"),
        ("local//m", "./local/m/"),
        ("/srv/base", "/srv/base/"),
        (None, "/srv/base/"),
        ("org/hub", "org/hub"),
        ("tiny", None),
    ):
        assert resolve_model(asked, settings)[1] == chosen, asked
    for refused in ("/models/y/../x", "/models/x2", "org/hub/", "Org/hub", "local/m"):
        with pytest.raises(Invalid, match="or a model in DPO_ALLOWED_MODELS"):
            resolve_model(refused, settings)


def test_default_and_allowed_models_train_with_the_custom_preset(tmp_path_factory, toy, tiny_model_path):
    """DPO_DEFAULT_MODEL trains when a trigger names no model; DPO_ALLOWED_MODELS lists what a
    caller may name besides the presets. Both go through the `custom` preset, here on the tiny
    model's local path: its precision and checkpointing are `auto`, so on this CPU the job trains
    in fp32 without checkpointing (bf16-mixed with checkpointing on a bf16 GPU), and says so in
    metrics.json and training_config.yaml."""
    root = tmp_path_factory.mktemp("models")
    env = {"DPO_DEFAULT_MODEL": str(tiny_model_path), "DPO_ALLOWED_MODELS": "org/other-model, /models/mine"}
    with Server(root, env=env) as srv:
        client = Client(srv.url, srv.secret)
        response = client.trigger("default-model", toy(24), {"epochs": 1, "max_length": 96})
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["job_id"])
        assert job["status"] == "succeeded", job["error"]
        metrics = json.loads((artifact_path(job) / "metrics.json").read_text())
        assert metrics["model"]["name_or_path"] == str(tiny_model_path)
        assert metrics["model"]["precision"] == "fp32" and metrics["model"]["gradient_checkpointing"] is False
        assert metrics["layout"]["layout"] == "shared_prefix"
        saved = yaml.safe_load((artifact_path(job) / "training_config.yaml").read_text())
        assert saved["data"] == {**saved["data"], "max_length": 96, "max_prompt_length": 48}  # room for answers
        assert saved["train"]["learning_rate"] == 1e-6
        assert (saved["train"]["precision"], saved["train"]["gradient_checkpointing"]) == ("fp32", False)
        assert job["hyperparameters"]["train"]["precision"] == "auto"  # composed at the trigger, resolved in training

        refused = client.trigger("c", toy(4), {"model": "org/not-allowed"})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "config.model"
        assert "got 'org/not-allowed'" in refused.json()["error"]["message"]
        allowed = client.trigger("allowed", toy(4), {"model": "org/other-model"})
        assert allowed.status_code == 202  # queued; it fails later only because nothing can be downloaded here
        config = client.get(f"/jobs/{allowed.json()['job_id']}").json()["config"]
        assert config["model"] == "custom" and config["values"]["model.name_or_path"] == "org/other-model"
