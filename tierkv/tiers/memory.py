"""Tiers whose slots are rows of one preallocated torch tensor: GPU memory or (pinned) host RAM.

The same class serves as the device tier on a CPU-only machine, which is what lets the whole
store, eviction and promotion included, be tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Tier


def _index(slots: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(slots, dtype=torch.long).to(device, non_blocking=True)


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

    @property
    def device(self) -> torch.device:
        return self._device

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        if not slots:
            return self.storage[:0].clone()
        run = _contiguous_run(slots)
        if run is not None:
            return self.storage[run[0] : run[1]].clone()
        return self.storage.index_select(0, _index(slots, self._device))

    def write(self, slots: Sequence[int], rows: torch.Tensor) -> None:
        if not slots:
            return
        if rows.shape != (len(slots), self.slot_bytes) or rows.dtype != torch.uint8:
            raise ValueError(
                f"{self.name} tier: write needs uint8 rows of shape {(len(slots), self.slot_bytes)}, "
                f"got {rows.dtype} {tuple(rows.shape)}"
            )
        run = _contiguous_run(slots)
        if run is not None:
            self.storage[run[0] : run[1]].copy_(rows, non_blocking=True)
            return
        if rows.device != self._device:
            rows = rows.to(self._device, non_blocking=True)
        self.storage.index_copy_(0, _index(slots, self._device), rows)

    def view(self, slots: Sequence[int]) -> torch.Tensor:
        """Rows of the given slots without a copy where they are consecutive (else a gather)."""
        run = _contiguous_run(slots) if slots else (0, 0)
        if run is not None:
            return self.storage[run[0] : run[1]]
        return self.read(slots)

    def close(self) -> None:
        self.storage = self.storage[:0]
