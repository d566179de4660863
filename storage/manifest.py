"""manifest.json: the list of an artifact's files with sizes and sha256, written last."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(run_dir: Path, job_id: str, community_id: str, extra: dict | None = None) -> dict:
    files = [
        {"path": str(p.relative_to(run_dir)), "size": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    ]
    return {"job_id": job_id, "community_id": community_id, "created_at": time.time(), "files": files, **(extra or {})}


def write_manifest(run_dir: Path, manifest: dict) -> Path:
    path = run_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path
