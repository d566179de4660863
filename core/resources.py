"""What the app's lifespan builds and the routes use, typed, and the FastAPI dependencies that
hand it to them (StoreDep, RunnerDep, ...), so no route reaches into an untyped app.state; and
the path and query parameters the API and the dashboard share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Query, Request

from core.metrics import Metrics
from core.runner import Runner
from core.settings import Settings
from core.store import JOB_ID_PATTERN, JobStore
from storage.base import ArtifactStore, PreferenceSource


@dataclass
class Resources:
    store: JobStore
    source: PreferenceSource
    artifacts: ArtifactStore
    runner: Runner
    metrics: Metrics


def _resources(request: Request) -> Resources:
    return request.app.state.resources


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # set by create_app, before the lifespan runs


def _store(resources: Annotated[Resources, Depends(_resources)]) -> JobStore:
    return resources.store


def _runner(resources: Annotated[Resources, Depends(_resources)]) -> Runner:
    return resources.runner


ResourcesDep = Annotated[Resources, Depends(_resources)]
SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
RunnerDep = Annotated[Runner, Depends(_runner)]
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="32 hex characters")]
Cursor = Annotated[str | None, Query(pattern=r"^[0-9a-f]{1,32}$", description="next_cursor of the previous page")]
