"""Local filesystem backend: records from <dir>/<communityId>.jsonl|.json|.parquet (held-out ones
from <communityId>.validation.jsonl|...), artifacts to a directory."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from storage.base import SourceError, StorageError, StoredArtifact
from storage.manifest import MANIFEST, build_manifest, write_manifest
from training.records import RECORD_FILES, RecordError, load_records_file

log = logging.getLogger(__name__)


class LocalPreferenceSource:
    name = "local"

    def __init__(self, root: Path):
        self.root = Path(root)

    def _file(self, stem: str) -> Path | None:
        return next((p for p in (self.root / f"{stem}{suffix}" for suffix in RECORD_FILES) if p.is_file()), None)

    @staticmethod
    def _load(path: Path) -> tuple[list[Any], list[str]]:
        try:
            records = load_records_file(str(path))
        except (RecordError, UnicodeDecodeError, ValueError) as err:
            raise SourceError(f"{path.name}: {err}") from None
        return records, [f"{path.name}:{i}" for i in range(len(records))]

    def validation(self, community_id: str, limit: int | None = None) -> tuple[list[Any], list[str]] | None:
        """<communityId>.validation.jsonl|.json|.parquet next to the records, or None."""
        path = self._file(f"{community_id}.validation")
        if path is None:
            return None
        records, ids = self._load(path)
        return (records[:limit], ids[:limit]) if records else None

    def fetch(
        self, community_id: str, since: datetime | None = None, limit: int | None = None
    ) -> tuple[list[Any], list[str]]:
        path = self._file(community_id)
        if path is None:
            raise SourceError(
                f"no preference records for community '{community_id}' (no {community_id}.jsonl, .json or .parquet in the data directory)"
            )
        records, ids = self._load(path)
        if since is not None:  # like Firestore's where(createdAt >= since): records without it drop out
            created = [_created_at(r) for r in records]
            keep = [i for i, c in enumerate(created) if c is not None and c >= since]
            records, ids = [records[i] for i in keep], [ids[i] for i in keep]
        if limit is not None:
            records, ids = records[:limit], ids[:limit]
        if not records:
            raise SourceError(f"no preference records for community '{community_id}' ({path.name} has none that match)")
        return records, ids

    def check(self) -> str | None:
        return None if self.root.is_dir() or not self.root.exists() else "the preferences path is not a directory"


def _created_at(record: Any) -> datetime | None:
    value = record.get("createdAt") if isinstance(record, dict) else None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return parsed.replace(tzinfo=parsed.tzinfo or UTC) if parsed else None


class LocalArtifactStore:
    """<root>/<communityId>/<jobId>/: copied aside, manifest written last, then renamed into place,
    so a reader never sees a half-written artifact."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def save(self, run_dir: Path, community_id: str, job_id: str, manifest_extra: dict | None = None) -> StoredArtifact:
        """Idempotent for a job: a complete copy from an earlier attempt (its manifest written
        last) is kept; an incomplete one is replaced."""
        final = self.root / community_id / job_id
        if (final / MANIFEST).exists():
            return self._stored(final, json.loads((final / MANIFEST).read_text()))
        staging = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{job_id}-", dir=final.parent))
            shutil.copytree(run_dir, staging, dirs_exist_ok=True)
            manifest = build_manifest(staging, job_id, community_id, manifest_extra)
            write_manifest(staging, manifest)
            if final.exists():  # an earlier attempt stopped before its manifest
                shutil.rmtree(final)
            staging.rename(final)
        except OSError as err:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            log.error("could not store the artifact of job %s in %s: %s", job_id, final, err)
            # the message goes to callers: no server paths in it
            raise StorageError(
                f"could not store the artifact of job {job_id}: {err.strerror or type(err).__name__}"
            ) from err
        return self._stored(final, manifest)

    @staticmethod
    def _stored(final: Path, manifest: dict) -> StoredArtifact:
        return StoredArtifact(uri=final.resolve().as_uri(), files=[f["path"] for f in manifest["files"]] + [MANIFEST])

    def check(self) -> str | None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root):
                pass
            return None
        except OSError as err:
            return f"artifacts directory is not writable: {err.strerror}"
