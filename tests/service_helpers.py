"""Helpers for tests that drive a real server (tools/serve.py) through the signed client."""

from __future__ import annotations

import time

from tools.trigger import Client

FAST = {"epochs": 1, "batch_size": 8}


def wait_for(
    client: Client,
    job_id: str,
    states=("succeeded", "failed", "cancelled"),
    timeout_s: float = 300,
    step_at_least: int = 0,
) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in states and job["progress"].get("step", 0) >= step_at_least:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout_s} s: {job}")
