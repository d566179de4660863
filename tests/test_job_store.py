"""The job-store interface (core/store.py), one set of tests run against both implementations:
SQLite, and Firestore on the real emulator (fake-gcs-server for large datasets). No mocks."""

from __future__ import annotations

import json
import threading
import time

import pytest

from core.schemas import job_view
from core.store import (
    ActiveJobConflict,
    BadCursor,
    CommunityQueueFull,
    Finish,
    IdempotencyConflict,
    JobFinished,
    NewJob,
    QueueFull,
    split_stored,
)

A, B = "replica-a", "replica-b"


@pytest.fixture(params=["sqlite", pytest.param("firestore", marks=pytest.mark.emulators)])
def store(request, tmp_path):
    if request.param == "sqlite":
        from core.jobs import SqliteJobStore

        store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    else:
        from core.firestore_jobs import FirestoreJobStore
        from storage.firebase import FirebaseClients

        env = request.getfixturevalue("firebase_env")
        store = FirestoreJobStore(
            FirebaseClients(env["DPO_FIREBASE_PROJECT_ID"], env["DPO_FIREBASE_STORAGE_BUCKET"], None)
        )
    yield store
    store.close()


def new(store, community="c", **kwargs):
    job, created = store.create(NewJob(community, {"model": "tiny"}, "inline", **kwargs))
    assert created
    return job


def test_create_get_and_list_newest_first_in_pages(store):
    ids = [new(store, f"c{i}").id for i in range(5)]
    assert store.get(ids[0]).status == "queued" and store.get("0" * 32) is None
    seen, cursor = [], None
    while True:
        page, cursor = store.list(limit=2, cursor=cursor)
        seen += [job.id for job in page]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert [j.id for j in store.list(community_id="c3")[0]] == [ids[3]]
    assert store.counts_by_status()["queued"] == 5
    with pytest.raises(BadCursor):
        store.list(cursor="f" * 32)


def test_one_active_job_per_community_until_it_ends(store):
    first = new(store, "busy", one_per_community=True)
    with pytest.raises(ActiveJobConflict) as err:
        new(store, "busy", one_per_community=True)
    assert err.value.job_id == first.id
    claimed = store.claim_next(A, 30, "inprocess")
    store.finish(claimed.id, A, Finish("failed", error_type="x", error_message="y"))
    assert new(store, "busy", one_per_community=True).id != first.id


def test_idempotency_key_answers_its_job_refuses_another_body_and_expires(store):
    first = new(store, idempotency_key="k", body_sha256="b", idempotency_ttl_s=60)
    again, created = store.create(NewJob("c", {}, "inline", idempotency_key="k", body_sha256="b", idempotency_ttl_s=60))
    assert not created and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.create(NewJob("c", {}, "inline", idempotency_key="k", body_sha256="other", idempotency_ttl_s=60))
    later, created_later = store.create(
        NewJob("c", {}, "inline", idempotency_key="k", body_sha256="b", idempotency_ttl_s=0)
    )
    assert created_later and later.id != first.id


def test_queue_limit(store):
    new(store, "q1")
    with pytest.raises(QueueFull):
        new(store, "q2", max_queued=1)


def test_a_community_queues_at_most_its_share(store):
    """Issue 24.11: one community's queued jobs are capped (running ones do not count)."""
    rules = {"max_queued": 100, "max_queued_per_community": 2}
    first = new(store, "greedy", **rules)
    new(store, "greedy", **rules)
    with pytest.raises(CommunityQueueFull):
        new(store, "greedy", **rules)
    new(store, "other", **rules)  # another community still queues
    assert store.claim_next(A, 30, "inprocess").id == first.id  # running now: a place frees up
    new(store, "greedy", **rules)
    with pytest.raises(CommunityQueueFull):
        new(store, "greedy", **rules)


