"""Tiers whose slots are rows of one preallocated torch tensor: GPU memory or (pinned) host RAM.

The same class serves as the device tier on a CPU-only machine, which is what lets the whole
store, eviction and promotion included, be tested without a GPU.

Copies go through `tierkv.ops.transfer.copy_slots`, which picks a copy kernel, copy-engine DMA or
plain torch indexing by direction and block size. GPU copies into or out of pinned host slots
run asynchronously; the tier remembers the last one, and any CPU access to its slots waits for
that event first (a wait on one event, not a device synchronisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..integrity import checksum_slots
from ..ops.transfer import copy_slots
from .base import Tier


def _contiguous_run(slots: Sequence[int]) -> tuple[int, int] | None:
    """(start, stop) if the slots are consecutive ascending ints: then a slice beats a gather."""
    first = slots[0]
    if slots[-1] - first == len(slots) - 1 and all(s == first + i for i, s in enumerate(slots)):
        return first, first + len(slots)
    return None


class MemoryTier(Tier):
    """Slots as rows of a `[num_slots, slot_bytes]` uint8 tensor on `device`."""

    def __init__(self, name: str, num_slots: int, slot_bytes: int, device: torch.device, pin: bool = False) -> None:
        super().__init__(name, num_slots, slot_bytes)
        self._device = torch.device(device)
        if pin and self._device.type != "cpu":
            raise ValueError(f"{name} tier: only CPU memory can be pinned, not {self._device}")
        self.pinned = pin
        self.storage = torch.empty((num_slots, slot_bytes), dtype=torch.uint8, device=self._device, pin_memory=pin)
        # Last GPU copy touching these (CPU) slots, and the transient tensors it reads, kept alive until it is done.
        self._gpu_event: torch.cuda.Event | None = None
        self._held: list[tuple[torch.cuda.Event, torch.Tensor]] = []

    @property
    def device(self) -> torch.device:
        return self._device

    def _cpu_access(self) -> None:
        """Before the CPU reads or writes host slots: let the last GPU copy on them finish."""
        if self._gpu_event is not None:
            self._gpu_event.synchronize()
            self._gpu_event = None
        self._held.clear()

    def _after_gpu_copy(self, event: torch.cuda.Event | None, keep: torch.Tensor | None = None) -> None:
        if event is None:
            return
        if self._device.type == "cpu":
            self._gpu_event = event
        self._held = [(e, t) for e, t in self._held if not e.query()]
        if keep is not None:  # pinned rows a DMA still reads: torch's host allocator must not hand them out yet
            self._held.append((event, keep))

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        """Rows of `slots`; a pinned tier returns pinned rows, so moving them to a GPU is an async DMA."""
        if self._device.type == "cpu":
            self._cpu_access()
        if not slots:
            return self.storage[:0].clone()
        if self._device.type == "cuda":
            out = torch.empty((len(slots), self.slot_bytes), dtype=torch.uint8, device=self._device)
            copy_slots(self.storage, slots, out, range(len(slots)))
            return out
        out = torch.empty((len(slots), self.slot_bytes), dtype=torch.uint8, pin_memory=self.pinned)
        copy_slots(self.storage, slots, out, range(len(slots)))
        return out

    def write(self, slots: Sequence[int], rows: torch.Tensor) -> None:
        if not slots:
            return
        if rows.shape != (len(slots), self.slot_bytes) or rows.dtype != torch.uint8:
            raise ValueError(
                f"{self.name} tier: write needs uint8 rows of shape {(len(slots), self.slot_bytes)}, "
                f"got {rows.dtype} {tuple(rows.shape)}"
            )
        if self._device.type == "cpu" and not rows.is_cuda:
            self._cpu_access()  # a plain CPU copy follows
        rows = rows.contiguous()
        event = copy_slots(rows, range(len(slots)), self.storage, slots)
        self._after_gpu_copy(event, keep=rows if rows.device.type == "cpu" else None)

    def copy_to(self, slots: Sequence[int], other: MemoryTier, other_slots: Sequence[int]) -> None:
        """Copy our `slots` into `other`'s `other_slots` in one batched transfer, with no temporary rows."""
        if len(slots) != len(other_slots):
            raise ValueError(f"{self.name} -> {other.name}: {len(slots)} source slots for {len(other_slots)} destinations")
        if other.slot_bytes != self.slot_bytes:
            raise ValueError(f"{self.name} -> {other.name}: slot sizes differ ({self.slot_bytes} != {other.slot_bytes})")
        if not slots:
            return
        gpu = self._device.type == "cuda" or other._device.type == "cuda"
        for tier in (self, other):
            if tier._device.type == "cpu" and not (gpu and tier.pinned):
                tier._cpu_access()
        event = copy_slots(self.storage, slots, other.storage, other_slots)
        self._after_gpu_copy(event)
        other._after_gpu_copy(event)

    def checksums(self, slots: Sequence[int]) -> list[int]:
        """xxh3_64 of each slot's bytes, hashed where they lie (CPU tiers only)."""
        if self._device.type != "cpu":
            raise ValueError(f"{self.name} tier: checksums are taken of CPU memory, this tier is on {self._device}")
        self._cpu_access()
        return checksum_slots(self.storage, slots)

    def view(self, slots: Sequence[int]) -> torch.Tensor:
        """Rows of the given slots without a copy where they are consecutive (else a gather)."""
        if self._device.type == "cpu":
            self._cpu_access()
        run = _contiguous_run(slots) if slots else (0, 0)
        if run is not None:
            return self.storage[run[0] : run[1]]
        return self.read(slots)

    def close(self) -> None:
        if self._device.type == "cpu":
            self._cpu_access()
        self.storage = self.storage[:0]
