"""What the app's lifespan builds and the routes use, typed, and the FastAPI dependencies that
hand it to them (StoreDep, RunnerDep, ...), so no route reaches into an untyped app.state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from core.metrics import Metrics
from core.runner import Runner
from core.settings import Settings
from core.store import JobStore
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
