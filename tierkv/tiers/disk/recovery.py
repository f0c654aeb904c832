"""Which manifest records a warm start can trust, and the directory a disk tier lives in.

Recovery is a pure function of the records: a record is kept only if its slot is in range and
not taken by another, and its parent chain reaches a root through kept records. Anything else
(an orphan, a slot out of range after `disk_bytes` shrank, a duplicate, a loop) cannot be
served and is dropped, counted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ...errors import TierKVError
from .manifest import Record


def prepare_directory(path: str) -> Path:
    """The disk tier's directory, created if only its last component is missing."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise TierKVError(f"disk_path {p} is a file, not a directory; point disk_path at a directory")
    if not p.exists():
        if not p.parent.is_dir():
            raise TierKVError(f"disk_path {p} does not exist, nor does its parent {p.parent}; create it first")
        try:
            p.mkdir()
        except OSError as e:
            raise TierKVError(f"disk_path {p} cannot be created: {e.strerror}") from None
    if not os.access(p, os.R_OK | os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise TierKVError(f"disk_path {p}: permission denied (the store needs read and write access)")
    return p


@dataclass(frozen=True)
class Trusted:
    """The outcome of recovery: records to rebuild the index from (parents first), and keys to delete."""

    records: list[Record]
    dropped: list[bytes]


def trusted_records(records: Mapping[bytes, Record], num_slots: int) -> Trusted:
    """Sort the manifest's records into those a restart serves (parents before children) and the rest."""
    accepted: dict[bytes, bool] = {}  # key -> kept (True) or dropped (False)
    used: set[int] = set()
    order: list[Record] = []
    dropped: list[bytes] = []
    for key in records:
        # Walk up to a settled ancestor (or a root), then settle the chain top-down.
        chain: list[Record] = []
        on_chain: set[bytes] = set()
        cur: bytes | None = key
        ok = True
        while cur is not None and cur not in accepted:
            record = records.get(cur)
            if record is None or cur in on_chain:  # missing parent, or a loop
                ok = False
                break
            chain.append(record)
            on_chain.add(cur)
            cur = record.parent_key
        else:
            ok = cur is None or accepted[cur]
        for record in reversed(chain):
            ok = ok and 0 <= record.slot < num_slots and record.slot not in used
            accepted[record.key] = ok
            if ok:
                used.add(record.slot)
                order.append(record)
            else:
                dropped.append(record.key)
    return Trusted(order, dropped)
