"""The Firebase backend against the real Cloud Firestore emulator and fake-gcs-server (no mocks
of Firestore or Cloud Storage): preferences from Firestore, artifacts in the bucket with a
manifest written last, the job mirror, and storage failures."""

from __future__ import annotations

import json
import threading
import time
import tracemalloc

import httpx
import pytest
import torch

from core.settings import Settings
from storage.firebase import FirebaseArtifactStore, FirebaseClients, FirestorePreferenceSource
from tests.service_helpers import wait_for
from tools.download_artifact import DownloadError, download
from tools.emulators import BUCKET
from tools.seed_firestore import seed
from tools.serve import Server
from tools.trigger import Client

pytestmark = pytest.mark.emulators


def clients_for(env) -> FirebaseClients:
    return FirebaseClients(env["DPO_FIREBASE_PROJECT_ID"], env["DPO_FIREBASE_STORAGE_BUCKET"], None)


def firebase_server(root, env, **extra):
    return Server(root, env={**env, "DPO_STORAGE_BACKEND": "firebase", **extra})


@pytest.fixture(scope="module")
def fb_server(emulators, tmp_path_factory):
    with firebase_server(tmp_path_factory.mktemp("fb"), emulators.env) as srv:
        yield srv


@pytest.fixture
def own_emulators(tmp_path, monkeypatch):
    """Emulators of this test alone (it stops one of them), their variables in the environment."""
    from tools.emulators import Emulators

    with Emulators(tmp_path / "emu") as emu:
        for key, value in emu.env.items():
            monkeypatch.setenv(key, value)
        yield emu


def blob_names(env, prefix=""):
    return sorted(b.name for b in clients_for(env).bucket().list_blobs(prefix=prefix))


