"""The whole pipeline on the embedded default: start the service on loopback with a generated
secret and the local backends, send the toy dataset signed, follow the job to `succeeded`, print
the artifact location and held-out accuracy, stop the server (by PID). Non-zero exit on failure.

    python tools/toy_trigger.py [--root .cache/toy-service]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.serve import run_pipeline  # noqa: E402
from tools.toy_data import toy_records  # noqa: E402
from tools.trigger import Client, submit_and_follow  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".cache/toy-service", help="data, artifacts and server log go here")
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args(argv)

    def pipeline(server) -> int:
        client = Client(server.url, server.secret)
        job = submit_and_follow(client, "toy-community", toy_records(args.n), timeout_s=1800)
        if job is None or job["status"] != "succeeded":
            return 1
        print("files: " + ", ".join(job["artifact"]["files"]))
        return 0

    return run_pipeline(Path(args.root), "toy-trigger", pipeline)


if __name__ == "__main__":
    sys.exit(main())
