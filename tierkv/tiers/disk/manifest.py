"""The disk tier's manifest: an LMDB database of which block each data-file slot holds.

A block enters the manifest only after its payload is durable (per the durability setting),
so after a crash every entry points at bytes that were fully written — or, if a slot was
reused and the crash hit between data and manifest, at bytes whose checksum no longer
matches, which the store detects and drops. A slot without an entry is free space.

LMDB gives atomic multi-entry commits and crash safety without a log of our own. It also trusts
its file completely (no page checksums), so this module opens a manifest only after `vetting.py`
has vouched for it, and turns every LMDB failure into a `StorageError` that names the directory:
a full file system fails a commit, whose changes the tier keeps and retries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import weakref
from pathlib import Path
from typing import Any, NamedTuple

import lmdb

from ...errors import LayoutMismatchError, StorageError, TierKVError
from ...integrity import TREE_CHECKSUM

# 2: checksums are TREE_CHECKSUM (recorded in the identity); 1: whole-block xxh3_64, migrated on open (`migrate.py`).
MANIFEST_FORMAT = 2
LEGACY_FORMAT = 1
_RECORD = struct.Struct("<QQQB")  # slot, checksum, last_use, is_root; the ident follows
_IDENTITY = b"identity"
KEY_BYTES = 16


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
        """The record stored under `key`; ValueError when the bytes cannot be one (wrong sizes, a bad flag)."""
        if len(key) != KEY_BYTES or len(value) < _RECORD.size + KEY_BYTES:
            raise ValueError(f"a manifest record of {len(key)}-byte key and {len(value)}-byte value")
        slot, checksum, last_use, is_root = _RECORD.unpack_from(value)
        if is_root > 1:
            raise ValueError(f"a manifest record whose root flag is {is_root}")
        return cls(key, slot, checksum, last_use, bool(is_root), value[_RECORD.size :])


class Loaded(NamedTuple):
    """What the manifest holds: the records by key, and the keys whose values are no record at all."""

    records: dict[bytes, Record]
    malformed: list[bytes]


_LOCKS: weakref.WeakSet[DirectoryLock] = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    """After a fork: the child closes its copies of the lock descriptors (the parent's stay locked)."""
    for lock in list(_LOCKS):
        lock.forget()


os.register_at_fork(after_in_child=_forget_locks_in_child)


class DirectoryLock:
    """An exclusive `flock` on the store directory: one writer process at a time.

    The kernel drops the lock when the process dies, `kill -9` included, so a crash never
    leaves a stale lock behind. An flock belongs to the open file, which a forked child would
    share (multiprocessing forks by default on Linux) and keep locked after the writer died, so
    the descriptor is close-on-exec and a forked child closes its copy at once.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "LOCK"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
        _LOCKS.add(self)

    def forget(self) -> None:
        """Close this process's descriptor without unlocking: in a forked child, the parent keeps the lock."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
        _LOCKS.discard(self)


def refuse_other(stored_raw: bytes, identity: dict[str, Any]) -> bool:
    """LayoutMismatchError listing the differences, unless the stored identity record is `identity`.

    Returns True when it is `identity` as format 1 wrote it (no checksum named: whole-block
    xxh3_64), a store whose checksums are migrated when it opens; False when it is `identity`.
    """
    try:
        stored = json.loads(stored_raw)
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        stored = {"format": f"unreadable ({bytes(stored_raw[:40])!r})"}
    if stored == legacy_identity(identity):
        return True
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
    return False


def identity_record(identity: dict[str, Any]) -> dict[str, Any]:
    """What the manifest stores as the identity of a store: the format version and `identity`."""
    return {"format": MANIFEST_FORMAT, "checksum": TREE_CHECKSUM, **identity}


def legacy_identity(record: dict[str, Any]) -> dict[str, Any]:
    """The identity record format 1 wrote for the store whose current record is `record`."""
    return {**{k: v for k, v in record.items() if k != "checksum"}, "format": LEGACY_FORMAT}


def open_env(path: Path, durable: bool, map_size: int = 1 << 36) -> lmdb.Environment:
    """The LMDB environment of a manifest directory (created if missing); StorageError if LMDB refuses."""
    try:
        return lmdb.open(str(path), subdir=True, map_size=map_size, max_dbs=2, sync=durable, metasync=durable,
                         readahead=False)
    except lmdb.Error as e:
        raise StorageError(f"disk tier: cannot open the manifest {path}: {e}; free space there, "
                           "or remove the directory to start the disk tier empty") from None


class Manifest:
    """key -> Record in LMDB, plus the identity of the store that owns the directory."""

    def __init__(self, directory: Path, durable: bool, map_size: int = 1 << 36) -> None:
        self.directory = directory
        self.path = directory / "manifest"
        self._durable = durable
        self._map_size = map_size
        self.env = open_env(self.path, durable, map_size)
        try:
            self.blocks = self.env.open_db(b"blocks")
            self.meta = self.env.open_db(b"meta")
        except lmdb.Error as e:
            self.env.close()
            raise StorageError(f"disk tier: cannot open the manifest {self.path}: {e}; free space there") from None
        self.panicked = False  # LMDB gave up on this environment once: it was reopened

    def check_identity(self, identity: dict[str, Any]) -> bool:
        """Record `identity` in a new manifest, or verify it matches an existing one.

        Refuses to reuse a directory written with another layout or namespace: its bytes
        would be read as the wrong shape. Returns True for a format-1 manifest of the same store
        (whole-block xxh3 checksums), which `migrate.migrate_checksums` brings to this format.
        """
        identity = identity_record(identity)
        try:
            with self.env.begin(write=True, db=self.meta) as txn:
                raw = txn.get(_IDENTITY)
                if raw is None:
                    txn.put(_IDENTITY, json.dumps(identity, sort_keys=True).encode())
                    return False
        except lmdb.Error as e:
            raise self._error("record the store's identity in", e) from None
        return refuse_other(raw, identity)

    def load(self) -> Loaded:
        """Every entry, by key, and the keys of values that are no record (recovery drops those).

        The checks of `Record.unpack`, inlined: a warm restart reads every record (100k in well
        under 0.1 s), and a call per record would be most of that.
        """
        unpack_from, fixed, new = _RECORD.unpack_from, _RECORD.size, tuple.__new__
        shortest = fixed + KEY_BYTES
        records: dict[bytes, Record] = {}
        malformed: list[bytes] = []
        try:
            with self.env.begin(db=self.blocks) as txn:
                for key, value in txn.cursor().iternext():
                    if len(key) == KEY_BYTES and len(value) >= shortest:
                        slot, checksum, last_use, is_root = unpack_from(value)
                        if is_root <= 1:
                            records[key] = new(Record, (key, slot, checksum, last_use, is_root == 1, value[fixed:]))
                            continue
                    malformed.append(key)
        except lmdb.Error as e:
            raise self._error("read", e) from None
        return Loaded(records, malformed)

    def commit(self, put: list[Record], delete: list[bytes]) -> None:
        """Apply deletions then insertions in one atomic transaction; all or nothing.

        A failure (a full or failing file system) is a StorageError and leaves the manifest as it
        was: the caller keeps the changes and commits them again later.
        """
        if not put and not delete:
            return
        try:
            with self.env.begin(write=True, db=self.blocks) as txn:
                for key in delete:
                    txn.delete(key)
                for record in put:
                    txn.put(record.key, record.pack())
        except lmdb.Error as e:
            if isinstance(e, lmdb.PanicError):
                self._reopen()
            raise self._error("commit to", e) from None

    def _reopen(self) -> None:
        """After MDB_PANIC LMDB refuses every write on this environment; the file itself is as the last commit left it."""
        self.panicked = True
        try:
            self.env.close()
        finally:
            self.env = open_env(self.path, self._durable, self._map_size)
            self.blocks = self.env.open_db(b"blocks")
            self.meta = self.env.open_db(b"meta")

    def _error(self, what: str, e: lmdb.Error) -> StorageError:
        return StorageError(f"disk tier: cannot {what} the manifest {self.path}: {e}. The file system may be full "
                            "or failing; free space there (changes not recorded yet are kept and retried)")

    def close(self) -> None:
        """Close LMDB, after making every commit durable (also with durability='none')."""
        # What was not synced is at worst lost to a power cut, which a mode without syncs accepts.
        with contextlib.suppress(lmdb.Error):
            self.env.sync(True)
        self.env.close()
