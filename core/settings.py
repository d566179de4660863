"""Deployment settings from environment variables (prefix DPO_). Secrets never live in Hydra configs."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from training.config import available

TOKEN_MIN_DISTINCT = 6  # a dashboard token's different characters
TOKEN_MIN_BITS = 36  # and its estimated entropy: refuses `aaaa...`, `abab...`; a random 16-hex token has ~53


def token_entropy_bits(token: str) -> float:
    """An estimate: the token's length x the Shannon entropy of its own characters' frequencies
    (a lower bound's stand-in, blind to words and sequences: it catches repetition only)."""
    counts = [token.count(c) for c in set(token)]
    return -sum(n * math.log2(n / len(token)) for n in counts)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DPO_", extra="ignore")

    log_format: Literal["text", "json"] = "text"  # json: one object a line (severity, job_id, ...); the image's default

    # Auth
    webhook_secret: SecretStr | None = None  # HMAC key(s) for X-DPO-Signature: "current" or "current,previous"
    allow_unsigned: bool = False  # only for local experiments; logs a loud warning
    signature_tolerance_s: int = 300  # reject timestamps further than this from the server clock

    # The jobs dashboard at /ui: off unless a token is set; operators log in with it (core/dashboard.py)
    dashboard_token: SecretStr | None = None
    dashboard_session_s: float = Field(8 * 3600, gt=0)  # a dashboard login lasts this long
    dashboard_login_failures: int = Field(5, ge=1)  # failed logins a minute per client, then 429
    dashboard_login_failures_global: int = Field(20, ge=1)  # failed logins a minute from all clients, then 429
    # Host names this service answers to (comma-separated; unset: any). Another Host is a 400,
    # except on the probes /health, /ready and /metrics (load balancers probe by address).
    allowed_hosts: Annotated[list[str], NoDecode] = []

    # Jobs
    job_store: Literal["sqlite", "firestore"] = "sqlite"  # firestore: several replicas share one queue
    job_lease_s: float = Field(30, ge=2)  # a worker renews its job's lease; expired: another worker takes the job
    public_base_url: str | None = None  # what clients reach the service at (status_url), e.g. the load balancer
    data_dir: Path = Path("data")  # job store (jobs.sqlite3) and per-job working directories
    max_concurrent_jobs: int = Field(1, ge=1, le=64)  # worker slots; they share the GPUs below without overlap
    gpus: Annotated[
        list[str], NoDecode
    ] = []  # "0,1,2,3": this replica's GPUs (default: CUDA_VISIBLE_DEVICES, /dev/nvidiaN)
    dist_timeout_s: float = Field(600, gt=0)  # a multi-GPU job's rank that hangs in a collective fails after this
    runner_mode: Literal["auto", "inprocess", "subprocess"] = "auto"
    callback_allowed_hosts: Annotated[list[str], NoDecode] = []  # comma-separated in the environment
    callback_secret: SecretStr | None = None  # Standard Webhooks key for callbacks ("whsec_<base64>" or any string)
    callback_timeout_s: float = 10.0
    callback_retries: int = 4
    checkpoint_every: int = Field(50, ge=0)  # training steps between checkpoints (crash recovery)
    job_stall_s: float = Field(300, gt=0)  # a trainer subprocess silent this long is stopped ('stalled')
    stop_grace_s: float = Field(20, gt=0)  # after SIGTERM, a trainer subprocess gets this long before SIGKILL
    job_timeout_s: float = Field(24 * 3600, gt=0)  # a job running longer fails with 'timeout'
    wait_max_s: float = Field(600, gt=0)  # ?wait=true answers 202 (still running: poll) after this long

    # Models. The default is the model a trigger without config.model trains: a config/model preset
    # name, or a hub id / local path from the allow-list (trained with the `custom` preset's settings).
    default_model: str = "tiny"
    default_loss: str = "dpo"
    allowed_models: Annotated[list[str], NoDecode] = []  # hub ids or local paths callers may name (comma-separated)

    # Limits (each breach is a clear 4xx)
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # 413 above
    max_records: int = Field(100_000, ge=1)  # records per job
    max_field_chars: int = Field(100_000, ge=16)  # characters in any one string of a record
    max_queued_jobs: int = Field(100, ge=1)  # 429 + Retry-After when the queue holds this many
    max_queued_per_community: int = Field(
        10, ge=1
    )  # 429 when one community has this many queued (no-op with one job per community)
    idempotency_ttl_s: float = Field(24 * 3600, gt=0)  # an Idempotency-Key is remembered this long
    one_job_per_community: bool = True  # a second active job for a community is a 409

    # Storage
    storage_backend: Literal["local", "firebase"] = "local"
    preferences_dir: Path = Path("data/preferences")  # local source: <dir>/<communityId>.jsonl|.json|.parquet
    artifacts_dir: Path = Path("artifacts")  # local store: <dir>/<communityId>/<jobId>/

    # Firebase (DPO_STORAGE_BACKEND=firebase). Credentials: DPO_FIREBASE_CREDENTIALS (a credential
    # file of any type google.auth loads), else Google's default chain (GOOGLE_APPLICATION_CREDENTIALS,
    # gcloud's login, workload identity); anonymous against the emulators.
    firebase_credentials: Path | None = None
    firebase_project_id: str | None = Field(
        None, validation_alias=AliasChoices("DPO_FIREBASE_PROJECT_ID", "GOOGLE_CLOUD_PROJECT")
    )
    firebase_storage_bucket: str | None = None
    firestore_preferences_path: str = "communities/{communityId}/preferences"
    # a community's own held-out records: a job reading the source evaluates on them when there are any
    firestore_validation_path: str = "communities/{communityId}/validation"
    firestore_jobs_collection: str = "dpo_jobs"
    firestore_page_size: int = Field(500, ge=1, le=10000)
    artifacts_prefix: str = "policies/{communityId}/{jobId}/"
    storage_retry_deadline_s: float = Field(60.0, gt=0)  # transient Cloud Storage errors are retried this long

    @field_validator("callback_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value):
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @field_validator("data_dir", "preferences_dir", "artifacts_dir", "firebase_credentials")
    @classmethod
    def _absolute(cls, value):
        """Resolved against the working directory the server starts in, once: a training
        subprocess (started elsewhere) and a later chdir see the same places."""
        return None if value is None else value.expanduser().resolve()

    @field_validator("dashboard_token")
    @classmethod
    def _long_token(cls, value):
        if value is None:
            return value
        token = value.get_secret_value()
        if len(token) < 16:
            raise ValueError("expected at least 16 characters (e.g. `openssl rand -hex 24`): it guards a login")
        if len(set(token)) < TOKEN_MIN_DISTINCT or token_entropy_bits(token) < TOKEN_MIN_BITS:
            raise ValueError(
                f"too guessable: expected at least {TOKEN_MIN_DISTINCT} different characters and an estimated"
                f" {TOKEN_MIN_BITS} bits (length x the Shannon entropy of its characters); use a random"
                " token, e.g. `openssl rand -hex 24`"
            )
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_allowed_hosts(cls, value):
        if isinstance(value, str):
            value = [h.strip().lower().removeprefix("[").removesuffix("]") for h in value.split(",") if h.strip()]
        for host in value:
            if any(c in host for c in "/@ ") or (":" in host and host.count(":") == 1):
                raise ValueError(
                    f"expected host names without scheme, port or path (e.g. dpo.example.com), got {host!r}"
                )
        return value

    @field_validator("public_base_url")
    @classmethod
    def _base_url(cls, value):
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL, e.g. https://dpo.example.com")
        return value.rstrip("/")

    @field_validator("gpus", mode="before")
    @classmethod
    def _split_gpus(cls, value):
        if isinstance(value, str):
            value = [g.strip() for g in value.split(",") if g.strip()]
        if len(set(value)) != len(value):
            raise ValueError("a GPU is listed twice")
        return value

    @field_validator("allowed_models", mode="before")
    @classmethod
    def _split_models(cls, value):
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("default_model")
    @classmethod
    def _usable_model(cls, value):
        if not value.strip() or value == "custom":
            raise ValueError("expected a preset name, a hub id or a local path (the `custom` preset needs one)")
        return value

    @field_validator("default_loss")
    @classmethod
    def _known_loss(cls, value):
        if value not in available("loss"):
            raise ValueError(f"expected one of {available('loss')}")
        return value

    @model_validator(mode="after")
    def _shared_store_needs_firebase(self):
        if self.job_store == "firestore" and self.storage_backend != "firebase":
            raise ValueError(
                "DPO_JOB_STORE=firestore needs DPO_STORAGE_BACKEND=firebase: a job that moves to another"
                " replica finds its dataset and checkpoints in Cloud Storage"
            )
        return self

    @model_validator(mode="after")
    def _keys_outlive_replays(self):
        """A trigger is re-sendable with its Idempotency-Key while its signature is fresh: up to
        2 x the tolerance after it first arrived (a `t` up to the tolerance ahead of the clock). A
        key forgotten sooner would turn that replay into a second job."""
        if self.idempotency_ttl_s < 2 * self.signature_tolerance_s:
            raise ValueError(
                f"DPO_IDEMPOTENCY_TTL_S ({self.idempotency_ttl_s:g} s) must be at least twice"
                f" DPO_SIGNATURE_TOLERANCE_S ({self.signature_tolerance_s} s): a captured trigger stays"
                " valid that long, and an Idempotency-Key forgotten sooner lets it make a second job"
            )
        return self

    @property
    def webhook_secrets(self) -> list[str] | None:
        """The request-signing secrets (current first), or None when unsigned requests are allowed."""
        if self.webhook_secret is None:
            return None
        return [s.strip() for s in self.webhook_secret.get_secret_value().split(",") if s.strip()]

    @property
    def job_db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def work_root(self) -> Path:
        return self.data_dir / "work"

    @property
    def checkpoint_root(self) -> Path:
        return self.data_dir / "checkpoints"


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_problem(err: ValidationError) -> str:
    """A settings error as one line naming the variables: what the server prints when it refuses
    to start (not pydantic's multi-line report with the values echoed)."""
    parts = []
    for item in err.errors():
        cause = item.get("ctx", {}).get("error")
        message = str(cause) if cause is not None else item["msg"]
        field = ".".join(str(p) for p in item["loc"])
        parts.append(f"DPO_{field.upper()}: {message}" if field else message)
    return "invalid settings, refusing to start: " + "; ".join(parts)
