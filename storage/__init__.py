"""Preference sources and artifact stores, chosen by settings (DPO_STORAGE_BACKEND)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.base import ArtifactStore, PreferenceSource, SourceError, StorageError, StoredArtifact

__all__ = [
    "ArtifactStore",
    "PreferenceSource",
    "SourceError",
    "Storage",
    "StorageError",
    "StoredArtifact",
    "build_storage",
]


@dataclass
class Storage:
    source: PreferenceSource
    artifacts: ArtifactStore
    firebase: Any = None  # FirebaseClients with the Firebase backend (for the job mirror)


def build_storage(settings) -> Storage:
    """The configured backend's preference source and artifact store."""
    if settings.storage_backend == "local":
        from storage.local import LocalArtifactStore, LocalPreferenceSource

        return Storage(LocalPreferenceSource(settings.preferences_dir), LocalArtifactStore(settings.artifacts_dir))
    if settings.storage_backend == "firebase":
        from storage.firebase import FirebaseArtifactStore, FirebaseClients, FirestorePreferenceSource

        clients = FirebaseClients.from_settings(settings)
        source = FirestorePreferenceSource(
            clients,
            settings.firestore_preferences_path,
            settings.firestore_page_size,
            settings.storage_retry_deadline_s,
            settings.firestore_validation_path,
        )
        artifacts = FirebaseArtifactStore(clients, settings.artifacts_prefix, settings.storage_retry_deadline_s)
        return Storage(source, artifacts, clients)
    raise ValueError(f"DPO_STORAGE_BACKEND: expected local | firebase, got {settings.storage_backend!r}")
