"""The replica's GPUs: the pool worker slots share, the trigger's limit, torchrun's failure summary."""

from __future__ import annotations

import threading
import time

import pytest

from core.errors import ServiceError
from core.gpus import RANK_ERROR, GpuPool, gpu_ids, torchrun_failure
from core.job_config import job_gpus
from core.schemas import TrainOverrides
from core.settings import Settings

# torchrun's summary after `kill -9` of rank 1 (torch 2.13, trimmed)
KILLED = """\
============================================================
training FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-27_10:38:00
  host      : sandbox
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 7664)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-27_10:38:00
  host      : sandbox
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 7665)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 7665
============================================================"""


def test_a_1_gpu_and_a_2_gpu_job_share_4_gpus_and_a_third_waits_for_its_gpus():
    pool = GpuPool(["0", "1", "2", "3"])
    one = pool.acquire(1, give_up=lambda: False)
    two = pool.acquire(2, give_up=lambda: False)
    assert one == ["0"] and two == ["1", "2"] and pool.free() == ["3"]
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(2, give_up=lambda: False, poll_s=0.05)))
    waiter.start()
    time.sleep(0.2)
    assert got == []  # all or nothing: it does not hold "3" while it waits
    pool.release(two)
    waiter.join(timeout=5)
    assert got == [["1", "2"]] and pool.free() == ["3"]


def test_gpus_go_first_come_first_served_so_a_2_gpu_job_is_not_starved_by_1_gpu_jobs():
    pool = GpuPool(["0", "1"])
    first = pool.acquire(1, give_up=lambda: False)
    order = []

    def take(name: str, n: int) -> None:
        got = pool.acquire(n, give_up=lambda: False, poll_s=0.05)
        order.append(name)
        time.sleep(0.1)
        pool.release(got)

    two = threading.Thread(target=take, args=("two", 2))
    two.start()
    time.sleep(0.2)
    one = threading.Thread(target=take, args=("one", 1))  # a GPU is free, but the 2-GPU job came first
    one.start()
    time.sleep(0.2)
    assert order == []
    pool.release(first)
    two.join(timeout=5)
    one.join(timeout=5)
    assert order == ["two", "one"] and pool.free() == ["0", "1"]


def test_a_replica_without_enough_gpus_refuses_a_job_another_replica_accepted():
    with pytest.raises(ValueError, match="2 GPUs asked of a replica with 0"):
        GpuPool([]).acquire(2, give_up=lambda: False)


def test_a_wait_for_gpus_ends_when_the_job_is_stopped():
    pool = GpuPool(["0"])
    pool.acquire(1, give_up=lambda: False)
    assert pool.acquire(1, give_up=lambda: True) is None


def test_a_host_without_gpus_gives_a_one_gpu_job_none():
    assert GpuPool([]).acquire(1, give_up=lambda: False) == []


def test_the_gpus_come_from_dpo_gpus_then_cuda_visible_devices(monkeypatch):
    assert gpu_ids(["2", "3"]) == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert gpu_ids([]) == ["1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_ids([]) == []


def test_more_gpus_than_the_replica_has_is_a_422_naming_config_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a host without GPUs
    none = Settings(_env_file=None)
    assert job_gpus(TrainOverrides(gpus=1), none) == 1 and job_gpus(None, none) == 1
    with pytest.raises(ServiceError) as refused:
        job_gpus(TrainOverrides(gpus=2), none)
    assert refused.value.field == "config.gpus"
    assert str(refused.value) == "config.gpus: this service runs a job on at most 1 GPU (DPO_GPUS lists 0), got 2"
    assert job_gpus(TrainOverrides(gpus=2), Settings(_env_file=None, gpus="0,1")) == 2
    with pytest.raises(ValueError, match="a GPU is listed twice"):
        Settings(_env_file=None, gpus="0,0")


def test_torchruns_summary_names_the_first_failed_rank_and_how_it_ended():
    assert torchrun_failure(KILLED.splitlines()) == (1, -9)
    # torchrun's timestamps are whole seconds: a peer failing just after the kill may be called
    # the root cause; the killed rank is what ended the job
    swapped = KILLED.replace("rank      : 0 (local_rank: 0)", "RANK_A").replace(
        "rank      : 1 (local_rank: 1)", "RANK_B"
    )
    swapped = swapped.replace("RANK_A", "rank      : 1 (local_rank: 1)").replace(
        "RANK_B", "rank      : 0 (local_rank: 0)"
    )
    swapped = swapped.replace("exitcode  : 1 (pid: 7664)", "X").replace(
        "exitcode  : -9 (pid: 7665)", "exitcode  : 1 (pid: 7664)"
    )
    swapped = swapped.replace("X", "exitcode  : -9 (pid: 7665)")
    assert torchrun_failure(swapped.splitlines()) == (1, -9)
    raised = KILLED.replace("exitcode  : -9 (pid: 7665)", "exitcode  : 1 (pid: 7665)")
    assert torchrun_failure(raised.splitlines()) == (1, 1)  # no rank was killed: the root cause
    assert torchrun_failure(["nothing to see"]) is None


def test_a_ranks_error_line_is_recognised_with_or_without_its_prefix():
    match = RANK_ERROR.match("[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert match[1] == "1" and match[2].startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert RANK_ERROR.match("ValueError: train.reference: live ...")[2] == "ValueError: train.reference: live ..."
    assert RANK_ERROR.match("step 3 of 6") is None
    assert RANK_ERROR.match("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ") is None
