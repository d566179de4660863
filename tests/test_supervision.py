"""The service watches its trainer subprocesses from the outside: a trainer that hangs (SIGSTOP
stands in for a hang) is stopped and its job failed with the reason, a cancel and a shutdown
reach it even then, nothing is left behind; and the subprocess path works with the default,
relative data directory from any working directory."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from tests.service_helpers import FAST, wait_for
from tools.serve import Server
from tools.trigger import Client

pytestmark = pytest.mark.slow
SUBPROCESS = {"DPO_RUNNER_MODE": "subprocess", "DPO_STOP_GRACE_S": "2"}
LONG = {"epochs": 100}  # far more steps than a test waits for


def trainer_of(srv: Server) -> psutil.Process:
    """The training subprocess the server started (`python -m training ...`)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for child in psutil.Process(srv.proc.pid).children(recursive=True):
            if "training" in child.cmdline():
                return child
        time.sleep(0.1)
    raise AssertionError("no trainer subprocess appeared")


def running_job(srv: Server, client: Client, community: str, toy) -> tuple[str, psutil.Process]:
    job_id = client.trigger(community, toy(64), LONG).json()["job_id"]
    wait_for(client, job_id, states=("running",), step_at_least=1, timeout_s=120)
    return job_id, trainer_of(srv)


def test_a_hung_trainer_is_stopped_and_the_next_job_runs(tmp_path, toy):
    env = {**SUBPROCESS, "DPO_JOB_STALL_S": "3"}
    with Server(tmp_path, env=env) as srv:
        client = Client(srv.url, srv.secret)
        job_id, trainer = running_job(srv, client, "hangs", toy)
        next_job = client.trigger("after-the-hang", toy(16), FAST).json()["job_id"]
        trainer.send_signal(signal.SIGSTOP)
        saw_not_ready = False
        deadline = time.time() + 30
        while time.time() < deadline and not saw_not_ready:
            ready = httpx.get(srv.url + "/ready")
            saw_not_ready = ready.status_code == 503 and "silent" in ready.json()["checks"]["worker"]
            time.sleep(0.2)
        assert saw_not_ready, "a stuck trainer must show in /ready"
        job = wait_for(client, job_id, timeout_s=30)
        assert job["status"] == "failed" and job["error"]["type"] == "stalled"
        assert job["error"]["message"] == "the trainer printed nothing for DPO_JOB_STALL_S (3 s); it was stopped"
        assert not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE
        assert wait_for(client, next_job, timeout_s=120)["status"] == "succeeded"
        assert httpx.get(srv.url + "/ready").status_code == 200


def test_cancel_reaches_a_hung_trainer(tmp_path, toy):
    with Server(tmp_path, env=SUBPROCESS) as srv:
        client = Client(srv.url, srv.secret)
        job_id, trainer = running_job(srv, client, "hung-cancel", toy)
        trainer.send_signal(signal.SIGSTOP)
        started = time.time()
        assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
        job = wait_for(client, job_id, timeout_s=30)
        assert job["status"] == "cancelled" and time.time() - started < 15
        assert not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE


def test_shutdown_with_a_hung_trainer_leaves_no_process_and_requeues_the_job(tmp_path, toy):
    srv = Server(tmp_path, env=SUBPROCESS)
    with srv:
        client = Client(srv.url, srv.secret)
        job_id, trainer = running_job(srv, client, "hung-shutdown", toy)
        trainer.send_signal(signal.SIGSTOP)
        started = time.time()
        srv.stop(signal.SIGTERM, timeout_s=60)
        assert time.time() - started < 20  # grace period, not the 60 s join
        assert srv.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert not psutil.pid_exists(trainer.pid) or trainer.status() == psutil.STATUS_ZOMBIE
    with Server(tmp_path, env={"DPO_RUNNER_MODE": "subprocess"}) as again:
        job = Client(again.url, again.secret).get(f"/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running", "succeeded")  # back in the queue, not stuck 'running'


@pytest.mark.parametrize("where", ["repository", "elsewhere"])
def test_subprocess_mode_works_with_the_default_relative_data_dir(tmp_path, toy, where):
    """`make api` starts in the repository; a deployment may start anywhere. DPO_DATA_DIR is the
    default relative `data`; the trainer subprocess must find its job files all the same."""
    from tools.serve import REPO

    cwd = tmp_path if where == "elsewhere" else REPO / ".cache" / "test-relative" / tmp_path.name
    cwd.mkdir(parents=True, exist_ok=True)
    env = {
        "DPO_RUNNER_MODE": "subprocess",
        "DPO_DATA_DIR": "data",
        "DPO_ARTIFACTS_DIR": "artifacts",
        "DPO_PREFERENCES_DIR": "data/preferences",
    }
    with Server(tmp_path / "srv", env=env, cwd=cwd) as srv:
        client = Client(srv.url, srv.secret)
        job = wait_for(client, client.trigger("relative", toy(16), FAST).json()["job_id"], timeout_s=120)
    assert job["status"] == "succeeded", job["error"]
    assert (cwd / "data" / "jobs.sqlite3").exists() and any((cwd / "artifacts" / "relative").iterdir())
    assert os.path.isabs(job["artifact"]["uri"].removeprefix("file://"))
