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
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20
HUGE_MIN_BYTES = 4 << 20  # below this the faults cost less than the mapping


def empty_rows(rows: int, row_bytes: int, device: torch.device | str = "cpu", *, pin: bool = False) -> torch.Tensor:
    """An uninitialised `[rows, row_bytes]` uint8 tensor on `device` (pinned host memory if `pin`)."""
    nbytes = rows * row_bytes
    dev = torch.device(device)
    if dev.type != "cpu" or pin or nbytes < HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty((rows, row_bytes), dtype=torch.uint8, device=dev, pin_memory=pin)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    flat = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` until the tensor is freed
    start = -flat.data_ptr() % HUGE_PAGE  # huge pages back only 2 MiB-aligned spans
    return flat[start : start + nbytes].view(rows, row_bytes)
