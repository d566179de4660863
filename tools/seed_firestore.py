"""Write a JSONL/JSON file of preference records (any format) into a community's Firestore collection.

    # against the emulator (make emulators prints these variables) or a dev project
    python tools/seed_firestore.py --community demo --file datasets/sample.jsonl
    python tools/seed_firestore.py --community demo --toy 256 --format chat

Each record becomes one document (id = a zero-padded sequence number unless --random-ids) with a
createdAt timestamp, in batches of 500 writes. Project and credentials come from the environment
(DPO_FIREBASE_PROJECT_ID / GOOGLE_CLOUD_PROJECT, GOOGLE_APPLICATION_CREDENTIALS or
DPO_FIREBASE_CREDENTIALS; anonymous when FIRESTORE_EMULATOR_HOST is set).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import Settings  # noqa: E402
from storage.firebase import FirebaseClients  # noqa: E402

BATCH = 500


def firestore_safe(record) -> dict:
    """Firestore has no arrays of arrays: ranked pairs [[i, j]] are written as [{preferred, rejected}]."""
    data = dict(record) if isinstance(record, dict) else {"value": record}
    pairs = data.get("pairs")
    if isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 for p in pairs):
        data["pairs"] = [{"preferred": p[0], "rejected": p[1]} for p in pairs]
    return data


def seed(
    clients: FirebaseClients, collection_path: str, records: list, random_ids: bool = False, start: int = 0
) -> int:
    """Write records as documents; returns how many were written."""
    db = clients.firestore()
    collection = db.collection(collection_path)
    now = dt.datetime.now(dt.UTC)
    batch, written = db.batch(), 0
    for i, record in enumerate(records, start=start):
        doc_id = uuid.uuid4().hex if random_ids else f"{i:08d}"
        data = firestore_safe(record)
        data.setdefault("createdAt", now)
        batch.set(collection.document(doc_id), data)
        written += 1
        if written % BATCH == 0:
            batch.commit()
            batch = db.batch()
    if written % BATCH:
        batch.commit()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--community", required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--file", help="a .jsonl or .json file of records")
    group.add_argument("--toy", type=int, metavar="N", help="N generated toy records")
    parser.add_argument("--format", default="pairs", choices=("pairs", "ranked", "chat"), help="toy record format")
    parser.add_argument("--random-ids", action="store_true")
    args = parser.parse_args(argv)

    from training.records import load_records_file

    if args.file:
        records = load_records_file(args.file)
    else:
        from tools.toy_data import toy_records

        records = toy_records(args.toy, args.format)
    settings = Settings()
    path = settings.firestore_preferences_path.format(communityId=args.community)
    n = seed(FirebaseClients.from_settings(settings), path, records, args.random_ids)
    print(f"wrote {n} documents to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
