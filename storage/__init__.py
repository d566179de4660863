"""Preference sources and artifact stores, chosen by settings (DPO_STORAGE_BACKEND)."""

from storage.base import ArtifactStore, PreferenceSource, SourceError, StorageError, StoredArtifact

__all__ = ["ArtifactStore", "PreferenceSource", "SourceError", "StorageError", "StoredArtifact", "build_storage"]


def build_storage(settings):
    """(preference source, artifact store) for the configured backend."""
    if settings.storage_backend == "local":
        from storage.local import LocalArtifactStore, LocalPreferenceSource

        return LocalPreferenceSource(settings.preferences_dir), LocalArtifactStore(settings.artifacts_dir)
    raise ValueError(f"DPO_STORAGE_BACKEND: expected local | firebase, got {settings.storage_backend!r}")
