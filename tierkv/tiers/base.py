"""The one interface every tier offers, so the store moves blocks without caring where they live.

A tier is a pool of fixed-size slots, one block each. It knows nothing about keys, recency or
other tiers: the index decides what lives where, the tier only keeps bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class Tier(ABC):
    """A slot pool on one kind of memory. Slots are ints in `[0, num_slots)`."""

    def __init__(self, name: str, num_slots: int, slot_bytes: int) -> None:
        if num_slots < 0:
            raise ValueError(f"{name} tier: num_slots must be >= 0, got {num_slots}")
        self.name = name
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        # Highest slots last so that pop() hands out low slots first: keeps memory dense.
        self._free: list[int] = list(range(num_slots - 1, -1, -1))

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Up to `n` free slots (fewer when the pool runs out); never evicts."""
        n = min(n, len(self._free))
        if n <= 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        taken.reverse()
        return taken

    def free(self, slots: Sequence[int]) -> None:
        self._free.extend(slots)

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where `read` returns its rows."""

    @abstractmethod
    def read(self, slots: Sequence[int]) -> torch.Tensor:
        """Gather slots into a new `[len(slots), slot_bytes]` uint8 tensor on `self.device`."""

    @abstractmethod
    def write(self, slots: Sequence[int], rows: torch.Tensor) -> None:
        """Scatter `rows` (`[len(slots), slot_bytes]` uint8, any device) into the slots."""

    def close(self) -> None:
        """Release the tier's memory; the default has nothing to release."""
