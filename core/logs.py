"""The service's logs: plain text on a terminal, one JSON object a line where logs are collected.

DPO_LOG_FORMAT=json (the Docker image's default) writes each record through python-json-logger
with the fields log collectors read: `severity` (Cloud Logging's name for the level), `message`,
`logger`, `time`, the job's `job_id` and `community_id` when a worker thread logs for a job, an
unexpected error's `error_id`, and `exc_info` (the traceback) when there is one. uvicorn's own
loggers go through the same handler.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_job: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("dpo_job", default=None)


@contextlib.contextmanager
def job_context(job_id: str, community_id: str):
    """Every record logged inside (in this thread) carries the job's id and community."""
    token = _job.set((job_id, community_id))
    try:
        yield
    finally:
        _job.reset(token)


class JobFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job = _job.get()
        if job is not None and not hasattr(record, "job_id"):
            record.job_id, record.community_id = job
        return True


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """One handler on the root logger, in `fmt` ("text" or "json"); uvicorn's loggers use it too."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(levelname)s %(name)s %(message)s %(asctime)s",
                rename_fields={"levelname": "severity", "name": "logger", "asctime": "time"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    handler.addFilter(JobFields())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [], True
    logging.captureWarnings(True)  # Python's warnings as records too, not bare lines on stderr
