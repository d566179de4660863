"""How a trainer subprocess (python -m training) talks to the service that started it: one
message a line on stdout, `@<kind> <JSON>`; any other line is the trainer's own output (kept
for the error message when it fails)."""

from __future__ import annotations

import json

PROGRESS = "progress"  # a training event: step, eval, checkpoint, layout, warning, resumed
RESULT = "result"  # the run's outcome: output_dir, files, final_eval
ERROR = "error"  # why the run ended without a result: {"type", "message"}
ALIVE = "alive"  # a heartbeat, so the service can tell a slow trainer from a stuck one
KINDS = (PROGRESS, RESULT, ERROR, ALIVE)


def message(kind: str, payload: dict) -> str:
    """One protocol line, newline included."""
    return f"@{kind} {json.dumps(payload)}\n"


def parse(line: str) -> tuple[str | None, dict | None]:
    """(kind, payload) of a protocol line, (None, None) for any other line; a protocol line whose
    JSON is garbled raises ValueError (json.JSONDecodeError)."""
    head, _, payload = line.partition(" ")
    kind = head[1:] if head.startswith("@") else None
    if kind not in KINDS:
        return None, None
    return kind, json.loads(payload)
