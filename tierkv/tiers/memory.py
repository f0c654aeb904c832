"""Tiers whose slots are rows of one tensor: GPU memory or (pinned) host RAM.

`PoolTier` is what every memory-backed tier shares (the fixed `MemoryTier` here, the elastic
device tier over CUDA virtual memory): slots are rows of `storage`, so copies between two pools
and between a pool and an engine's pages go straight from slot to slot, never through a
temporary. The same class serves as the device tier on a CPU-only machine, which is what lets the
whole store, eviction and promotion included, be tested without a GPU.

Copies go through `tierkv.ops.transfer`, which picks a copy kernel, copy-engine DMA or plain
torch indexing by direction and block size. GPU copies into or out of pinned host slots run
asynchronously; the pool remembers the last one, and any CPU access to its slots waits for that
event first (a wait on one event, not a device synchronisation).

Checksums are taken where the bytes are: a block leaving GPU memory for a host slot is hashed
on the GPU before the copy (`tierkv.ops.checksum`), a block already in host memory is hashed in
place on the CPU, and `read_to` moves slots to a GPU in one copy so that they can be verified
there before anything is scattered into an engine's pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..integrity import checksum_block_slots
from ..ops.checksum import QueuedChecksums, block_checksums, queue_block_checksums
from ..ops.chunk_copy import CACHED_PIECE_BYTES
from ..ops.layer_copy import LayerCopy
from ..ops.streams import side_stream
from ..ops.transfer import copy_slots, cuda_kernels_available, gather_engine_blocks, scatter_engine_blocks
from .base import Tier, TierRead, need_checksums, stamp_checksums
from .host_rows import empty_rows
from .limits import allocate, check_capacity

if TYPE_CHECKING:
    from ..index import Block
    from ..layout import KVLayout
    from ..ops.engine_layout import EngineKV


SAVE_PIECE_BYTES = 128 << 20  # GPU rows a hashed save gathers into at a time


def _contiguous_run(slots: Sequence[int]) -> tuple[int, int] | None:
    """(start, stop) if the slots are consecutive ascending ints: then a slice beats a gather."""
    first = slots[0]
    if slots[-1] - first == len(slots) - 1 and all(s == first + i for i, s in enumerate(slots)):
        return first, first + len(slots)
    return None


class PoolTier(Tier):
    """Slots as rows of `storage`, a `[num_slots, slot_bytes]` uint8 tensor on `device`.

    Subclasses set `storage` and may refuse access to slots (`_check_access`).
    """

    storage: torch.Tensor

    def __init__(self, name: str, num_slots: int, slot_bytes: int, device: torch.device, *, pin: bool = False,
                 verify_reads: bool = True) -> None:
        super().__init__(name, num_slots, slot_bytes)
        self._device = torch.device(device)
        if pin and self._device.type != "cpu":
            raise ValueError(f"{name} tier: only CPU memory can be pinned, not {self._device}")
        self.pinned = pin
        self.verify_reads = verify_reads
        self.hashes_in_place = self._device.type == "cpu"
        # Last GPU copy touching these (CPU) slots, and the transient tensors it reads, kept alive until it is done.
        self._gpu_event: torch.cuda.Event | None = None
        self._held: list[tuple[torch.cuda.Event, torch.Tensor]] = []

    @property
    def device(self) -> torch.device:
        return self._device

    # -- synchronisation -----------------------------------------------------------

    def _check_access(self, slots: Sequence[int]) -> None:
        """Refuse slots that may not be touched; every slot of a fixed pool may."""

    def _cpu_access(self) -> None:
        """Before the CPU reads or writes host slots: let the last GPU copy on them finish."""
        if self._gpu_event is not None:
            self._gpu_event.synchronize()
            self._gpu_event = None
        self._held.clear()

    def _before_copy(self, other_on_gpu: bool) -> None:
        """A CPU pool waits for pending GPU copies unless the next copy is itself a GPU one on pinned memory.

        That one is ordered after them on the GPU instead: copies of these slots may run on other
        streams (a hashed save's copy runs beside the engine's stream), so the current stream
        waits for the last one's event. Each copy waits for the one before, so the last event
        stands for all of them.
        """
        if self._device.type == "cpu" and not (other_on_gpu and self.pinned):
            self._cpu_access()
        elif self._gpu_event is not None and other_on_gpu:
            torch.cuda.current_stream().wait_event(self._gpu_event)

    def _after_gpu_copy(self, event: torch.cuda.Event | None, keep: torch.Tensor | None = None) -> None:
        if event is None:
            return
        if self._device.type == "cpu":
            self._gpu_event = event
        self._held = [(e, t) for e, t in self._held if not e.query()]
        if keep is not None:  # pinned rows a DMA still reads: torch's host allocator must not hand them out yet
            self._held.append((event, keep))

    def _stamp(self, slots: Sequence[int], blocks: Sequence[Block], rows: torch.Tensor | None = None) -> None:
        """Checksums for blocks arriving here without one: of `rows` when on the CPU, else of the slots in place."""
        if self.verify_reads and need_checksums(blocks):
            stamp_checksums(blocks, block_checksums(rows) if rows is not None else self.checksums(slots))

    # -- bytes ---------------------------------------------------------------------

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        """Rows of `slots`; a pinned tier returns pinned rows, so moving them to a GPU is an async DMA."""
        if not len(slots):
            return torch.empty((0, self.slot_bytes), dtype=torch.uint8, device=self._device)
        self._check_access(slots)
        if self._device.type == "cpu":
            self._cpu_access()
        out = empty_rows(len(slots), self.slot_bytes, self._device, pin=self.pinned)
        copy_slots(self.storage, slots, out, range(len(slots)))
        return out

    def write(self, slots: Sequence[int], rows: torch.Tensor, blocks: Sequence[Block]) -> None:
        if not len(slots):
            return
        if rows.shape != (len(slots), self.slot_bytes) or rows.dtype != torch.uint8:
            raise ValueError(
                f"{self.name} tier: write needs uint8 rows of shape {(len(slots), self.slot_bytes)}, "
                f"got {rows.dtype} {tuple(rows.shape)}"
            )
        self._check_access(slots)
        self._before_copy(rows.is_cuda)
        rows = rows.contiguous()
        self._stamp(slots, blocks, rows)  # where the rows are: GPU rows on the GPU, before they leave it
        event = copy_slots(rows, range(len(slots)), self.storage, slots)
        self._after_gpu_copy(event, keep=rows if rows.device.type == "cpu" else None)

    def copy_to(self, slots: Sequence[int], other: Tier, other_slots: Sequence[int], blocks: Sequence[Block]) -> bool:
        """Copy our `slots` into another pool's `other_slots` in one batched transfer, with no temporary rows."""
        if not isinstance(other, PoolTier):
            return False
        if len(slots) != len(other_slots):
            raise ValueError(f"{self.name} -> {other.name}: {len(slots)} source slots for {len(other_slots)} destinations")
        if other.slot_bytes != self.slot_bytes:
            raise ValueError(f"{self.name} -> {other.name}: slot sizes differ ({self.slot_bytes} != {other.slot_bytes})")
        if not len(slots):
            return True
        self._check_access(slots)
        other._check_access(other_slots)
        if self._device.type == "cuda" and other.verify_reads and need_checksums(blocks):
            stamp_checksums(blocks, self.checksums(slots))  # on the GPU, before the bytes leave it
        gpu = self._device.type == "cuda" or other._device.type == "cuda"
        self._before_copy(gpu)
        other._before_copy(gpu)
        event = copy_slots(self.storage, slots, other.storage, other_slots)
        self._after_gpu_copy(event)
        other._after_gpu_copy(event)
        other._stamp(other_slots, blocks)
        return True

    def save_from_engine(self, slots: Sequence[int], engine: EngineKV, engine_slots: torch.Tensor, layout: KVLayout,
                         blocks: Sequence[Block]) -> None:
        """Gather the engine's pages straight into our slots (one launch or DMA batch).

        GPU pages bound for host slots that need checksums are gathered into GPU rows first,
        hashed there, and moved with one copy (`_save_hashed`): the CPU never reads them.
        """
        self._check_access(slots)
        if (engine.device.type == "cuda" and self._device.type == "cpu" and self.verify_reads
                and need_checksums(blocks)):
            self._save_hashed(slots, engine, engine_slots, layout, blocks)
            return
        self._before_copy(engine.device.type == "cuda")
        if engine.device.type == "cpu" and self._device.type == "cpu":  # each piece hashed while it is in the cache
            per = max(1, CACHED_PIECE_BYTES // max(self.slot_bytes, 1))
            for a in range(0, len(slots), per):
                gather_engine_blocks(engine, engine_slots[a : a + per], self.storage, layout, rows=list(slots[a : a + per]))
                self._stamp(slots[a : a + per], blocks[a : a + per])
            return
        event = gather_engine_blocks(engine, engine_slots, self.storage, layout, rows=list(slots))
        self._after_gpu_copy(event)
        self._stamp(slots, blocks)

    def _save_hashed(self, slots: Sequence[int], engine: EngineKV, engine_slots: torch.Tensor, layout: KVLayout,
                     blocks: Sequence[Block]) -> None:
        """Engine pages -> GPU rows (gather) -> checksums on the GPU -> one copy into our host slots.

        In pieces of at most `SAVE_PIECE_BYTES` of GPU rows. The gather and the hash run on the
        engine device's current stream (so the engine may reuse its pages once that stream has
        passed them); the copy to host runs on a side stream, so the next piece's gather and
        hash, and the next call's, overlap it instead of queueing behind it. Only the
        checksums are waited for, once, after every piece is queued.
        """
        bb = self.slot_bytes
        per = max(1, SAVE_PIECE_BYTES // max(bb, 1))
        stream = torch.cuda.current_stream(engine.device)
        side = side_stream(engine.device, "hashed-save")
        sums: list[QueuedChecksums] = []
        for a in range(0, len(slots), per):
            b = min(a + per, len(slots))
            rows = torch.empty((b - a, bb), dtype=torch.uint8, device=engine.device)
            gather_engine_blocks(engine, engine_slots[a:b], rows, layout)
            sums.append(queue_block_checksums(rows))
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                self._before_copy(True)
                self._after_gpu_copy(copy_slots(rows, range(b - a), self.storage, list(slots[a:b])))
            rows.record_stream(side)  # the allocator hands the rows out again only after the copy
        stamp_checksums(blocks, [c for piece_sums in sums for c in piece_sums.result()])

    def read_to(self, slots: Sequence[int], device: torch.device) -> TierRead:
        """Our slots as rows on `device`, in one copy (a DMA batch from pinned host slots to a GPU)."""
        if torch.device(device).type != "cuda":
            return super().read_to(slots, device)
        out = torch.empty((len(slots), self.slot_bytes), dtype=torch.uint8, device=device)
        if len(slots):
            self._check_access(slots)
            self._before_copy(True)
            self._after_gpu_copy(copy_slots(self.storage, list(slots), out, range(len(slots))))
        return TierRead(out)

    def load_into_engine(self, slots: Sequence[int], engine: EngineKV, engine_slots: torch.Tensor,
                         layout: KVLayout, rows: torch.Tensor | None = None) -> None:
        """Scatter our slots straight into the engine's pages, on the engine device's current stream."""
        if rows is not None:
            super().load_into_engine(slots, engine, engine_slots, layout, rows)
            return
        self._check_access(slots)
        self._before_copy(engine.device.type == "cuda")
        self._after_gpu_copy(scatter_engine_blocks(engine, engine_slots, self.storage, layout, rows=list(slots)))

    def load_layers_into_engine(self, slots: Sequence[int], engine: EngineKV, engine_slots: torch.Tensor,
                                layout: KVLayout, expected: Sequence[int | None], path: str) -> LayerCopy | None:
        """Pinned host slots -> GPU pages layer by layer (`LayerCopy`); None for other memory or layouts."""
        if not (self._device.type == "cpu" and self.pinned and engine.device.type == "cuda"
                and LayerCopy.supports(layout) and cuda_kernels_available()):
            return None
        self._check_access(slots)
        # The slots are leased until the copies are done (LayerLoad.finish), so nothing writes into them
        # meanwhile; the copies only have to follow the last GPU write into the pool.
        return LayerCopy(self.storage, slots, engine, engine_slots, layout, expected, path=path,
                         wait_before=self._gpu_event)

    def checksums(self, slots: Sequence[int]) -> list[int]:
        """Checksums of the slots' bytes, hashed where they lie: by the CPU in host memory, by the GPU in device memory."""
        self._check_access(slots)
        if self._device.type != "cpu":
            return block_checksums(self.storage, slots)
        self._cpu_access()
        return checksum_block_slots(self.storage, slots)

    def view(self, slots: Sequence[int]) -> torch.Tensor:
        """Rows of the given slots without a copy where they are consecutive (else a gather)."""
        if self._device.type == "cpu":
            self._cpu_access()
        run = _contiguous_run(slots) if len(slots) else (0, 0)
        if run is not None:
            return self.storage[run[0] : run[1]]
        return self.read(slots)

    def close(self) -> None:
        if self._device.type == "cpu":
            self._cpu_access()
        self._held.clear()
        self.storage = self.storage[:0]


class MemoryTier(PoolTier):
    """A fixed pool: one tensor allocated up front on `device` (pinned host memory where asked).

    Its size is checked against what the machine can ever give before the free list is built
    (`limits.py`), and an allocation that fails anyway says which field to lower.
    """

    def __init__(self, name: str, num_slots: int, slot_bytes: int, device: torch.device, pin: bool = False,
                 verify_reads: bool = True) -> None:
        field = f"{name}_bytes"
        check_capacity(field, num_slots * slot_bytes, torch.device(device), pinned=pin)
        super().__init__(name, num_slots, slot_bytes, device, pin=pin, verify_reads=verify_reads)
        self.storage = allocate(field, num_slots * slot_bytes, lambda: torch.empty(
            (num_slots, slot_bytes), dtype=torch.uint8, device=self._device, pin_memory=pin))
