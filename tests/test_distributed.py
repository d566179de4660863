"""One job on several processes: `python -m training` under torchrun, 2 gloo processes on loopback.

The CPU stands in for the GPUs (the same FSDP2, DCP and collectives code, with gloo instead of
NCCL). Run these alone with `pytest -m distributed`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, make_cfg
from tests.service_helpers import wait_for
from tools.serve import Server
from tools.trigger import Client
from training import run_training
from training.records import write_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# the same run on one and on two processes; 48 pairs, batches of 8: 5 steps an epoch
VALUES = {"train.epochs": 2, "train.max_steps": 6, "train.batch_size": 8, "train.threads": 1, "train.plot": False}


def torchrun(nproc: int, data: Path, out: Path, values: dict, **popen) -> subprocess.Popen:
    overrides = [f"{key}={'null' if value is None else value}" for key, value in values.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "training", f"data.path={data}", f"output_dir={out}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "DPO_DIST_TIMEOUT_S": "60"}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def events_of(lines: list[str]) -> list[dict]:
    return [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("@progress ")]


def run_to_end(proc: subprocess.Popen, timeout: float = 240) -> list[str]:
    out, _ = proc.communicate(timeout=timeout)
    lines = out.splitlines()
    assert proc.returncode == 0, "\n".join(lines[-30:])
    return lines


@pytest.mark.parametrize("lora", [False, True], ids=["full-fsdp2", "lora-replicated"])
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, toy, lora):
    """Each rank takes half of every step's pairs; gradients are averaged over ranks. The losses,
    held-out metrics and final weights are those of one process on the whole batch."""
    records = toy(48)
    values = {**VALUES, "model.lora.enabled": lora}
    one = run_training(make_cfg(**values), records, tmp_path / "one")
    lines = run_to_end(torchrun(2, write_jsonl(records, tmp_path / "data.jsonl"), tmp_path / "two", values))

    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["processes"] == 2
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one.metrics["history"]], abs=1e-4)
    assert [h["tokens"] for h in two["history"]] == [h["tokens"] for h in one.metrics["history"]]
    assert two["final_eval"]["eval/loss"] == pytest.approx(one.metrics["final_eval"]["eval/loss"], abs=1e-4)
    assert len([e for e in events_of(lines) if e["kind"] == "step"]) == 6  # rank 0 alone reports
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    want, got = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    assert sorted(got) == sorted(want)
    for name in want:  # Adam divides by sqrt(v): ~1e-7 gradient noise becomes ~1e-5 in a weight
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=0, msg=name)


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of a torchrun worker by its RANK (a child of the launcher)."""
    for child in Path(f"/proc/{launcher.pid}/task").glob("*/children"):
        for pid in child.read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(pid)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {launcher.pid}")


def test_a_killed_rank_ends_the_run_and_its_checkpoint_resumes_on_another_number_of_ranks(tmp_path, toy):
    """kill -9 of rank 1 after the first DCP checkpoint: torchrun tears the job down and exits
    non-zero within seconds, naming the rank. The checkpoint written by two ranks resumes on one
    process (DCP reshards it) and the run ends as the uninterrupted one does."""
    records = toy(48)
    ckpt = tmp_path / "ckpt"
    values = {**VALUES, "train.checkpoint_every": 2, "train.checkpoint_dir": ckpt}
    proc = torchrun(2, write_jsonl(records, tmp_path / "data.jsonl"), tmp_path / "two", values)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("@progress") and '"kind": "checkpoint"' in line:
            os.kill(rank_pid(proc, 1), signal.SIGKILL)
            killed = time.monotonic()
            break
    else:
        raise AssertionError("no checkpoint before the end:\n" + "\n".join(lines[-30:]))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - killed < 30
    assert "exitcode  : -9" in out and "rank      : 1" in out  # torchrun's summary names the rank
    assert (ckpt / "checkpoint" / "weights" / ".metadata").exists()

    events = []
    resumed = run_training(make_cfg(**values), records, tmp_path / "resumed", on_progress=events.append)
    uninterrupted = run_training(make_cfg(**VALUES), records, tmp_path / "one")
    first = next(e for e in events if e["kind"] == "resumed")
    assert first["step"] >= 2
    history = resumed.metrics["history"]
    assert [h["step"] for h in history] == list(range(1, 7))
    assert [h["loss"] for h in history] == pytest.approx(
        [h["loss"] for h in uninterrupted.metrics["history"]], abs=1e-4
    )


def trainer_rank_pid(rank: int) -> int | None:
    """A service's trainer process of the given RANK (the only multi-process job running)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            values = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in values and any(v.startswith(b"DPO_TRAINER_HEARTBEAT_S=") for v in values):
            return int(environ.parent.name)
    return None


def test_a_service_job_on_two_gpus_runs_under_torchrun_and_survives_a_killed_rank(tmp_path, toy):
    """DPO_GPUS names two slots; on this CPU host they are two gloo processes. A job with
    `gpus: 2` runs as torchrun; kill -9 of rank 1 hands the job back (as a crashed replica
    would), and the next claim resumes it on two ranks from the DCP checkpoint. A cancel stops
    every rank. A job asking for more GPUs than the replica has is refused at the trigger."""
    env = {"DPO_GPUS": "0,1", "DPO_JOB_LEASE_S": "3", "DPO_CHECKPOINT_EVERY": "2"}
    with Server(tmp_path, env=env) as srv:
        client = Client(srv.url, srv.secret)
        refused = client.trigger("three", toy(8), {"gpus": 3})
        assert refused.status_code == 422
        assert refused.json()["error"]["message"] == (
            "config.gpus: this service runs a job on at most 2 GPUs (DPO_GPUS lists 2), got 3"
        )
        job_id = client.trigger("two", toy(96), {"gpus": 2, "epochs": 2, "batch_size": 8}).json()["job_id"]
        deadline = time.monotonic() + 180
        while not any(e["kind"] == "checkpoint" for e in client.get(f"/jobs/{job_id}/events").json()["events"]):
            assert time.monotonic() < deadline, client.get(f"/jobs/{job_id}").json()
            time.sleep(0.2)
        os.kill(trainer_rank_pid(1), signal.SIGKILL)
        job = wait_for(client, job_id, timeout_s=240)
        events = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["events"]
        # a cancel reaches every rank: they stop at the same step boundary
        other = client.trigger("two-cancel", toy(96), {"gpus": 2, "epochs": 5, "batch_size": 8}).json()["job_id"]
        wait_for(client, other, states=("running",), step_at_least=1)
        client.post(f"/jobs/{other}/cancel")
        cancelled = wait_for(client, other, timeout_s=60)
    assert cancelled["status"] == "cancelled", cancelled
    assert job["status"] == "succeeded", job["error"]
    warnings = [e["data"]["message"] for e in events if e["kind"] == "warning"]
    assert any(m.startswith("rank 1 of 2 was killed by SIGKILL") for m in warnings), warnings
    assert [e["data"]["gpus"] for e in events if e["kind"] == "gpus" and "gpus" in e["data"]] == [["0", "1"]] * 2
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["data"]["step"] >= 2
    assert job["progress"]["step"] == job["progress"]["total_steps"]
    assert trainer_rank_pid(0) is None and trainer_rank_pid(1) is None  # no rank outlives its job
    assert not (tmp_path / "data" / "checkpoints" / job_id).exists()