def test_claim_takes_the_oldest_and_the_lease_is_its_owners(store):
    first, second = new(store, "one"), new(store, "two")
    claimed = store.claim_next(A, 30, "inprocess")
    assert (claimed.id, claimed.status, claimed.lease_owner, claimed.attempts) == (first.id, "running", A, 0)
    assert claimed.lease_until > time.time() + 20
    assert store.claim_next(B, 30, "inprocess").id == second.id
    assert store.claim_next(B, 30, "inprocess") is None
    assert store.renew(first.id, A, 30).held and not store.renew(first.id, B, 30).held
    assert store.finish(first.id, B, Finish("succeeded")) is None  # not B's to finish
    assert not store.requeue(first.id, B, "no")
    assert store.requeue(first.id, A, "shutdown")
    assert store.get(first.id).status == "queued" and store.get(first.id).lease_owner is None


def test_an_expired_lease_is_taken_over_and_the_old_owner_can_no_longer_write(store):
    job = new(store)
    store.claim_next(A, 2, "inprocess")
    assert store.claim_next(B, 30, "inprocess") is None  # A's lease still runs
    time.sleep(2.2)
    taken = store.claim_next(B, 30, "inprocess")
    assert (taken.id, taken.lease_owner, taken.attempts) == (job.id, B, 1)
    assert not store.renew(job.id, A, 30).held
    assert store.finish(job.id, A, Finish("succeeded")) is None
    done = store.finish(
        job.id, B, Finish("succeeded", artifact_uri="gs://x/", artifact_files=["a"], metrics={"m": 1.0})
    )
    assert (done.status, done.artifact_uri, done.artifact_files, done.lease_owner) == (
        "succeeded",
        "gs://x/",
        ["a"],
        None,
    )
    reasons = [e["data"].get("reason") for e in store.events(job.id) if e["kind"] == "state"]
    assert any(r and r.startswith("taken over") for r in reasons)


def test_cancel_a_queued_job_ends_it_a_running_one_is_flagged_for_its_owner(store):
    queued, running = new(store, "q"), new(store, "r")
    cancelled = store.request_cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.error_type == "cancelled"
    store.claim_next(A, 30, "inprocess")
    flagged = store.request_cancel(running.id)
    assert flagged.status == "running" and flagged.cancel_requested
    assert store.renew(running.id, A, 30).cancel_requested
    store.finish(running.id, A, Finish("cancelled", error_type="cancelled", error_message="stopped"))
    with pytest.raises(JobFinished):
        store.request_cancel(running.id)
    assert store.request_cancel("0" * 32) is None


def test_progress_is_visible_after_the_next_renewal(store):
    job = new(store)
    store.claim_next(A, 30, "inprocess")
    store.set_progress(job.id, {"step": 3, "total_steps": 10}, {"loss": 0.5})
    store.renew(job.id, A, 30)
    got = store.get(job.id)
    assert got.progress["step"] == 3 and got.metrics == {"loss": 0.5}


def test_events_are_numbered_in_order(store):
    job = new(store)
    for i in range(5):
        store.add_event(job.id, "note", {"i": i})
    events = store.events(job.id)
    assert [e["seq"] for e in events] == list(range(1, 7))
    assert [e["data"] for e in store.events(job.id, after=2, limit=2)] == [{"i": 1}, {"i": 2}]


@pytest.mark.parametrize("size", [3, 3000])  # 3000 records is ~1.3 MB: past a Firestore document
def test_an_inline_dataset_is_kept_until_the_job_ends(store, size):
    records = [{"prompt": f"p{i} " + "x" * 400, "chosen": "a", "rejected": "b"} for i in range(size)]
    job = new(store, dataset=records)
    assert store.dataset(job.id) == records and store.get(job.id).records == size
    store.claim_next(A, 30, "inprocess")
    store.finish(job.id, A, Finish("succeeded"))
    assert store.dataset(job.id) is None


def test_a_jobs_view_reads_back_whole_from_the_store(store):
    """job_view lifts some config fields to its top level (the Firestore document is the view):
    they come back into the job's config."""
    config = {"model": "tiny", "hyperparameters": {"train": {"batch_size": 4}}, "suffix": "v2", "metadata": {"a": "b"}}
    job = store.create(NewJob("viewed", config, "inline", dataset=[{"prompt": "p", "chosen": "a", "rejected": "b"}]))[0]
    view = job_view(store.get(job.id))
    assert (view["hyperparameters"], view["suffix"], view["metadata"]) == (
        {"train": {"batch_size": 4}},
        "v2",
        {"a": "b"},
    )
    assert view["config"] == {"model": "tiny"}


