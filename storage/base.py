"""The two small protocols every backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol


class SourceError(Exception):
    """The community's records cannot be read (none found, unreadable, bad document)."""


class StorageError(Exception):
    """An artifact could not be stored; whatever was written has been removed."""


@dataclass
class StoredArtifact:
    uri: str
    files: list[str]


class PreferenceSource(Protocol):
    name: str

    def fetch(
        self, community_id: str, since: datetime | None = None, limit: int | None = None
    ) -> tuple[list[Any], list[str]]:
        """The community's records (createdAt >= since, at most limit) and an id for each (for error messages)."""

    def validation(self, community_id: str, limit: int | None = None) -> tuple[list[Any], list[str]] | None:
        """The community's own held-out records and their ids, or None when it keeps none."""

    def check(self) -> str | None:
        """None when reachable, else what is wrong (for /ready)."""


class ArtifactStore(Protocol):
    def save(self, run_dir: Path, community_id: str, job_id: str, manifest_extra: dict | None = None) -> StoredArtifact:
        """Store everything under run_dir for this job; all or nothing."""

    def check(self) -> str | None:
        """None when writable, else what is wrong (for /ready)."""
