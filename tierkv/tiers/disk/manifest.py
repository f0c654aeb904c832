"""The disk tier's manifest: an LMDB database of which block each data-file slot holds.

A block enters the manifest only after its payload is durable (per the durability setting),
so after a crash every entry points at bytes that were fully written — or, if a slot was
reused and the crash hit between data and manifest, at bytes whose checksum no longer
matches, which the store detects and drops. A slot without an entry is free space.

LMDB gives atomic multi-entry commits, crash safety without a log of our own, and readers
in other processes (the vLLM scheduler reads what workers wrote).
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import lmdb

from ...errors import LayoutMismatchError, TierKVError

MANIFEST_FORMAT = 1
_RECORD = struct.Struct("<QQQB")  # slot, checksum, last_use, is_root; the ident follows
_IDENTITY = b"identity"


class Record(NamedTuple):
    """One manifest entry: which block a data-file slot holds. The one field order of a record."""

    key: bytes
    slot: int
    checksum: int
    last_use: int
    is_root: bool
    ident: bytes  # parent key (or namespace seed) || token bytes

    @property
    def parent_key(self) -> bytes | None:
        return None if self.is_root else self.ident[:16]

    def pack(self) -> bytes:
        return _RECORD.pack(self.slot, self.checksum, self.last_use, self.is_root) + self.ident

    @classmethod
    def unpack(cls, key: bytes, value: bytes) -> Record:
        slot, checksum, last_use, is_root = _RECORD.unpack_from(value)
        return cls(key, slot, checksum, last_use, bool(is_root), value[_RECORD.size :])


class DirectoryLock:
    """An exclusive `flock` on the store directory: one writer process at a time.

    The kernel drops the lock when the process dies, `kill -9` included, so a crash never
    leaves a stale lock behind.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "LOCK"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise TierKVError(
                f"disk tier: {directory} is already open for writing by another store (pid {holder}); "
                "close it first or use another disk_path"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class Manifest:
    """key -> Record in LMDB, plus the identity of the store that owns the directory."""

    def __init__(self, directory: Path, durable: bool, map_size: int = 1 << 36) -> None:
        try:
            self.env = lmdb.open(
                str(directory / "manifest"), subdir=True, map_size=map_size, max_dbs=2,
                sync=durable, metasync=durable, readahead=False,
            )
        except lmdb.Error as e:
            raise TierKVError(f"disk tier: cannot open the manifest in {directory}: {e}") from None
        self.blocks = self.env.open_db(b"blocks")
        self.meta = self.env.open_db(b"meta")

    def check_identity(self, identity: dict[str, Any]) -> None:
        """Record `identity` in a new manifest, or verify it matches an existing one.

        Refuses to reuse a directory written with another layout or namespace: its bytes
        would be read as the wrong shape.
        """
        identity = {"format": MANIFEST_FORMAT, **identity}
        with self.env.begin(write=True, db=self.meta) as txn:
            raw = txn.get(_IDENTITY)
            if raw is None:
                txn.put(_IDENTITY, json.dumps(identity, sort_keys=True).encode())
                return
        stored = json.loads(raw)
        if stored != identity:
            diffs = [
                f"{k}: stored {stored.get(k)!r}, now {identity.get(k)!r}"
                for k in sorted(set(stored) | set(identity))
                if stored.get(k) != identity.get(k)
            ]
            raise LayoutMismatchError(
                "disk tier: the store directory holds blocks of a different layout or namespace ("
                + "; ".join(diffs)
                + "); open it with the same settings or use another disk_path"
            )

    def load(self) -> dict[bytes, Record]:
        """Every entry, by key."""
        unpack = Record.unpack
        with self.env.begin(db=self.blocks) as txn:
            return {key: unpack(key, value) for key, value in txn.cursor().iternext()}

    def commit(self, put: list[Record], delete: list[bytes]) -> None:
        """Apply deletions then insertions in one atomic transaction."""
        if not put and not delete:
            return
        with self.env.begin(write=True, db=self.blocks) as txn:
            for key in delete:
                txn.delete(key)
            for record in put:
                txn.put(record.key, record.pack())

    def close(self) -> None:
        self.env.close()