def test_validation_records_are_kept_with_the_inline_records_or_alone(store):
    records, held_out = (
        [{"prompt": "p", "chosen": "a", "rejected": "b"}],
        [{"prompt": "q", "chosen": "c", "rejected": "d"}],
    )
    with_both = new(store, "both", dataset=records, validation=held_out)
    assert split_stored(store.dataset(with_both.id)) == (records, held_out) and store.get(with_both.id).records == 1
    alone = store.create(NewJob("alone", {"model": "tiny"}, "firestore", validation=held_out))[0]
    assert split_stored(store.dataset(alone.id)) == (None, held_out) and store.get(alone.id).records is None


def test_a_signature_is_accepted_once_unless_repeated_with_its_key(store):
    later = time.time() + 60
    assert store.remember_signature("mac1", later)
    assert not store.remember_signature("mac1", later)
    assert store.remember_signature("mac2", later, "key")
    assert store.remember_signature("mac2", later, "key") and not store.remember_signature("mac2", later, "other")
    assert store.remember_signature("old", time.time() - 1) and store.remember_signature("old", later)  # expired


def test_the_callback_outbox(store):
    job = new(store, callback_url="http://127.0.0.1:9/cb")
    store.claim_next(A, 30, "inprocess")
    store.finish(job.id, A, Finish("succeeded"))
    if not store.shared:  # finished, callback not yet queued: what a crash right here leaves
        assert [j.id for j in store.finished_without_callback()] == [job.id]
        store.enqueue_callback(job.id, job.callback_url, json.dumps({"status": "succeeded"}))
    # Firestore queues it in the transaction that ends the job: no such gap
    store.enqueue_callback(job.id, job.callback_url, '{"x": 2}')  # once per job
    assert store.finished_without_callback() == []
    due = store.due_callbacks(time.time())
    assert [(d["job_id"], d["attempts"]) for d in due] == [(job.id, 0)]
    assert json.loads(due[0]["body"])["status"] == "succeeded"
    store.record_callback_attempt(job.id, "pending", time.time() - 1)
    assert store.due_callbacks(time.time())[0]["attempts"] == 1
    store.record_callback_attempt(job.id, "delivered")
    assert store.due_callbacks(time.time()) == []


def test_concurrent_triggers_make_one_job_per_community_and_per_key(store):
    made, refused = [], []
    lock = threading.Lock()

    def trigger(i):
        try:
            new_job = NewJob(
                f"c{i % 5}",
                {},
                "inline",
                idempotency_key=f"k{i % 10}",
                body_sha256=f"b{i % 10}",
                one_per_community=True,
            )
            job, created = store.create(new_job)
            with lock:
                made.append((job.id, created))
        except ActiveJobConflict:
            with lock:
                refused.append(i)

    threads = [threading.Thread(target=trigger, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    jobs, _ = store.list(limit=100)
    assert len(jobs) == 5 and len({j.community_id for j in jobs}) == 5
    assert len(made) + len(refused) == 40 and sum(created for _, created in made) == 5


def test_a_job_record_is_typed(store):
    job = new(store, callback_url="http://127.0.0.1:9/cb")
    assert (job.community_id, job.source, job.config, job.callback_url) == (
        "c",
        "inline",
        {"model": "tiny"},
        "http://127.0.0.1:9/cb",
    )


def test_the_shared_store_needs_the_firebase_backend():
    from pydantic import ValidationError

    from core.settings import Settings

    with pytest.raises(ValidationError, match="DPO_JOB_STORE=firestore needs DPO_STORAGE_BACKEND=firebase"):
        Settings(job_store="firestore", storage_backend="local")
    with pytest.raises(ValidationError, match="expected an http:// or https:// URL"):
        Settings(public_base_url="dpo.example.com")
    assert Settings(public_base_url="https://dpo.example.com/").public_base_url == "https://dpo.example.com"
