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
import signal
import threading
from collections import deque
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
    """Free GPUs, handed out all-or-nothing and first come, first served: a job never holds some
    while waiting for more (two waiting jobs cannot block each other), and a 2-GPU job is not
    starved by a stream of 1-GPU jobs taking each GPU as it frees."""

    def __init__(self, ids: list[str]):
        self.ids = list(ids)
        self._free = list(ids)
        self._waiting: deque[object] = deque()  # the jobs waiting, in the order they asked
        self._changed = threading.Condition()

    def acquire(self, n: int, give_up: Callable[[], bool], poll_s: float = 0.5) -> list[str] | None:
        """`n` free GPUs, waiting for them; None when give_up() turns true first. A pool without
        GPUs (a CPU host) gives a one-GPU job none and runs it as before."""
        if n > max(len(self.ids), 1):  # the trigger checked the replica that took it; this one is smaller
            raise ValueError(f"config.gpus: {n} GPUs asked of a replica with {len(self.ids)} (DPO_GPUS)")
        if not self.ids:
            return []
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or len(self._free) < n:
                    if give_up():
                        return None
                    self._changed.wait(timeout=poll_s)
                taken, self._free = self._free[:n], self._free[n:]
                return taken
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now

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
    """(rank, exit code) of a job's failed rank from torchrun's summary, or None. A rank killed
    with SIGKILL (the OOM killer, kill -9, a lost node) comes first whatever torchrun calls the
    root cause: its peers fail a moment later with a connection error, in the same second of
    torchrun's timestamps. Otherwise the root cause. A negative exit code is a signal."""
    text = "\n".join(lines)
    failures = [(int(r), int(c)) for r, c in re.findall(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", text, re.S)]
    killed = [f for f in failures if f[1] == -signal.SIGKILL]
    if killed:
        return killed[0]
    root = text.rfind("Root Cause")
    match = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", text[root:], re.S) if root >= 0 else None
    return (int(match[1]), int(match[2])) if match else (failures[0] if failures else None)


# a rank's exception line (torch prefixes it "[rankN]: " under torchrun); not torchrun's own
RANK_ERROR = re.compile(
    r"^(?:\[rank(\d+)\]:\s*)?((?!torch\.distributed\.elastic)(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b:?.*)$"
)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants. torchrun starts each rank in a session of its own, so a signal
    to the trainer's process group does not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree
