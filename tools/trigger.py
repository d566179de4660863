"""Sign and send a fine-tuning trigger, then follow the job to its end with a progress bar.

    DPO_WEBHOOK_SECRET=... python tools/trigger.py --url http://127.0.0.1:8000 --community demo --toy
    DPO_WEBHOOK_SECRET=... python tools/trigger.py --community demo --dataset my.jsonl --config '{"epochs": 1}'
    DPO_WEBHOOK_SECRET=... python tools/trigger.py --community demo      # records from the preference source

Exit code 0 only when the job succeeds. The secret is read from the environment, never a flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.auth import HEADER, sign  # noqa: E402
from core.store import FINAL  # noqa: E402


class Client:
    """A small signed client for the service's API (any deployment)."""

    def __init__(self, url: str, secret: str | None, timeout: float = 30.0):
        self.url, self.secret = url.rstrip("/"), secret
        self.http = httpx.Client(timeout=timeout)

    def request(
        self, method: str, path: str, body: bytes = b"", params: dict | None = None, headers: dict | None = None
    ):
        """One signed request: the signature covers the method, the path, the query and the body."""
        url = httpx.URL(self.url + path, params=params)
        headers = {"Content-Type": "application/json", **(headers or {})}
        if self.secret:
            key = headers.get("Idempotency-Key", "")
            headers[HEADER] = sign(self.secret, method, url.path, body, url.query.decode(), idempotency_key=key)
        return self.http.request(method, url, content=body, headers=headers)

    def post(self, path: str, payload: dict | None = None, headers: dict | None = None, params: dict | None = None):
        body = b"" if payload is None else json.dumps(payload).encode()
        return self.request("POST", path, body, params, headers)

    def get(self, path: str, params: dict | None = None):
        return self.request("GET", path, params=params)

    def trigger(
        self,
        community: str,
        dataset: list | None = None,
        config: dict | None = None,
        validation: list | None = None,
        **kwargs,
    ):
        """POST /trigger-finetune with a fresh Idempotency-Key unless one is given: a retry of this
        call with the same key cannot start a second job, and the server's replay check (which
        refuses an identical unkeyed trigger in the same second) does not apply."""
        kwargs["headers"] = {"Idempotency-Key": uuid.uuid4().hex, **(kwargs.get("headers") or {})}
        payload = {"communityId": community}
        if dataset is not None:
            payload["dataset"] = dataset
        if config:
            payload["config"] = config
        if validation is not None:
            payload["validation"] = validation
        return self.post("/trigger-finetune", payload, **kwargs)

    def follow(self, job_id: str, timeout_s: float = 3600, interval_s: float = 0.5, out=sys.stderr) -> dict:
        """Poll /jobs/{id} until it ends, drawing a progress bar on `out`. Returns the final record."""
        deadline = time.time() + timeout_s
        while True:
            response = self.get(f"/jobs/{job_id}")
            response.raise_for_status()
            job = response.json()
            p = job["progress"]
            width, pct = 30, p.get("percent") or 0.0
            bar = "#" * int(width * pct / 100)
            eta = f" eta {p['eta_seconds']:.0f}s" if p.get("eta_seconds") is not None else ""
            loss = job["metrics"].get("loss")
            loss_txt = f" loss {loss:.4f}" if loss is not None else ""
            out.write(
                f"\r{job['status']:>9} [{bar:<{width}}] {pct:5.1f}% step {p.get('step', 0)}/{p.get('total_steps') or '?'}{loss_txt}{eta}   "
            )
            out.flush()
            if job["status"] in FINAL:
                out.write("\n")
                return job
            if time.time() > deadline:
                out.write("\n")
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s:.0f} s")
            time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("DPO_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--community", required=True)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", help="a .jsonl/.json file of records sent inline")
    source.add_argument("--toy", action="store_true", help="send the generated toy dataset inline")
    parser.add_argument("--toy-n", type=int, default=256)
    parser.add_argument("--config", default=None, help="JSON object of training overrides")
    parser.add_argument("--idempotency-key", default=None)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)

    dataset = None
    if args.toy:
        from tools.toy_data import toy_records

        dataset = toy_records(args.toy_n)
    elif args.dataset:
        from training.records import load_records_file

        dataset = load_records_file(args.dataset)
    secret = os.environ.get("DPO_WEBHOOK_SECRET")
    client = Client(args.url, secret)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    job = submit_and_follow(
        client, args.community, dataset, json.loads(args.config) if args.config else None, headers, args.timeout
    )
    return 0 if job is not None and job["status"] == "succeeded" else 1


def submit_and_follow(
    client: Client, community: str, dataset, config=None, headers=None, timeout_s: float = 3600, validation=None
) -> dict | None:
    """Trigger, follow to the end, print the outcome. Returns the final job, or None if refused."""
    response = client.trigger(community, dataset, config, validation, headers=headers)
    if response.status_code != 202:
        print(f"trigger rejected: HTTP {response.status_code}: {response.text}", file=sys.stderr)
        return None
    job_id = response.json()["job_id"]
    print(f"job {job_id} queued ({response.json()['status_url']})")
    job = client.follow(job_id, timeout_s)
    if job["status"] != "succeeded":
        print(f"job {job_id} {job['status']}: {job['error']}", file=sys.stderr)
        return job
    accuracy = job["final_eval"].get("eval/rewards/accuracies")
    print(f"job {job_id} succeeded")
    print(f"held-out reward accuracy: {accuracy if accuracy is None else f'{accuracy:.3f}'}")
    print(f"artifact: {job['artifact']['uri']}")
    return job


if __name__ == "__main__":
    sys.exit(main())
