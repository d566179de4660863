"""Download a job's artifact from Cloud Storage by job id and verify it against its manifest.

    python tools/download_artifact.py JOB_ID --out ./policy [--community demo]

The job's community is read from its Firestore mirror (dpo_jobs/{jobId}) unless given. Refuses an
artifact without manifest.json (an upload that never completed) and checks every file's sha256.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import Settings  # noqa: E402
from core.store import JOB_ID_PATTERN  # noqa: E402
from storage.firebase import FirebaseClients  # noqa: E402
from storage.manifest import MANIFEST, sha256_of  # noqa: E402


class DownloadError(RuntimeError):
    pass


def inside(out: Path, name: object) -> Path:
    """Where manifest entry `name` goes: a relative path that stays inside `out`, else refused
    (a manifest is data from the bucket: "../x" or "/etc/x" must not write outside --out)."""
    if not isinstance(name, str) or not name or "\\" in name or Path(name).is_absolute():
        raise DownloadError(f"manifest entry {name!r}: not a relative path inside the artifact")
    target = (out / name).resolve()
    if not target.is_relative_to(out.resolve()) or target == out.resolve():
        raise DownloadError(f"manifest entry {name!r}: resolves outside --out ({out})")
    return target


def download(
    clients: FirebaseClients, settings: Settings, job_id: str, out: Path, community: str | None = None
) -> dict:
    """Fetch every file listed in the manifest into `out`; returns the manifest."""
    if not re.fullmatch(JOB_ID_PATTERN, job_id):
        raise DownloadError(f"not a job id: {job_id!r}")
    if community is None:
        doc = clients.firestore().collection(settings.firestore_jobs_collection).document(job_id).get()
        if not doc.exists:
            raise DownloadError(f"job {job_id} not found in {settings.firestore_jobs_collection}; pass --community")
        community = doc.to_dict()["community_id"]
    prefix = settings.artifacts_prefix.format(communityId=community, jobId=job_id)
    bucket = clients.bucket()
    manifest_blob = bucket.blob(prefix + MANIFEST)
    if not manifest_blob.exists():
        raise DownloadError(f"no {MANIFEST} at gs://{bucket.name}/{prefix}: the artifact is missing or incomplete")
    manifest = json.loads(manifest_blob.download_as_bytes())
    out.mkdir(parents=True, exist_ok=True)
    targets = [(entry, inside(out, entry["path"])) for entry in manifest["files"]]  # all checked first
    for entry, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")  # moved into place only once verified
        try:
            bucket.blob(prefix + entry["path"]).download_to_filename(str(partial))
            digest = sha256_of(partial)  # streamed: a 7B model's weights are ~14 GB
            if digest != entry["sha256"]:
                raise DownloadError(f"{entry['path']}: sha256 {digest} does not match the manifest's {entry['sha256']}")
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job_id")
    parser.add_argument("--out", required=True)
    parser.add_argument("--community", default=None)
    args = parser.parse_args(argv)
    settings = Settings()
    try:
        manifest = download(
            FirebaseClients.from_settings(settings), settings, args.job_id, Path(args.out), args.community
        )
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"downloaded {len(manifest['files'])} files of job {args.job_id} to {args.out} (sha256 verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
