"""A running job's progress: the trainer's events -> the job record and its event log, and what
the record keeps of a finished run's metrics."""

from __future__ import annotations

import logging
import time

from core.store import finite

log = logging.getLogger(__name__)


def outcome(metrics: dict) -> dict:
    """What the job record keeps of a run's metrics.json: the final held-out and training
    metrics, and the tokens trained on (chosen + rejected, every epoch)."""
    return finite(
        {
            "final_eval": metrics.get("final_eval", {}),
            "final_train": metrics.get("final_train", {}),
            "trained_tokens": sum(h.get("tokens", 0) for h in metrics.get("history", [])),
        }
    )


class ProgressRecorder:
    """Training progress events -> the job row (every step) and the event log (throttled).

    Best effort: while the store is unreachable, training goes on and these writes are skipped
    (for QUIET_S after each failure, so a partition does not slow every step); the job's record
    catches up with its next write."""

    QUIET_S = 30.0

    def __init__(self, store, job_id: str, metrics=None, event_interval_s: float = 1.0, on_checkpoint=None):
        self.store, self.job_id, self.metrics, self.interval = store, job_id, metrics, event_interval_s
        self.on_checkpoint = on_checkpoint  # (job id, step): a checkpoint was just written
        self.started = time.time()
        self.last_event = 0.0
        self.steps_seen = 0
        self._quiet_until = 0.0

    def _write(self, write, *args) -> None:
        if time.monotonic() < self._quiet_until:
            return
        try:
            write(*args)
        except Exception as err:
            log.warning("job %s: progress not recorded for %g s: %s", self.job_id, self.QUIET_S, err)
            self._quiet_until = time.monotonic() + self.QUIET_S

    def __call__(self, event: dict) -> None:
        event = finite(event)  # nothing non-finite reaches a store, the API or a callback
        step, total = event.get("step", 0), event.get("total_steps") or 0
        if event["kind"] == "checkpoint":
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.job_id, step)
            return
        if event["kind"] != "step":  # eval, resumed, layout, warning: one event each, as sent
            if event["kind"] == "eval":  # the held-out metrics at a step (the dashboard draws them)
                data = {"step": step, **event["metrics"]}
            else:
                data = {k: v for k, v in event.items() if k != "kind"}
            self._write(self.store.add_event, self.job_id, event["kind"], data)
            return
        self.steps_seen += 1
        elapsed = time.time() - self.started
        progress = {
            "step": step,
            "total_steps": total,
            "epoch": round(event.get("epoch", 0.0), 4),
            "percent": round(100.0 * step / total, 2) if total else 0.0,
            "eta_seconds": round(elapsed / step * (total - step), 1) if step else None,
        }
        metrics = {k: v for k, v in event["metrics"].items() if isinstance(v, int | float)}
        self._write(self.store.set_progress, self.job_id, progress, metrics)
        if self.metrics is not None and "tokens_per_s" in metrics:
            self.metrics.tokens_per_s.set(metrics["tokens_per_s"])
        now = time.time()
        if now - self.last_event >= self.interval or step == total:
            self.last_event = now
            self._write(self.store.add_event, self.job_id, "progress", {**progress, "metrics": metrics})
