"""Request and response bodies of the HTTP API, and the job views both the API and the dashboard answer."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import JOB_NOT_FOUND, Invalid, NotFound
from core.store import STATES, BadCursor, Job
from training.config import available
from training.generation import MAX_NEW_TOKENS, MAX_SAMPLES, compile_contains

COMMUNITY_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
JobStatus = Literal[STATES]  # Literal of a tuple: the same as listing its values
MAX_TARGET_MODULES = 64
MODULE_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,63}"  # a module's own name (q_proj), as PEFT matches it


class TrainOverrides(BaseModel):
    """The only training settings a caller may change, each range-checked."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="a config/model/*.yaml preset, or a hub id / local path in DPO_ALLOWED_MODELS",
    )
    loss: str | None = Field(None, description="a config/loss/*.yaml name")
    beta: float | None = Field(
        None,
        ge=1e-3,
        le=10,
        description="every loss: 0.001 to 10 (ipo's target margin 1/(2 beta) is then at most 500, never an overflow)",
    )
    learning_rate: float | None = Field(None, gt=0, le=1)
    epochs: int | None = Field(None, ge=1, le=100)
    batch_size: int | None = Field(None, ge=1, le=1024)
    max_length: int | None = Field(None, ge=16, le=32768, description="prompt + response tokens")
    max_prompt_length: int | None = Field(
        None, ge=8, le=32767, description="a longer prompt is cut to this; default: the preset's, or max_length // 2"
    )
    lora: bool | None = None
    lora_rank: int | None = Field(None, ge=1, le=512, description="LoRA's r; without lora_alpha, alpha is 2 x rank")
    lora_alpha: float | None = Field(None, gt=0, le=4096, description="LoRA's alpha: the update is scaled by alpha / r")
    lora_target_modules: Literal["all-linear"] | list[str] | None = Field(
        None,
        description=f"the layers LoRA adapts: all-linear, or up to {MAX_TARGET_MODULES} module names (q_proj, ...)",
    )
    precision: Literal["auto", "fp32", "bf16-mixed"] | None = Field(
        None, description="auto: bf16-mixed on a CUDA GPU with bf16, else fp32 (the preset's, by default)"
    )
    gradient_checkpointing: bool | None = Field(
        None, description="recompute activations in the backward pass: less memory, ~30% more compute"
    )
    merge: bool | None = Field(None, description="LoRA: also store the adapter merged into the base (merged/)")
    eval_samples: int | None = Field(
        None,
        ge=0,
        le=MAX_SAMPLES,
        description="greedy answers to this many held-out prompts, before and after (0: none)",
    )
    eval_max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="each answer's token cap")
    eval_contains: str | None = Field(
        None,
        min_length=1,
        max_length=500,
        description="a regex the preferred behaviour matches in an answer: its share before and after, in final_eval",
    )
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    gpus: int | None = Field(
        None, ge=1, le=64, description="GPUs for this job, one training process each (torchrun); at most the replica's"
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value):
        if value is not None and value not in available("loss"):
            raise ValueError(f"expected one of {available('loss')}")
        return value

    @field_validator("eval_contains")
    @classmethod
    def _a_regex(cls, value):
        if value is not None:
            compile_contains(value)  # a ValueError names what is wrong with it
        return value

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _module_names(cls, value):
        """`all-linear` or a list of plain module names (PEFT matches each against the last part
        of a module's dotted name; a single other string it would take as a regular expression).
        Checked before the type, so that any wrong value gets this one message on this field."""
        if value is None or value == "all-linear":
            return value
        expected = (
            f'expected "all-linear" or a list of 1 to {MAX_TARGET_MODULES} module names such as ["q_proj", "v_proj"]'
        )
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_TARGET_MODULES:
            raise ValueError(expected)
        for name in value:
            if not isinstance(name, str) or not re.fullmatch(MODULE_NAME, name):
                shown = repr(name[:64] if isinstance(name, str) else name)
                raise ValueError(f"{shown}: a module name is 1 to 64 of A-Z a-z 0-9 _, not starting with a digit")
        if len(set(value)) != len(value):
            raise ValueError("a module is named twice")
        return value

    def config_values(self) -> dict[str, Any]:
        """Dotted config keys -> typed values for training.config.compose_config."""
        mapping = {
            "beta": "loss.beta",
            "learning_rate": "train.learning_rate",
            "epochs": "train.epochs",
            "batch_size": "train.batch_size",
            "lora": "model.lora.enabled",
            "lora_rank": "model.lora.r",
            "lora_alpha": "model.lora.alpha",
            "lora_target_modules": "model.lora.target_modules",
            "precision": "train.precision",
            "gradient_checkpointing": "train.gradient_checkpointing",
            "merge": "model.merge",
            "eval_samples": "eval.samples",
            "eval_max_new_tokens": "eval.max_new_tokens",
            "eval_contains": "eval.contains",
            "seed": "train.seed",
            "max_length": "data.max_length",
            "max_prompt_length": "data.max_prompt_length",
        }
        values = {key: getattr(self, name) for name, key in mapping.items() if getattr(self, name) is not None}
        if self.lora_rank is not None and self.lora_alpha is None:
            values["model.lora.alpha"] = 2 * self.lora_rank  # the presets' ratio: the update's scale stays as tuned
        return values


METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's bounds
METADATA_KEY = rf"[A-Za-z0-9_.-]{{1,{METADATA_KEY_CHARS}}}"  # also a valid Firestore field name


class TriggerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    communityId: str = Field(pattern=COMMUNITY_ID_PATTERN, description="the community whose preferences to train on")
    dataset: list[Any] | None = Field(
        None, description="inline records in any accepted format; absent: the preference source"
    )
    validation: list[Any] | None = Field(
        None, description="held-out records (any accepted format) to evaluate on, instead of a random split"
    )
    config: TrainOverrides | None = None
    callbackUrl: str | None = Field(None, max_length=2048, description="signed POST of the final job record")
    since: datetime | None = Field(None, description="source records only: createdAt >= since")
    suffix: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,40}$", description="your name for the result (1-40 letters, digits, . _ -)"
    )
    metadata: dict[str, str] | None = Field(
        None, description=f"your string key/value pairs, kept with the job (at most {METADATA_KEYS} keys)"
    )
    limit: int | None = Field(None, ge=1, le=1_000_000, description="source records only: at most this many")

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value):
        if value is None:
            return value
        if len(value) > METADATA_KEYS:
            raise ValueError(f"at most {METADATA_KEYS} keys, got {len(value)}")
        for key, item in value.items():
            if not re.fullmatch(METADATA_KEY, key) or (key.startswith("__") and key.endswith("__")):
                raise ValueError(
                    f"key {key[:METADATA_KEY_CHARS]!r}: 1 to {METADATA_KEY_CHARS} of A-Z a-z 0-9 _ . - (not __name__)"
                )
            if len(item) > METADATA_VALUE_CHARS:
                raise ValueError(f"value of {key!r}: at most {METADATA_VALUE_CHARS} characters, got {len(item)}")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"value of {key!r}: not valid Unicode text (a lone surrogate)") from None
        return value

    @model_validator(mode="after")
    def _source_options_need_the_source(self):
        if self.dataset is not None and (self.since is not None or self.limit is not None):
            raise ValueError("since/limit apply to records from the preference source, not to an inline dataset")
        return self


class QueuedResponse(BaseModel):
    status: JobStatus  # "queued" for a new job; a repeated request gets its job's status now
    job_id: str
    status_url: str


class SyncResponse(BaseModel):
    """?wait=true: the old synchronous shape."""

    status: Literal["success", "error"]
    job_id: str
    policy_path: str | None = None
    job_status: JobStatus
    error: dict[str, str] | None = None


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    percent: float = 0.0
    eta_seconds: float | None = None


class JobError(BaseModel):
    type: str
    message: str


class Artifact(BaseModel):
    uri: str
    files: list[str]


class JobView(BaseModel):
    job_id: str
    community_id: str
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress
    metrics: dict[str, Any] = {}
    final_eval: dict[str, Any] = {}
    artifact: Artifact | None = None
    error: JobError | None = None
    config: dict[str, Any] = {}
    model: str | None = Field(None, description="the base model: a preset's model, or the allowed hub id / path")
    hyperparameters: dict[str, Any] = Field(
        {}, description="the full effective training config, resolved at the trigger"
    )
    trained_tokens: int | None = Field(None, description="chosen + rejected tokens trained on, epochs counted")
    suffix: str | None = None
    metadata: dict[str, str] = {}
    result_files: list[str] = Field([], description="the artifact's files, by URI")
    source: str
    records: int | None = None
    runner: str | None = Field(
        None,
        description="the configured DPO_RUNNER_MODE; once trained, the path that ran: inprocess, subprocess, torchrun",
    )


class JobList(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = None


class Event(BaseModel):
    seq: int
    ts: float
    kind: str
    data: dict[str, Any]


class EventList(BaseModel):
    events: list[Event]
    last_seq: int


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    details: list[dict[str, str]] | None = None
    error_id: str | None = None


class ErrorBody(BaseModel):
    """Every error response: {"error": {"code", "message", "field"?, ...}}."""

    error: ErrorDetail


def errors(*codes: int) -> dict:
    """OpenAPI entries for the error statuses an endpoint can answer."""
    return {code: {"model": ErrorBody} for code in (*codes, 413, 500)}


class Health(BaseModel):
    status: str
    service: str
    version: str


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]


VIEW_FIELDS = ("hyperparameters", "suffix", "metadata")  # kept in a job's config, shown at the view's top level


def config_of_view(view: dict) -> dict:
    """A job's config back from its view (job_view moved VIEW_FIELDS to the top level)."""
    return {**(view.get("config") or {}), **{key: view.get(key) for key in VIEW_FIELDS if key in view}}


def job_view(job: Job) -> dict:
    """A store record -> the JobView shape (also the body of `dpo_jobs/{jobId}` in Firestore)."""
    artifact = {"uri": job.artifact_uri, "files": job.artifact_files or []} if job.artifact_uri else None
    error = {"type": job.error_type, "message": job.error_message or ""} if job.error_type else None
    hyper = job.config.get("hyperparameters") or {}
    return {
        "job_id": job.id,
        "community_id": job.community_id,
        "status": job.status,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "progress": {"step": 0, "epoch": 0.0, "percent": 0.0, **job.progress},
        "metrics": job.metrics,
        "final_eval": job.final_eval,
        "artifact": artifact,
        "error": error,
        "config": {k: v for k, v in job.config.items() if k not in VIEW_FIELDS},
        "model": hyper.get("model", {}).get("name_or_path"),
        "hyperparameters": hyper,
        "trained_tokens": (job.metrics or {}).get("trained_tokens"),
        "suffix": job.config.get("suffix"),
        "metadata": job.config.get("metadata") or {},
        "result_files": [f"{job.artifact_uri.rstrip('/')}/{f}" for f in artifact["files"]] if artifact else [],
        "source": job.source,
        "records": job.records,
        "runner": job.runner,
    }


def job_or_404(store, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise NotFound(JOB_NOT_FOUND)
    return job


def jobs_page(store, community_id: str | None, status: str | None, limit: int, cursor: str | None) -> dict:
    """One page of the JobList (newest first); 422 for a cursor this service did not hand out."""
    try:
        jobs, next_cursor = store.list(community_id, status, limit, cursor)
    except BadCursor:
        raise Invalid("cursor: not a cursor this service handed out", field="cursor") from None
    return {"jobs": [job_view(j) for j in jobs], "next_cursor": next_cursor}


def events_page(store, job_id: str, after: int, limit: int) -> dict:
    """A job's events after seq `after` (404 for an unknown job), and the seq to ask after next."""
    job_or_404(store, job_id)
    events = store.events(job_id, after, limit)
    return {"events": events, "last_seq": events[-1]["seq"] if events else after}
