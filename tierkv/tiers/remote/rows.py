"""Memory for values received from the network: huge pages, and the same pages again next time.

Fresh memory costs a page fault per 4 KiB the first time it is written; on a virtual machine that
can be slower than the network itself (measured on the reference VM: 0.6 GB/s to fill fresh
malloc'd memory, 1.7 GB/s on huge pages, 3 GB/s on memory written before). A read of many
blocks therefore lands in private anonymous memory marked for transparent huge pages (one fault
per 2 MiB, where the kernel offers them: `madvise` mode, most distributions' default), and an
area whose rows are no longer referenced goes back to a small pool for the next read instead of
to the kernel. The area is returned when the numpy array over it dies, which is when the last
tensor sharing its storage dies (torch keeps the array alive as the storage's owner), so a view
the caller still holds keeps the area out of the pool.
"""

from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np
import torch

HUGE_ROWS = 8 << 20  # reads at least this large get an area of their own; smaller ones plain memory
POOL_BYTES = 256 << 20  # idle areas kept for the next reads, at most
_GRAIN = 2 << 20  # areas come in multiples of a huge page


class RowAreas:
    """A pool of idle areas, by size (thread-safe)."""

    def __init__(self, limit_bytes: int = POOL_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self._idle: dict[int, list[mmap.mmap]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def rows(self, n: int, row_bytes: int) -> torch.Tensor:
        """New `[n, row_bytes]` uint8 rows: plain memory when small, else an area (reused when one is idle)."""
        nbytes = n * row_bytes
        if nbytes < HUGE_ROWS or not hasattr(mmap, "MADV_HUGEPAGE"):
            return torch.empty((n, row_bytes), dtype=torch.uint8)
        size = -(-nbytes // _GRAIN) * _GRAIN
        area = self._take(size)
        if area is None:
            area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            area.madvise(mmap.MADV_HUGEPAGE)
        array = np.frombuffer(area, dtype=np.uint8, count=nbytes)
        weakref.finalize(array, self._give_back, area, size)
        return torch.from_numpy(array.reshape(n, row_bytes))

    def _take(self, size: int) -> mmap.mmap | None:
        with self._lock:
            idle = self._idle.get(size)
            if not idle:
                return None
            self._idle_bytes -= size
            return idle.pop()

    def _give_back(self, area: mmap.mmap, size: int) -> None:
        with self._lock:
            if self._idle_bytes + size <= self.limit_bytes:
                self._idle.setdefault(size, []).append(area)
                self._idle_bytes += size
        # Over the pool's bound the area is dropped: unmapped once the dying array lets go of it.

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes


AREAS = RowAreas()  # one pool per process: every remote tier's reads share it
