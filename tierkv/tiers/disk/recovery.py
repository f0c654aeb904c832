"""Which manifest records a warm start can trust, and the directory a disk tier lives in.

Recovery is a pure function of the records: a record is kept only if it is the block it claims
to be (its key is the hash of its ident, and the ident is a parent key and one block of tokens),
its recency is a stamp the clock can have reached, its slot is in range and not taken by
another, and its parent chain reaches a root through kept records. Anything else (a damaged or
altered record, an orphan, a slot out of range after `disk_bytes` shrank, a duplicate, a loop)
cannot be served and is dropped, counted by reason. A record whose ident was altered would
otherwise sit in the index unreachable forever: a lookup computes keys from tokens, and no
tokens hash to its key.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from ...errors import TierKVError
from .manifest import KEY_BYTES, Record

_hash = xxhash.xxh3_128_digest
# The recency clock ticks once per operation: 2**48 is ten thousand years of a million a second.
# A larger stamp is a damaged record, and trusting it would run the clock past the 64 bits a
# record stores (every later commit would fail to pack).
MAX_LAST_USE = 1 << 48


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off for a bulk load (restored as it was, whatever happens).

    A warm restart makes a few objects per record (the record, its bytes, the index's block) and
    none of them is garbage; with 100k records the collector ran over and over through all of
    them, and that was most of the open (about 0.9 of 1.5 s CPU on the 2-core dev VM, docs/reliability.md).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


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
    """The outcome of recovery: records to rebuild the index from (parents first), keys to delete, and why."""

    records: list[Record]
    dropped: list[bytes]
    reasons: Counter[str] = field(default_factory=Counter)  # reason -> records dropped for it


def trusted_records(records: Mapping[bytes, Record], num_slots: int, ident_bytes: int | None = None) -> Trusted:
    """Sort the manifest's records into those a restart serves (parents before children) and the rest.

    `ident_bytes` is the size of a block's ident (the parent key and one block of token ids);
    None skips that check.
    """
    accepted: dict[bytes, bool] = {}  # key -> kept (True) or dropped (False)
    used: set[int] = set()
    order: list[Record] = []
    dropped: list[bytes] = []
    reasons: Counter[str] = Counter()
    for key, rec in records.items():
        size = len(rec.ident)
        if size < KEY_BYTES or (ident_bytes is not None and size != ident_bytes):
            why = "ident of the wrong size"
        elif _hash(rec.ident) != key:
            why = "key is not the hash of its ident"
        elif rec.last_use >= MAX_LAST_USE:
            why = "implausible last use"
        else:
            continue
        accepted[key] = False
        dropped.append(key)
        reasons[why] += 1
    for key in records:
        if key in accepted:  # settled as an ancestor of an earlier key: most keys, on a warm restart
            continue
        # Walk up to a settled ancestor (or a root), then settle the chain top-down. The chain is
        # a dict (insertion-ordered) so that it also finds a loop; the walk is written out, not
        # through `Record.parent_key`, because it runs once per record of a 100k-block restart.
        chain: dict[bytes, Record] = {}
        cur: bytes | None = key
        ok = True
        while cur is not None and cur not in accepted:
            record = records.get(cur)
            if record is None or cur in chain:  # missing parent, or a loop
                ok = False
                break
            chain[cur] = record
            cur = None if record.is_root else record.ident[:KEY_BYTES]
        else:
            ok = cur is None or accepted[cur]
        why = "no trusted parent"  # a missing or dropped parent, or a loop
        for record in reversed(chain.values()):
            slot = record.slot
            if ok:
                if not 0 <= slot < num_slots:
                    ok, why = False, "slot beyond the data files"
                elif slot in used:
                    ok, why = False, "slot claimed twice"
            accepted[record.key] = ok
            if ok:
                used.add(slot)
                order.append(record)
            else:
                dropped.append(record.key)
                reasons[why] += 1
                why = "no trusted parent"
    return Trusted(order, dropped, reasons)
