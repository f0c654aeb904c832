"""Fresh host tensors for rows handed to a caller: large ones on transparent huge pages.

A `get` on a CPU store returns a new tensor, and filling fresh memory is where its time went:
every 4 KiB page of a new 64 MiB tensor is faulted in and zeroed by the kernel before the copy
lands (measured on the 2-core CI machine: 64 MiB filled at ~2 GB/s into `torch.empty`, ~10 GB/s
into memory advised for huge pages, 512 faults of 2 MiB instead of 16,384 of 4 KiB). glibc hands
allocations this large straight to `mmap` and back to the kernel on free, so every call pays
again; torch's own huge-page switch (`THP_MEM_ALLOC_ENABLE`) is process-wide and read at import.

Only plain (pageable) CPU memory of `HUGE_MIN_BYTES` and more takes this path; pinned memory
and GPU memory come from torch's allocators as before. Where the kernel has transparent huge
pages off, the advice is a no-op and the tensor is ordinary memory.

Mappings whose tensors are gone are reused (up to `KEEP_BYTES` of them, `_Mappings`): their
pages are already faulted in, so the next `get` of that size copies at memory speed instead of
paying the kernel's zeroing again (65.5 MB copied on the CI machine: 2.2 GB/s into a fresh
mapping, 4.2 GB/s into a reused one; a CPU `get` of 1000 x 64 KiB went from 2.7 to 3.3-3.5 GB/s).
Like `torch.empty`, the rows come uninitialised: every caller overwrites each row before handing
it on. (The disk tier's `BufferPool` reuses its staging buffers explicitly; these are results
handed to callers, which give nothing back, hence the reference count.)
"""

from __future__ import annotations

import mmap
import sys
import threading

import torch

HUGE_PAGE = 2 << 20
HUGE_MIN_BYTES = 4 << 20  # below this the faults cost less than the mapping
KEEP_BYTES = 512 << 20  # mappings tracked for reuse, in use or not; beyond this, new ones are freed with their tensor


class _Mappings:
    """The huge-page mappings `empty_rows` handed out, reused once no tensor refers to one any more.

    A tensor made by `torch.frombuffer` holds a reference to its mapping for as long as its
    storage lives (views included), so a mapping whose only references are ours is free.
    """

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._held: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def _free(self, i: int) -> bool:
        # Free: its only references are our list's and getrefcount's argument (no local names).
        return sys.getrefcount(self._held[i]) <= 2

    def take(self, size: int) -> mmap.mmap:
        """A mapping of at least `size` bytes (and not much more), reused when a free one fits."""
        with self._lock:
            for i in range(len(self._held)):
                if size <= len(self._held[i]) <= size + size // 4 + HUGE_PAGE and self._free(i):
                    return self._held[i]
            held = sum(len(r) for r in self._held)
            i = 0
            while held + size > self.keep_bytes and i < len(self._held):  # make room: drop free ones, oldest first
                if self._free(i):
                    held -= len(self._held.pop(i))
                else:
                    i += 1
            region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            region.madvise(mmap.MADV_HUGEPAGE)
            if held + size <= self.keep_bytes:
                self._held.append(region)
            return region

    def held_bytes(self) -> int:
        with self._lock:
            return sum(len(r) for r in self._held)


_MAPPINGS = _Mappings(KEEP_BYTES)


def empty_rows(rows: int, row_bytes: int, device: torch.device | str = "cpu", *, pin: bool = False) -> torch.Tensor:
    """An uninitialised `[rows, row_bytes]` uint8 tensor on `device` (pinned host memory if `pin`)."""
    nbytes = rows * row_bytes
    dev = torch.device(device)
    if dev.type != "cpu" or pin or nbytes < HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty((rows, row_bytes), dtype=torch.uint8, device=dev, pin_memory=pin)
    region = _MAPPINGS.take(nbytes + HUGE_PAGE)
    flat = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` until the tensor is freed
    start = -flat.data_ptr() % HUGE_PAGE  # huge pages back only 2 MiB-aligned spans
    return flat[start : start + nbytes].view(rows, row_bytes)
