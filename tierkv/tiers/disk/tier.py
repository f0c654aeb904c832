"""The disk tier: block payloads in preallocated data files, one 4 KiB-aligned slot per block.

A block enters the manifest only after its payload is durable (per the durability setting),
so after a crash every manifest entry points at bytes that were fully written — or, if a slot
was reused and the crash hit between data and manifest, at bytes whose checksum no longer
matches, which every read detects and drops. Writes go to a bounded write-behind queue
(`writeback.py`) whose completions the store commits after each operation; with
`durability="every"` each block is written, synced and recorded before the next.

The tier owns everything of one open store directory: the data files (`files.py`), the LMDB
manifest and the writer lock (`manifest.py`), and recovery at open (`recovery.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import TierKVError
from ...integrity import checksum_rows
from ..base import Recovery, Tier, need_checksums, stamp_checksums
from .files import BufferPool, IORequest, KvikioFiles, PosixFiles, aligned_empty, kvikio_status, open_data_file, slot_stride
from .manifest import DirectoryLock, Manifest, Record
from .recovery import prepare_directory, trusted_records
from .writeback import WriteQueue

if TYPE_CHECKING:
    from ...config import StoreConfig
    from ...index import Block, Index
    from ...layout import KVLayout
    from ...namespace import Namespace

MAX_REQUEST = 2 << 20  # split long runs so that every I/O thread gets a share of a batch
_FILE_BYTES = 16 << 30

__all__ = ["DiskTier", "kvikio_status", "open_data_file", "slot_stride"]


def _record(block: Block, slot: int) -> Record:
    assert block.checksum is not None, "a block reached disk without a checksum"
    return Record(block.key, slot, block.checksum, block.last_use, block.parent is None, block.ident)


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
        super().__init__("disk", config.disk_bytes // slot_stride(block_bytes), block_bytes)
        self.directory = directory
        self.durability = config.durability
        self.stride = slot_stride(block_bytes)
        self.slots_per_file = max(1, file_bytes // self.stride)
        self.recovery = Recovery()
        self._recovered_tick = 0
        self._in_flight: dict[int, tuple[int, Block]] = {}  # slot -> (write generation, block)
        self._dirty_files: set[int] = set()
        self._buffers = BufferPool()
        self._lock = DirectoryLock(directory)
        try:
            self.manifest = Manifest(directory, durable=config.durability != "none")
            self.manifest.check_identity({
                "layout": layout.to_dict(),
                "namespace": {k: v for k, v in namespace.to_dict().items() if k != "tenant"},
                "block_bytes": block_bytes,
            })
            self._files = self._open_files(config.disk_io, config.io_threads)
        except BaseException:
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

    # -- slots -----------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        self._free.extend(self.queue.take_released())
        return super().allocate(n)

    def free(self, slots: Sequence[int]) -> None:
        super().free(self.queue.cancel(slots))

    # -- recovery and commits ----------------------------------------------------------

    def recover(self, index: Index, position: int) -> Recovery:
        """Rebuild the index entries of every trustworthy manifest record, parents first."""
        trusted = trusted_records(self.manifest.load(), self.num_slots)
        self._recovered_tick = max((r.last_use for r in trusted.records), default=0)
        index.restore(position, trusted.records)
        used = {r.slot for r in trusted.records}
        self._free = [s for s in self._free if s not in used]
        self.manifest.commit([], trusted.dropped)
        self.recovery = Recovery(blocks=len(trusted.records), dropped=len(trusted.dropped))
        return self.recovery

    def commit(self, index: Index, position: int) -> list[Block]:
        """Record in the manifest what reached disk since the last commit, and what left it.

        Entries of blocks still in the write-back queue wait until their write completes, so
        the manifest never names bytes that are not on disk. Returns blocks whose write-back
        failed: the store drops those disk copies.
        """
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
        if not journal:
            return lost
        puts: list[Record] = []
        deletes: list[bytes] = []
        for key, b in journal.items():
            slot = b.slots[position]
            if slot >= 0 and index.blocks.get(key) is b:
                if slot in self._in_flight:
                    continue  # committed when its write completes
                puts.append(_record(b, slot))
            else:
                deletes.append(key)
        journal.clear()
        if self.durability != "none":
            self.sync()
        self.manifest.commit(puts, deletes)
        return lost

    def flush(self, index: Index, position: int) -> None:
        """Before a clean close: finish queued writes, and journal the last use of every disk block
        touched since open, so that the next commit records it and a restart evicts in our order."""
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
        """Rows of the slots; those still in the write-behind queue come from the queue."""
        buf = aligned_empty(len(slots) * self.stride)
        queued = self.queue.lookup(slots)
        on_disk = [s for i, s in enumerate(slots) if i not in queued]
        if on_disk:
            rows_on_disk = buf if not queued else aligned_empty(len(on_disk) * self.stride)
            self._files.run(False, self._requests(on_disk), rows_on_disk)
            if queued:
                view = buf.reshape(len(slots), self.stride)
                positions = [i for i in range(len(slots)) if i not in queued]
                view[positions] = rows_on_disk.reshape(len(on_disk), self.stride)
        for i, row in queued.items():
            buf[i * self.stride : (i + 1) * self.stride] = row
        rows = torch.from_numpy(buf).view(len(slots), self.stride)
        return rows if self.stride == self.slot_bytes else rows[:, : self.slot_bytes].contiguous()

    def write(self, slots: Sequence[int], rows: torch.Tensor, blocks: Sequence[Block]) -> None:
        """Store blocks per the durability setting; their manifest entries follow once the bytes are down."""
        if not len(slots):
            return
        rows = rows.to("cpu")
        if need_checksums(blocks):
            stamp_checksums(blocks, checksum_rows(rows))
        if self.durability == "every":
            for i, (slot, block) in enumerate(zip(slots, blocks)):
                self.write_now([slot], rows[i : i + 1])
                self.sync()
                self.manifest.commit([_record(block, slot)], [])
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
        """Finish queued writes, close the files and the manifest, release the directory lock."""
        try:
            self.queue.close()
            self._files.close()
            self.manifest.close()
        finally:
            self._lock.release()