def eval_logps_of(model, tokenizer, records, ids, cfg_seed=42):
    """Recompute the held-out mean chosen log-prob the way the trainer split and scored it."""
    from training.batching import collate
    from training.logprobs import model_logps
    from training.loop import split_train_eval
    from training.records import normalise_records
    from training.tokenize import tokenize_pairs

    pairs, _ = normalise_records(records, ids=ids)
    examples = tokenize_pairs(tokenizer, pairs, 128, 64, "keep_end", chat_template="auto")  # the default, as trained
    _, eval_idx = split_train_eval(len(examples), 0.1, 256, cfg_seed)
    batch = collate([examples[i] for i in eval_idx], tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, _, _ = model_logps(model.eval(), batch)
    return chosen.mean().item()


@pytest.mark.parametrize("fmt, lora", [("pairs", False), ("ranked", False), ("chat", True)])
def test_trigger_without_dataset_trains_from_firestore(fb_server, firebase_env, toy, tmp_path, fmt, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    community = f"fs-{fmt}"
    settings = Settings()
    clients = clients_for(firebase_env)
    seed(clients, settings.firestore_preferences_path.format(communityId=community), toy(64, fmt))
    client = Client(fb_server.url, fb_server.secret)
    job_id = client.trigger(
        community, config={"epochs": 2, "lora": lora, "learning_rate": 3e-3 if lora else 5e-4}
    ).json()["job_id"]
    job = wait_for(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["source"] == "firestore" and job["records"] == 64
    prefix = f"policies/{community}/{job_id}/"
    assert job["artifact"]["uri"] == f"gs://{BUCKET}/{prefix}"
    names = blob_names(firebase_env, prefix)
    assert prefix + "manifest.json" in names
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert prefix + weights in names
    blob = clients.bucket().get_blob(prefix + "metrics.json")
    assert blob.content_type == "application/json"

    out = tmp_path / "download"
    manifest = download(clients, settings, job_id, out)  # community found through the job mirror
    assert manifest["job_id"] == job_id and {f["path"] for f in manifest["files"]} == set(job["artifact"]["files"]) - {
        "manifest.json"
    }
    tokenizer = AutoTokenizer.from_pretrained(out)
    if lora:
        from peft import PeftModel

        adapter_cfg = json.loads((out / "adapter_config.json").read_text())
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"]), out
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    source = FirestorePreferenceSource(clients, settings.firestore_preferences_path)
    records, ids = source.fetch(community)
    want = job["final_eval"]["eval/logps/chosen"]
    assert eval_logps_of(model, tokenizer, records, ids) == pytest.approx(want, abs=1e-4)


def test_ten_thousand_documents_stream_in_pages_and_are_all_counted(firebase_env):
    settings = Settings()
    clients = clients_for(firebase_env)
    path = settings.firestore_preferences_path.format(communityId="big")
    record = {"prompt": "Can you help me?", "chosen": "Of course, glad to help.", "rejected": "No."}
    assert seed(clients, path, [record] * 10_000) == 10_000
    source = FirestorePreferenceSource(clients, settings.firestore_preferences_path, page_size=1000)
    tracemalloc.start()
    count = sum(1 for _ in source.iter_documents("big"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 10_000
    assert source.pages_read == 11  # 10 full pages and the empty one that ends the stream
    assert peak < 40 * 1024 * 1024, f"streaming held {peak / 2**20:.1f} MiB at once"
    records, ids = source.fetch("big")
    assert len(records) == len(ids) == 10_000 and ids[0] == "document 00000000"
    limited, _ = source.fetch("big", limit=2500)
    assert len(limited) == 2500


def test_since_filters_on_created_at(firebase_env):
    import datetime as dt

    settings = Settings()
    clients = clients_for(firebase_env)
    path = settings.firestore_preferences_path.format(communityId="dated")
    old = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    new = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    base = {"prompt": "p", "chosen": "a", "rejected": "b"}
    seed(clients, path, [{**base, "createdAt": old}] * 3 + [{**base, "createdAt": new}] * 2)
    source = FirestorePreferenceSource(clients, settings.firestore_preferences_path)
    records, _ = source.fetch("dated", since=dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    assert len(records) == 2 and records[0]["createdAt"].startswith("2026-01-01")


def test_a_communitys_validation_collection_is_its_held_out_set(fb_server, firebase_env, toy):
    """communities/{id}/validation (DPO_FIRESTORE_VALIDATION_PATH), here preferring the opposite
    of the training data, is what a job reading the community's preferences evaluates on."""
    settings = Settings()
    clients = clients_for(firebase_env)
    seed(clients, settings.firestore_preferences_path.format(communityId="held-fs"), toy(64))
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in toy(16, seed=4)]
    seed(clients, settings.firestore_validation_path.format(communityId="held-fs"), flipped)
    client = Client(fb_server.url, fb_server.secret)
    job_id = client.trigger("held-fs", config={"epochs": 2}).json()["job_id"]
    job = wait_for(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    events = client.get(f"/jobs/{job_id}/events").json()["events"]
    assert [e["data"] for e in events if e["kind"] == "data"] == [
        {"records": 64, "pairs": 64, "validation_records": 16}
    ]
    assert job["final_eval"]["eval/rewards/accuracies"] <= 0.1, job["final_eval"]
    source = FirestorePreferenceSource(clients, settings.firestore_preferences_path)  # no validation path: none
    assert source.validation("held-fs") is None


def test_malformed_documents_fail_the_job_naming_their_ids(fb_server, firebase_env):
    settings = Settings()
    db = clients_for(firebase_env).firestore()
    collection = db.collection(settings.firestore_preferences_path.format(communityId="broken"))
    collection.document("good-1").set({"prompt": "p", "chosen": "a", "rejected": "b"})
    collection.document("bad-doc-7").set({"prompt": "p", "chosen": 42, "rejected": "b"})
    client = Client(fb_server.url, fb_server.secret)
    job = wait_for(client, client.trigger("broken").json()["job_id"])
    assert job["status"] == "failed" and job["error"]["type"] == "invalid_data"
    assert "record document bad-doc-7: field 'chosen': expected a string, got int" in job["error"]["message"]


def test_empty_community_fails_clearly(fb_server, firebase_env):
    client = Client(fb_server.url, fb_server.secret)
    job = wait_for(client, client.trigger("ghost-town").json()["job_id"])
    assert job["status"] == "failed" and job["error"]["type"] == "source_error"
    assert job["error"]["message"] == (
        "no preference records for community 'ghost-town' (Firestore collection communities/ghost-town/preferences is empty)"
    )
    assert blob_names(firebase_env, "policies/ghost-town/") == []


def test_job_mirror_goes_queued_running_succeeded_with_progress(fb_server, firebase_env, toy):
    client = Client(fb_server.url, fb_server.secret)
    db = clients_for(firebase_env).firestore()
    seen: list[tuple[str, str, int]] = []
    errors: list[str] = []
    listening = threading.Event()

    def on_snapshot(docs, changes, read_time):
        try:
            for doc in docs:
                data = doc.to_dict()
                seen.append((doc.id, data["status"], data["progress"]["step"]))
        except Exception as err:  # raised here, it would end the watch silently
            errors.append(repr(err))
        listening.set()

    watch = db.collection("dpo_jobs").on_snapshot(on_snapshot)  # what the upstream app would do
    try:
        assert listening.wait(30), "the snapshot listener delivered no first snapshot in 30 s"
        blocker = client.trigger("mirror-blocker", toy(256), {"epochs": 50}).json()["job_id"]
        wait_for(client, blocker, states=("running",), step_at_least=1)
        job_id = client.trigger("mirror", toy(256), {"epochs": 3}).json()["job_id"]  # waits behind the blocker
        time.sleep(1.0)
        client.post(f"/jobs/{blocker}/cancel")
        assert wait_for(client, job_id)["status"] == "succeeded"
        deadline = time.time() + 20
        while time.time() < deadline and not any(j == job_id and s == "succeeded" for j, s, _ in seen):
            time.sleep(0.1)
    finally:
        watch.unsubscribe()
    assert not errors, errors
    states = [s for j, s, _ in seen if j == job_id]
    order = [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]
    assert order == ["queued", "running", "succeeded"], states
    assert any(s == "running" and step > 0 for j, s, step in seen if j == job_id)
    final = db.collection("dpo_jobs").document(job_id).get().to_dict()
    assert final["artifact"]["uri"].startswith("gs://") and final["progress"]["percent"] == 100.0


def test_failed_upload_removes_what_it_wrote(firebase_env, tmp_path, monkeypatch):
    import storage.firebase as fb

    run = tmp_path / "run"
    run.mkdir()
    (run / "a.json").write_text("{}")
    (run / "b.bin").write_bytes(b"x" * 1000)
    real = fb.build_manifest

    def with_a_vanishing_file(*args, **kwargs):  # fault injection: the last file is gone by upload time
        manifest = real(*args, **kwargs)
        manifest["files"].append({"path": "c.safetensors", "size": 1, "sha256": "0"})
        return manifest

    monkeypatch.setattr(fb, "build_manifest", with_a_vanishing_file)
    store = FirebaseArtifactStore(clients_for(firebase_env), "policies/{communityId}/{jobId}/", retry_deadline_s=2)
    with pytest.raises(fb.StorageError, match="could not store the artifact at policies/c/j1/"):
        store.save(run, "c", "j1")
    assert blob_names(firebase_env, "policies/c/") == []


def test_storage_down_mid_run_fails_the_job_and_leaves_no_manifest(tmp_path, toy, own_emulators):
    emu = own_emulators
    env = {**emu.env, "DPO_STORAGE_RETRY_DEADLINE_S": "3"}
    with firebase_server(tmp_path / "srv", env) as srv:
        client = Client(srv.url, srv.secret)
        job_id = client.trigger("unlucky", toy(256), {"epochs": 5}).json()["job_id"]
        wait_for(client, job_id, states=("running",), step_at_least=1)
        emu.stop("gcs")
        ready = httpx.get(srv.url + "/ready").json()
        assert ready["status"] == "unavailable" and ready["checks"]["artifact_store"].startswith(
            "Cloud Storage unreachable"
        )
        job = wait_for(client, job_id, timeout_s=180)
        assert job["status"] == "failed" and job["error"]["type"] == "storage_error"
        assert "could not store the artifact at policies/unlucky/" in job["error"]["message"]
        assert job["artifact"] is None
        assert httpx.get(srv.url + "/health").status_code == 200  # the service itself stays up
        emu.start_gcs()  # same port and filesystem root: what was written survived the restart
        assert blob_names(emu.env, f"policies/unlucky/{job_id}/manifest.json") == []
        with pytest.raises(DownloadError, match="the artifact is missing or incomplete"):
            download(clients_for(emu.env), Settings(), job_id, tmp_path / "dl", "unlucky")


def test_firestore_down_fails_source_jobs_clearly_but_inline_jobs_and_the_service_go_on(tmp_path, toy, own_emulators):
    emu = own_emulators
    with firebase_server(tmp_path / "srv", {**emu.env, "DPO_STORAGE_RETRY_DEADLINE_S": "3"}) as srv:
        client = Client(srv.url, srv.secret)
        emu.stop("firestore")
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["preference_source"].startswith(
            "Firestore unreachable"
        )
        job = wait_for(client, client.trigger("needs-firestore").json()["job_id"], timeout_s=120)
        assert job["status"] == "failed" and job["error"]["type"] == "source_error"
        assert job["error"]["message"].startswith(
            "could not read Firestore collection communities/needs-firestore/preferences"
        )
        # the job mirror cannot write either: logged and retried, never fatal to training
        inline = wait_for(client, client.trigger("inline-ok", toy(32), {"epochs": 1}).json()["job_id"], timeout_s=120)
        assert inline["status"] == "succeeded", inline["error"]
        assert blob_names(emu.env, f"policies/inline-ok/{inline['job_id']}/manifest.json")
        assert httpx.get(srv.url + "/health").status_code == 200
    assert "job mirror write for" in srv.log_tail(200)


def test_cloud_storage_back_within_the_retry_deadline_lets_the_job_succeed(tmp_path, toy, own_emulators):
    emu = own_emulators
    with firebase_server(tmp_path / "srv", {**emu.env, "DPO_STORAGE_RETRY_DEADLINE_S": "60"}) as srv:
        client = Client(srv.url, srv.secret)
        job_id = client.trigger("flaky", toy(256), {"epochs": 3}).json()["job_id"]
        wait_for(client, job_id, states=("running",), step_at_least=1)
        emu.stop("gcs")  # down while the job trains...
        wait_for(client, job_id, states=("running",), step_at_least=87)  # ...and when it starts uploading
        time.sleep(2)
        emu.start_gcs()  # back: the upload's retries get through
        job = wait_for(client, job_id, timeout_s=120)
        assert job["status"] == "succeeded", job["error"]
        assert blob_names(emu.env, f"policies/flaky/{job_id}/manifest.json")


@pytest.mark.parametrize(
    "info, kind",
    [
        (  # `gcloud auth application-default login`
            {"type": "authorized_user", "client_id": "id", "client_secret": "s", "refresh_token": "r"},
            "google.oauth2.credentials.Credentials",
        ),
        (  # workload identity federation
            {
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": "https://sts.googleapis.com/v1/token",
                "credential_source": {"file": "TOKEN_FILE"},
            },
            "google.auth.identity_pool.Credentials",
        ),
    ],
)
def test_any_credential_file_googles_libraries_take_is_accepted(tmp_path, info, kind):
    """Not only service-account keys (firebase_admin's Certificate): nothing here reaches Google."""
    from firebase_admin import credentials

    from storage.firebase import file_credential

    (tmp_path / "token").write_text("a-subject-token")
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(info).replace("TOKEN_FILE", str(tmp_path / "token")))
    credential = file_credential(str(path))
    assert isinstance(credential, credentials.Base)
    loaded = credential.get_credential()
    assert f"{type(loaded).__module__}.{type(loaded).__qualname__}" == kind


def test_an_unusable_credential_file_is_named_in_the_error(tmp_path):
    from storage.base import StorageError
    from storage.firebase import file_credential

    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"type": "something_else"}))
    with pytest.raises(StorageError, match=f"DPO_FIREBASE_CREDENTIALS \\({path}\\)"):
        file_credential(str(path))


@pytest.mark.parametrize("name", ["../escaped.txt", "/tmp/absolute.txt", "a/../../escaped.txt", ""])
def test_a_download_writes_nothing_outside_out_and_keeps_no_file_that_fails_its_sha256(firebase_env, tmp_path, name):
    """The manifest is data from the bucket: an entry "../x" or an absolute path used to be
    written where it pointed, and a file whose sha256 did not match stayed behind."""
    import hashlib

    clients, settings = clients_for(firebase_env), Settings()
    job_id, community = "a" * 32, "hostile"
    prefix = settings.artifacts_prefix.format(communityId=community, jobId=job_id)
    bucket = clients.bucket()

    def publish(files: list[dict]) -> None:
        bucket.blob(prefix + "manifest.json").upload_from_string(json.dumps({"job_id": job_id, "files": files}))

    bucket.blob(prefix + name).upload_from_string(b"payload")
    publish([{"path": name, "sha256": hashlib.sha256(b"payload").hexdigest()}])
    out = tmp_path / "sub" / "out"
    with pytest.raises(DownloadError, match=r"manifest entry .*(not a relative path|resolves outside)"):
        download(clients, settings, job_id, out, community)
    assert not (tmp_path / "sub" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not any(out.rglob("*"))

    bucket.blob(prefix + "weights.bin").upload_from_string(b"tampered")
    publish([{"path": "weights.bin", "sha256": hashlib.sha256(b"original").hexdigest()}])
    with pytest.raises(DownloadError, match="weights.bin: sha256 .* does not match"):
        download(clients, settings, job_id, out, community)
    assert not any(out.rglob("*"))  # neither the file nor its partial download
