"""Bringing a format-1 disk store to today's checksums, once, when it opens.

Format 1 recorded each block's checksum as xxh3_64 of the whole block (`LEGACY_CHECKSUM`).
Today every tier uses `TREE_CHECKSUM`, which the GPU computes where the bytes are, so an old
manifest's values cannot verify a read any more. On the first open by today's code, every
record that recovery trusts is read once, verified with the old function and re-hashed with the
new one; the new checksums, the deletion of the blocks that failed (and of their descendants,
which hang from nothing then) and the new identity are one LMDB transaction. A crash before it
commits leaves the old manifest as it was, migrated again at the next open; after it, the store
is a format-2 store like any other.

Why eager and not a per-record algorithm tag: one format for every record afterwards, so no read
path (GPU verification included) ever needs to know the old function, at the cost of reading
the disk tier once, at disk speed, on the first open only.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import lmdb

from ...errors import StorageError
from ...integrity import checksum_rows, legacy_checksum_rows
from .manifest import Record
from .recovery import Trusted

if TYPE_CHECKING:
    from .tier import DiskTier

MIGRATE_BATCH_BYTES = 64 << 20  # rows read at a time while re-hashing


def migrate_checksums(tier: DiskTier, trusted: Trusted, identity: dict[str, Any]) -> Trusted:
    """`trusted` (parents first) with every checksum re-hashed by `TREE_CHECKSUM`, committed with `identity`.

    A record whose bytes do not match its old checksum, or cannot be read, is dropped with its
    descendants, counted by reason. StorageError when the manifest cannot take the rewrite (the
    store then does not open, and the old manifest stays as it was).
    """
    records = trusted.records
    per = max(1, MIGRATE_BATCH_BYTES // max(tier.slot_bytes, 1))
    kept: list[Record] = []
    gone: set[bytes] = set()
    reasons: Counter[str] = Counter()
    for a in range(0, len(records), per):
        batch = records[a : a + per]
        read = tier.read_some([r.slot for r in batch])
        lost = set(read.unreadable)
        old = legacy_checksum_rows(read.rows)
        new = checksum_rows(read.rows)
        for i, rec in enumerate(batch):
            if rec.parent_key is not None and rec.parent_key in gone:
                why = "no trusted parent"
            elif i in lost:
                why = "unreadable while migrating checksums"
            elif old[i] != rec.checksum:
                why = "checksum mismatch while migrating checksums"
            else:
                kept.append(rec._replace(checksum=new[i]))
                continue
            gone.add(rec.key)
            reasons[why] += 1
    manifest = tier.manifest
    try:
        with manifest.env.begin(write=True) as txn:
            for key in gone:
                txn.delete(key, db=manifest.blocks)
            for rec in kept:
                txn.put(rec.key, rec.pack(), db=manifest.blocks)
            txn.put(b"identity", json.dumps(identity, sort_keys=True).encode(), db=manifest.meta)
    except lmdb.Error as e:
        raise StorageError(f"disk tier: cannot migrate the checksums of {manifest.path} to this format: {e}; "
                           "free space there and open it again (the old manifest is unchanged)") from None
    return Trusted(kept, trusted.dropped, trusted.reasons + reasons)
