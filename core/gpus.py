"""The GPUs of this replica and which job holds which: worker slots share them without overlap.

A job asks for `config.gpus` (default 1). A worker that takes a job waits until that many GPUs
are free, holds them while the job runs (its lease is renewed meanwhile) and gives them back at
its end: on a 4-GPU host a 1-GPU job and a 2-GPU job run side by side. A job on one GPU runs as
before (in-process or a subprocess); a job on several runs as a torchrun subprocess that sees
only its GPUs (CUDA_VISIBLE_DEVICES).

Which GPUs: DPO_GPUS ("0,1,2,3"), else CUDA_VISIBLE_DEVICES, else every /dev/nvidiaN. A host
without GPUs has none, and a job asking for more than one is refused at the trigger. On a
CPU-only host DPO_GPUS may name slots anyway ("0,1"): their jobs run as CPU processes with
gloo, which is how the tests run the multi-process path (plan/decisions.md D30).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path


def gpu_ids(configured: list[str]) -> list[str]:
    """This replica's GPUs, by the ids CUDA_VISIBLE_DEVICES takes."""
    if configured:
        return list(configured)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    return sorted(
        (p.name[len("nvidia") :] for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)), key=int
    )


class GpuPool:
    """Free GPUs, handed out all-or-nothing: a job never holds some while waiting for more, so
    two waiting jobs cannot block each other."""

    def __init__(self, ids: list[str]):
        self.ids = list(ids)
        self._free = list(ids)
        self._changed = threading.Condition()

    def acquire(self, n: int, give_up: Callable[[], bool], poll_s: float = 0.5) -> list[str] | None:
        """`n` free GPUs, waiting for them; None when give_up() turns true first. A pool without
        GPUs (a CPU host) gives a one-GPU job none and runs it as before."""
        if not self.ids:
            return []
        if n > len(self.ids):
            raise ValueError(f"{n} GPUs asked of a replica with {len(self.ids)}")
        with self._changed:
            while len(self._free) < n:
                if give_up():
                    return None
                self._changed.wait(timeout=poll_s)
            taken, self._free = self._free[:n], self._free[n:]
            return taken

    def release(self, ids: list[str]) -> None:
        with self._changed:
            self._free += [i for i in ids if i not in self._free]
            self._free.sort(key=self.ids.index)
            self._changed.notify_all()

    def free(self) -> list[str]:
        with self._changed:
            return list(self._free)


def inprocess_device(gpu_id: str) -> str | None:
    """The torch device of a GPU for a job trained inside this process (None on a CPU host):
    its position among CUDA_VISIBLE_DEVICES when that is set, else its id."""
    import torch

    if not torch.cuda.is_available():
        return None
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return f"cuda:{visible.index(gpu_id) if gpu_id in visible else int(gpu_id)}"


def torchrun_failure(lines: list[str]) -> tuple[int, int] | None:
    """(rank, exit code) of the first failure in torchrun's summary ("Root Cause" block), or None.
    A negative exit code is the signal that killed the rank."""
    text = "\n".join(lines)
    root = text.rfind("Root Cause")
    match = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", text[root:] if root >= 0 else text, re.S)
    return (int(match[1]), int(match[2])) if match else None


RANK_ERROR = re.compile(r"^(?:\[rank(\d+)\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b:?.*)$")
