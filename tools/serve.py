"""Start the service on loopback as a child process and stop it by PID (tests, toy-trigger, bench).

with Server(env={...}) as server:
    server.url  # http://127.0.0.1:<free port>
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn webhook_handler:app on 127.0.0.1, local backends under `root`, a generated secret."""

    def __init__(
        self,
        root: Path,
        env: dict | None = None,
        secret: str | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ):
        self.root = Path(root)
        self.secret = secret or secrets.token_hex(32)
        self.callback_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or self.root / "server.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "DPO_WEBHOOK_SECRET": self.secret,
            "DPO_CALLBACK_SECRET": self.callback_secret,
            "DPO_DATA_DIR": str(self.root / "data"),
            "DPO_PREFERENCES_DIR": str(self.root / "preferences"),
            "DPO_ARTIFACTS_DIR": str(self.root / "artifacts"),
            **(env or {}),
        }
        self.cwd = Path(cwd) if cwd is not None else REPO  # where the server starts (relative paths resolve there)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> Server:
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "webhook_handler:app", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode}; log: {self.log_path}\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout_s} s; log: {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int | None:
        """Signal the server by its PID and wait for it; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_pipeline(root: Path, name: str, body) -> int:
    """make toy-trigger / real-trigger: start the service under `root`, run `body(server)` (its
    exit code), show the server's log tail when it fails, and always stop the server by PID."""
    server = Server(Path(root).resolve())
    print(f"starting the service on {server.url} (log: {server.log_path})")
    try:
        server.start()
        code = body(server)
        if code != 0:
            print(server.log_tail(), file=sys.stderr)
        return code
    except Exception as err:
        print(f"{name} failed: {err}\n{server.log_tail()}", file=sys.stderr)
        return 1
    finally:
        if server.proc is not None:
            server.stop()
            print(f"server (pid {server.proc.pid}) stopped")
