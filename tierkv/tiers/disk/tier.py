"""The disk tier: block payloads in preallocated data files, one 4 KiB-aligned slot per block.

A block enters the manifest only after its payload is durable (per the durability setting),
so after a crash every manifest entry points at bytes that were fully written — or, if a slot
was reused and the crash hit between data and manifest, at bytes whose checksum no longer
matches, which every read detects and drops. Writes go to a bounded write-behind queue
(`writeback.py`) whose completions the store commits after each operation; with
`durability="every"` each block is written, synced and recorded before the next.

The tier owns everything of one open store directory: the data files (`files.py`), the LMDB
manifest and the writer lock (`manifest.py`), the check of the manifest before it is opened
(`vetting.py`), recovery at open (`recovery.py`), and its agent (`committer.py`), which commits
finished write-backs without waiting for the next call.

Faults never leave the tier as exceptions of a `put` or `get` (see docs/reliability.md): a row
that cannot be read is reported unreadable (the store drops that copy and serves the prefix
before it), a write that fails loses that block's disk copy (dropped at the next commit), and a
manifest commit that fails (a full file system) keeps its changes and retries them after every
operation. Each is counted in `stats()["disk"]` and logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import ConfigError, StorageError, TierKVError
from ...integrity import checksum_rows
from ..base import Recovery, StoreAccess, Tier, TierAgent, TierRead, need_checksums, stamp_checksums
from .committer import Committer
from .files import BufferPool, IORequest, KvikioFiles, PosixFiles, aligned_empty, kvikio_status, open_data_file, slot_stride
from .manifest import KEY_BYTES, DirectoryLock, Manifest, Record, identity_record, refuse_other
from .migrate import migrate_checksums
from .recovery import paused_gc, prepare_directory, trusted_records
from .vetting import Vetting, mark_clean, vet
from .writeback import WriteQueue

if TYPE_CHECKING:
    from ...config import StoreConfig
    from ...index import Block, Index
    from ...layout import KVLayout
    from ...namespace import Namespace

log = logging.getLogger("tierkv.disk")

_WARN_EVERY_S = 60.0  # a fault that repeats is logged as a warning once a minute, counted always
MAX_REQUEST = 2 << 20  # split long runs so that every I/O thread gets a share of a batch
_FILE_BYTES = 16 << 30

__all__ = ["DiskTier", "kvikio_status", "open_data_file", "slot_stride"]


def _record(block: Block, slot: int) -> Record:
    assert block.checksum is not None, "a block reached disk without a checksum"
    return Record(block.key, slot, block.checksum, block.last_use, block.parent is None, block.ident)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_disk_room(directory: Path, disk_bytes: int, file_bytes: int, num_files: int) -> None:
    """Refuse a `disk_bytes` the file system cannot hold, before anything is built for it.

    The data files already there count as room (they are reused); the rest must be free now.
    Checked first because a tier's free list has one entry per slot: a size far beyond the disk
    would exhaust memory before the preallocation could fail with a clear error.
    """
    have = 0
    for i in range(num_files):
        with contextlib.suppress(OSError):
            have += (directory / f"data{i:03d}.bin").stat().st_blocks * 512
    try:
        st = os.statvfs(directory)
    except OSError:
        return
    room = st.f_bavail * st.f_frsize + have
    if disk_bytes > room:
        raise ConfigError(f"disk_bytes: {_gib(disk_bytes)} is more than the file system at {directory} can hold "
                          f"({_gib(room)} free, counting the data files already there); lower disk_bytes or free space")


class DiskTier(Tier):
    """Slots in data files under `config.disk_path`, recorded in an LMDB manifest beside them.

    `disk_io` picks the file I/O: "posix" (everywhere), "kvikio" (needs kvikio and a CUDA driver)
    or "auto" (kvikio when it can work, else posix).
    """

    persistent = True
    section = "disk"

    def __init__(self, config: StoreConfig, layout: KVLayout, namespace: Namespace, file_bytes: int = _FILE_BYTES) -> None:
        assert config.disk_path is not None
        directory = prepare_directory(config.disk_path)
        block_bytes = layout.block_bytes
        stride = slot_stride(block_bytes)
        num_slots = config.disk_bytes // stride
        spf = max(1, file_bytes // stride)
        check_disk_room(directory, num_slots * stride, file_bytes, -(-num_slots // spf))
        super().__init__("disk", num_slots, block_bytes)
        self.verify_reads = config.verify_reads  # off: reads unchecked; writes still record checksums (the manifest needs them)
        self.directory = directory
        self.durability = config.durability
        self.stride = stride
        self.slots_per_file = spf
        self.ident_bytes = KEY_BYTES + 4 * layout.block_tokens
        self.recovery = Recovery()
        self.dropped_by_reason: Counter[str] = Counter()
        self.vetting = Vetting(directory, "new")
        self._recovered_tick = 0
        self._in_flight: dict[int, tuple[int, Block]] = {}  # slot -> (write generation, block)
        self._lost: dict[int, Block] = {}  # slot -> block whose write failed, dropped at the next commit
        self._dirty_files: set[int] = set()
        self._buffers = BufferPool()
        self._pid = os.getpid()
        self._unrecorded: list[bytes] = []  # deletions decided at open that a failed commit left for later
        self.faults: Counter[str] = Counter()  # read_errors, write_errors (fsyncs included), commit_failures
        self._last_fault = ""
        self._warned: dict[str, float] = {}  # fault kind -> when it was last logged as a warning
        self._lock = DirectoryLock(directory)
        identity = {
            "layout": layout.to_dict(),
            "namespace": {k: v for k, v in namespace.to_dict().items() if k != "tenant"},
            "block_bytes": block_bytes,
        }
        try:
            self.vetting = vet(directory)
            if self.vetting.identity is not None:  # refused before the rebuild replaces anything
                refuse_other(self.vetting.identity, identity_record(identity))
            if self.vetting.how in ("rebuilt", "damaged"):
                self.vetting.commit()
            self.manifest = Manifest(directory, durable=config.durability != "none")
            # A format-1 manifest (whole-block xxh3 checksums) is migrated by `recover` (migrate.py).
            self._legacy_checksums = self.manifest.check_identity(identity)
            self._identity = identity_record(identity)
            self.vetting.commit()  # the clean mark goes: from here on this writer changes the file
            self._files = self._open_files(config.disk_io, config.io_threads)
        except BaseException:
            self.vetting.abandon()
            if hasattr(self, "manifest"):
                self.manifest.close()
            self._lock.release()
            raise
        self.queue = WriteQueue(self.stride, max(config.writeback_bytes, self.stride), self._write_job, self._buffers.release)

    def _open_files(self, io: str, io_threads: int) -> PosixFiles | KvikioFiles:
        n = self.num_slots
        num_files = -(-n // self.slots_per_file) if n else 0
        paths = [self.directory / f"data{i:03d}.bin" for i in range(num_files)]
        sizes = [min(self.slots_per_file, n - i * self.slots_per_file) * self.stride for i in range(num_files)]
        if io not in ("auto", "posix", "kvikio"):
            raise TierKVError(f"disk tier: disk_io must be 'auto', 'posix' or 'kvikio', got {io!r}")
        usable, why = kvikio_status()
        if io == "kvikio" and not usable:
            raise TierKVError(f"disk tier: disk_io='kvikio' was asked for but {why}; use disk_io='posix' or 'auto'")
        if io == "kvikio" or (io == "auto" and usable):
            return KvikioFiles(paths, sizes)
        return PosixFiles(paths, sizes, io_threads)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def io_path(self) -> str:
        return self._files.name

    def agent(self, store: StoreAccess) -> TierAgent | None:
        """The committer: finished write-backs reach the manifest without waiting for the next call."""
        return Committer(self.queue, store)

    def _forked(self) -> bool:
        """True in a child forked after this tier was opened: it must not touch the parent's files."""
        return os.getpid() != self._pid

    def _refuse_forked(self) -> None:
        if self._forked():
            raise TierKVError(f"disk tier {self.directory}: opened by process {self._pid}; a forked child "
                              f"(pid {os.getpid()}) must open a BlockStore of its own")

    def _fault(self, kind: str, n: int, message: str) -> None:
        """Count and log a fault the tier absorbed: a warning per kind at most once a minute, the rest at debug level."""
        self.faults[kind] += n
        self._last_fault = message
        now = time.monotonic()
        loud = now - self._warned.get(kind, -_WARN_EVERY_S) >= _WARN_EVERY_S
        if loud:
            self._warned[kind] = now
        log.log(logging.WARNING if loud else logging.DEBUG, "%s", message)

    # -- slots -----------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        self._free.extend(self.queue.take_released())
        return super().allocate(n)

    def free(self, slots: Sequence[int]) -> None:
        super().free(self.queue.cancel(slots))

    # -- recovery and commits ----------------------------------------------------------

    def recover(self, index: Index, position: int) -> Recovery:
        """Rebuild the index entries of every trustworthy manifest record, parents first.

        Records that cannot be trusted are deleted from the manifest and counted by reason
        (`stats()["disk"]["recovery_dropped_by_reason"]`), with the entries a damaged manifest lost.
        """
        with paused_gc():  # a few objects per record, none of them garbage
            loaded = self.manifest.load()
            trusted = trusted_records(loaded.records, self.num_slots, self.ident_bytes)
            if self._legacy_checksums:
                trusted = migrate_checksums(self, trusted, self._identity)
                self._legacy_checksums = False
            self._recovered_tick = max((r.last_use for r in trusted.records), default=0)
            index.restore(position, trusted.records)
            used = {r.slot for r in trusted.records}
            self._free = [s for s in self._free if s not in used]
        reasons = Counter(trusted.reasons)
        if loaded.malformed:
            reasons["malformed record"] += len(loaded.malformed)
        if self.vetting.lost:
            reasons["lost with a damaged manifest"] += self.vetting.lost
        self.dropped_by_reason = reasons
        self._unrecorded = trusted.dropped + loaded.malformed
        self._commit_unrecorded()
        dropped = sum(reasons.values())
        if dropped:
            log.warning("disk tier %s: %d manifest entries could not be trusted and were dropped (%s)", self.directory,
                        dropped, ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())))
        self.recovery = Recovery(blocks=len(trusted.records), dropped=dropped)
        return self.recovery

    def _commit_unrecorded(self) -> None:
        if not self._unrecorded:
            return
        try:
            self.manifest.commit([], self._unrecorded)
            self._unrecorded = []
        except StorageError as e:
            self._fault("commit_failures", 1, str(e))

    def commit(self, index: Index, position: int) -> list[Block]:
        """Record in the manifest what reached disk since the last commit, and what left it.

        Entries of blocks still in the write-back queue wait until their write completes, so
        the manifest never names bytes that are not on disk. Returns blocks whose write failed:
        the store drops those disk copies. When the manifest cannot be written (a full file
        system), the journal is kept as it is and committed again after the next operation:
        nothing recorded later is lost, only later.
        """
        if self._forked():
            return []
        self._free.extend(self.queue.take_released())  # quarantined slots whose late write is over
        completed, failed = self.queue.take_results()
        journal = index.journal(position)
        for slot, gen in completed:
            entry = self._in_flight.get(slot)
            if entry is not None and entry[0] == gen:
                del self._in_flight[slot]
                journal[entry[1].key] = entry[1]
        lost = []
        for slot, gen, _error in failed:
            entry = self._in_flight.get(slot)
            if entry is not None and entry[0] == gen:
                del self._in_flight[slot]
                if entry[1].slots[position] == slot:
                    lost.append(entry[1])
        if failed:
            self._fault("write_errors", len(failed), f"disk tier {self.directory}: {len(failed)} block writes failed "
                        f"({failed[0][2]}); those blocks are dropped from the disk tier")
        for slot, block in self._lost.items():
            if block.slots[position] == slot:
                lost.append(block)
        self._lost.clear()
        lost_ids = {id(b) for b in lost}
        self._commit_unrecorded()
        if not journal:
            return lost
        puts: list[Record] = []
        deletes: list[bytes] = []
        for key, b in journal.items():
            slot = b.slots[position]
            if slot >= 0 and index.blocks.get(key) is b and id(b) not in lost_ids:
                if slot in self._in_flight:
                    continue  # committed when its write completes
                puts.append(_record(b, slot))
            else:
                deletes.append(key)
        try:
            if self.durability != "none":
                self.sync()
            self.manifest.commit(puts, deletes)
        except (OSError, StorageError) as e:
            message = (f"disk tier {self.directory}: fsync of the data files failed ({e.strerror})" if isinstance(e, OSError)
                       else str(e))
            self._fault("commit_failures", 1, f"{message}; {len(journal)} manifest changes wait for the next commit")
            return lost
        journal.clear()
        return lost

    def flush(self, index: Index, position: int) -> None:
        """Before a clean close: finish queued writes, and journal the last use of every disk block
        touched since open, so that the next commit records it and a restart evicts in our order."""
        if self._forked():
            return
        self.queue.drain()
        since = self._recovered_tick
        index.journal(position).update(
            (b.key, b) for b in index.blocks.values() if b.slots[position] >= 0 and b.last_use > since)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.directory),
            "io": self.io_path,
            "durability": self.durability,
            "recovered_blocks": self.recovery.blocks,
            "recovery_dropped": self.recovery.dropped,
            "recovery_dropped_by_reason": dict(self.dropped_by_reason),
            "manifest_at_open": self.vetting.how,
            "manifest_salvaged": self.vetting.entries if self.vetting.how == "damaged" else 0,
            "read_errors": self.faults["read_errors"],
            "write_errors": self.faults["write_errors"],
            "commit_failures": self.faults["commit_failures"],
            "pending_writes": len(self._in_flight),
            "last_fault": self._last_fault,
        }

    # -- I/O -----------------------------------------------------------------------

    def _requests(self, slots: Sequence[int]) -> list[IORequest]:
        """Merge slots into requests: consecutive slots of one file become one, split at MAX_REQUEST.

        The buffer holds the slots in the order given, one stride apart.
        """
        reqs: list[IORequest] = []
        spf, stride = self.slots_per_file, self.stride
        for pos, slot in enumerate(slots):
            f, off = divmod(slot, spf)
            if reqs:
                last = reqs[-1]
                if (last.file == f and last.offset + last.length == off * stride
                        and last.buffer_offset + last.length == pos * stride and last.length < MAX_REQUEST):
                    reqs[-1] = last._replace(length=last.length + stride)
                    continue
            reqs.append(IORequest(f, off * stride, pos * stride, stride))
        return reqs

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        """Rows of the slots; those still in the write-behind queue come from the queue.

        A slot that cannot be read raises StorageError; the store reads through `read_some`,
        which reports such slots instead.
        """
        read = self.read_some(slots)
        if read.unreadable:
            raise StorageError(f"disk tier {self.directory}: slots {[slots[i] for i in read.unreadable]} "
                               f"cannot be read ({self._last_fault})")
        return read.rows

    def read_some(self, slots: Sequence[int]) -> TierRead:
        """Rows of the slots, and the positions that could not be read (an I/O error): their rows are zeros.

        A failed batch is retried one slot at a time, so one bad extent costs only the blocks on it.
        """
        self._refuse_forked()
        buf = aligned_empty(len(slots) * self.stride)
        queued = self.queue.lookup(slots)
        positions = [i for i in range(len(slots)) if i not in queued]
        unreadable: list[int] = []
        if positions:
            on_disk = [slots[i] for i in positions]
            rows_on_disk = buf if not queued else aligned_empty(len(on_disk) * self.stride)
            bad = self._read_rows(on_disk, rows_on_disk)
            if queued:
                view = buf.reshape(len(slots), self.stride)
                view[positions] = rows_on_disk.reshape(len(on_disk), self.stride)
            unreadable = [positions[j] for j in bad]
        for i, row in queued.items():
            buf[i * self.stride : (i + 1) * self.stride] = row
        rows = torch.from_numpy(buf).view(len(slots), self.stride)
        rows = rows if self.stride == self.slot_bytes else rows[:, : self.slot_bytes].contiguous()
        return TierRead(rows, tuple(unreadable))

    def _read_rows(self, slots: list[int], buf: np.ndarray) -> list[int]:
        """Read `slots` into `buf` (stride apart); the positions that failed, their rows zeroed."""
        try:
            self._files.run(False, self._requests(slots), buf)
            return []
        except (OSError, TierKVError):
            pass
        bad = []
        stride = self.stride
        for i, slot in enumerate(slots):
            row = buf[i * stride : (i + 1) * stride]
            try:
                self._files.run(False, self._requests([slot]), row)
            except (OSError, TierKVError) as e:
                row[:] = 0
                bad.append(i)
                why = e.strerror if isinstance(e, OSError) else str(e)
                self._fault("read_errors", 1, f"disk tier {self.directory}: slot {slot} cannot be read ({why}); "
                            "its block is dropped and recomputed when next needed")
        return bad

    def write(self, slots: Sequence[int], rows: torch.Tensor, blocks: Sequence[Block]) -> None:
        """Store blocks per the durability setting; their manifest entries follow once the bytes are down.

        Never raises for the device: a block whose write (or fsync) fails is lost to this tier and
        dropped at the next commit; the caller's other tiers are untouched.
        """
        if not len(slots):
            return
        self._refuse_forked()
        rows = rows.to("cpu")
        if need_checksums(blocks):
            stamp_checksums(blocks, checksum_rows(rows))
        if self.durability == "every":
            for i, (slot, block) in enumerate(zip(slots, blocks)):
                try:
                    self.write_now([slot], rows[i : i + 1])
                    self.sync()
                except (OSError, TierKVError) as e:
                    why = e.strerror if isinstance(e, OSError) else str(e)
                    self._fault("write_errors", 1, f"disk tier {self.directory}: writing slot {slot} failed ({why}); "
                                "its block is dropped from the disk tier")
                    self._lost[slot] = block
                    continue
                try:
                    self.manifest.commit([_record(block, slot)], [])
                except StorageError as e:  # the store's commit after this operation records it again
                    self._fault("commit_failures", 1, str(e))
            return
        for slot, gen, block in zip(slots, self.write_behind(slots, rows), blocks):
            self._in_flight[slot] = (gen, block)

    def write_now(self, slots: Sequence[int], rows: torch.Tensor) -> None:
        """Write raw rows on the caller's thread, bypassing the queue; durable after `sync()`."""
        if slots:
            buf = self._stage(slots, rows)
            try:
                self._write_buffer(slots, buf)
            finally:
                self._buffers.release(buf)

    def write_behind(self, slots: Sequence[int], rows: torch.Tensor) -> list[int]:
        """Queue raw rows for the write-back thread; returns one generation per slot.

        The rows are copied, so the caller may reuse its memory at once. Blocks while the
        queue is full. Completion is reported through `queue.take_results()`.
        """
        return self.queue.submit(list(slots), self._stage(slots, rows)) if slots else []

    def _stage(self, slots: Sequence[int], rows: torch.Tensor) -> np.ndarray:
        if rows.shape != (len(slots), self.slot_bytes) or rows.dtype != torch.uint8:
            raise ValueError(
                f"disk tier: write needs uint8 rows of shape {(len(slots), self.slot_bytes)}, "
                f"got {rows.dtype} {tuple(rows.shape)}"
            )
        buf = self._buffers.get(len(slots) * self.stride)
        staged = torch.from_numpy(buf).view(len(slots), self.stride)
        staged[:, : self.slot_bytes].copy_(rows)
        if self.stride != self.slot_bytes:
            staged[:, self.slot_bytes :].zero_()
        return buf

    def _write_job(self, slots: Sequence[int], buf: np.ndarray) -> None:
        """One write-back batch, made durable before it is reported complete (unless durability is off)."""
        self._files.run(True, self._requests(slots), buf)
        if self.durability != "none":
            for f in sorted({s // self.slots_per_file for s in slots}):
                self._files.sync(f)

    def _write_buffer(self, slots: Sequence[int], buf: np.ndarray | torch.Tensor) -> None:
        try:
            if isinstance(buf, torch.Tensor):  # device rows: only the kvikio path takes them
                self._need_kvikio().run(True, self._requests(slots), buf)
            else:
                self._files.run(True, self._requests(slots), buf)
        except OSError as e:
            raise TierKVError(f"disk tier: write failed in {self.directory}: {e.strerror}") from e
        self._dirty_files.update(s // self.slots_per_file for s in slots)

    # -- device memory (kvikio / GPUDirect Storage) -----------------------------------

    def read_to(self, slots: Sequence[int], device: torch.device) -> TierRead:
        """Rows bound for a GPU read straight into its memory when the tier runs on kvikio (GDS where
        the machine has it), then verified there like any GPU rows; otherwise through host memory.

        Slots still in the write-behind queue, and a batch that fails, take the host path: its reads
        come from the queue where they must, and it retries slot by slot and reports what stays
        unreadable.
        """
        device = torch.device(device)
        if device.type != "cuda" or not isinstance(self._files, KvikioFiles) or not slots:
            return super().read_to(slots, device)
        self._refuse_forked()
        if self.queue.lookup(slots):
            return super().read_to(slots, device)
        try:
            return TierRead(self.read_to_device(slots, device))
        except (OSError, TierKVError):
            return super().read_to(slots, device)

    def read_to_device(self, slots: Sequence[int], device: torch.device) -> torch.Tensor:
        """Rows read straight into CUDA memory (GDS where available): needs the kvikio path."""
        files = self._need_kvikio()
        out = torch.empty((len(slots) * self.stride,), dtype=torch.uint8, device=device)
        if slots:
            files.run(False, self._requests(slots), out)
        rows = out.view(len(slots), self.stride)
        return rows if self.stride == self.slot_bytes else rows[:, : self.slot_bytes].contiguous()

    def write_from_device(self, slots: Sequence[int], rows: torch.Tensor) -> None:
        """Write CUDA rows straight to the files (GDS where available): needs the kvikio path."""
        self._need_kvikio()
        if rows.shape != (len(slots), self.slot_bytes) or rows.dtype != torch.uint8 or not rows.is_cuda:
            raise ValueError(f"disk tier: write_from_device needs CUDA uint8 rows of shape {(len(slots), self.slot_bytes)}")
        staged = torch.zeros((len(slots), self.stride), dtype=torch.uint8, device=rows.device)
        staged[:, : self.slot_bytes].copy_(rows)
        self._write_buffer(slots, staged.view(-1))

    def _need_kvikio(self) -> KvikioFiles:
        if not isinstance(self._files, KvikioFiles):
            raise TierKVError(f"disk tier: device-memory I/O needs the kvikio path; this tier uses {self.io_path}")
        return self._files

    def sync(self) -> None:
        """Make every direct write so far durable (fdatasync of the files written since the last sync)."""
        for f in sorted(self._dirty_files):
            self._files.sync(f)
        self._dirty_files.clear()

    def close(self) -> None:
        """Finish queued writes, make the data files and the manifest durable (whatever the durability
        mode: a clean close survives a power cut), close them, mark the manifest cleanly closed, release the lock.

        In a forked child only the child's own descriptors are closed: the files, LMDB and the lock
        are the parent's.
        """
        if self._forked():
            self._lock.forget()
            return
        try:
            self.queue.close()
            for f in range(-(-self.num_slots // self.slots_per_file)):
                try:
                    self._files.sync(f)
                except OSError as e:  # its blocks' checksums catch what did not reach the disk
                    self._fault("write_errors", 0, f"disk tier {self.directory}: fsync of data file {f} at close "
                                f"failed ({e.strerror})")
            self._files.close()
            self.manifest.close()
            if not self.manifest.panicked:
                mark_clean(self.directory)
        finally:
            self._lock.release()
