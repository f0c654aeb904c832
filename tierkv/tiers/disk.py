"""The disk tier: block payloads in preallocated data files, one 4 KiB-aligned slot per block.

The tier only keeps bytes. What a slot holds (key, token ids, checksum) is recorded in the
manifest by the store *after* the bytes are durable, and every read is verified against the
checksum there, so a torn or stale slot is detected instead of served.

I/O is positional (`os.preadv` / `os.pwrite`) from a thread pool, through O_DIRECT where the
file system allows it, with consecutive slots merged into one request. Slots are aligned to
4 KiB so the same files also suit kvikio / GPUDirect Storage.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import TierKVError
from .base import Tier

ALIGN = 4096
MAX_REQUEST = 8 << 20  # split long runs so that several threads share a big batch


def aligned_empty(nbytes: int) -> np.ndarray:
    """A uint8 array whose data starts on a 4 KiB boundary, as O_DIRECT requires."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes]


def slot_stride(block_bytes: int) -> int:
    return -(-block_bytes // ALIGN) * ALIGN


def _open_data_file(path: Path, size: int) -> tuple[int, bool]:
    """Open (creating and preallocating) one data file; returns (fd, uses O_DIRECT)."""
    flags = os.O_RDWR | os.O_CREAT
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise TierKVError(f"disk tier: cannot open data file {path}: {e.strerror}") from None
    try:
        if os.fstat(fd).st_size < size:
            os.posix_fallocate(fd, 0, size)
        elif os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.ENOSPC:
            raise TierKVError(
                f"disk tier: no space to preallocate {size} bytes for {path}; "
                "free disk space or lower disk_bytes"
            ) from None
        raise TierKVError(f"disk tier: cannot size data file {path}: {e.strerror}") from None
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            dfd = os.open(path, os.O_RDWR | direct)
        except OSError:  # tmpfs and some overlay file systems refuse O_DIRECT
            return fd, False
        probe = aligned_empty(ALIGN)
        try:
            os.preadv(dfd, [memoryview(probe)], 0)
        except OSError:
            os.close(dfd)
            return fd, False
        os.close(fd)
        return dfd, True
    return fd, False


class DiskTier(Tier):
    """Slots in data files under `directory`; the manifest lives beside them (store's job)."""

    def __init__(self, directory: Path, num_slots: int, block_bytes: int, file_bytes: int = 16 << 30,
                 io_threads: int = 4) -> None:
        super().__init__("disk", num_slots, block_bytes)
        self.directory = directory
        self.stride = slot_stride(block_bytes)
        self.slots_per_file = max(1, file_bytes // self.stride)
        num_files = -(-num_slots // self.slots_per_file) if num_slots else 0
        self._fds: list[int] = []
        self.direct = True
        for i in range(num_files):
            slots_here = min(self.slots_per_file, num_slots - i * self.slots_per_file)
            fd, direct = _open_data_file(directory / f"data{i:03d}.bin", slots_here * self.stride)
            self._fds.append(fd)
            self.direct &= direct
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="tierkv-disk")
        self._dirty: set[int] = set()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def io_path(self) -> str:
        return "posix O_DIRECT" if self.direct else "posix buffered"

    def take(self, slots: Sequence[int]) -> None:
        """Mark slots recovered from the manifest as used."""
        used = set(slots)
        self._free = [s for s in self._free if s not in used]

    # -- I/O -----------------------------------------------------------------------

    def _requests(self, slots: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """Merge slots into (fd index, file offset, buffer offset, length) requests.

        The buffer holds the slots in the order given; consecutive slots of one file become
        one request, split at MAX_REQUEST so the thread pool can work on them in parallel.
        """
        reqs: list[tuple[int, int, int, int]] = []
        spf, stride = self.slots_per_file, self.stride
        for pos, slot in enumerate(slots):
            f, off = divmod(slot, spf)
            if reqs:
                pf, poff, pbuf, plen = reqs[-1]
                if pf == f and poff + plen == off * stride and pbuf + plen == pos * stride and plen < MAX_REQUEST:
                    reqs[-1] = (pf, poff, pbuf, plen + stride)
                    continue
            reqs.append((f, off * stride, pos * stride, stride))
        return reqs

    def _run(self, fn, reqs: list[tuple[int, int, int, int]], buf: np.ndarray) -> None:
        view = memoryview(buf)
        futures = [self._pool.submit(fn, self._fds[f], view[b : b + n], off) for f, off, b, n in reqs]
        for fut in futures:
            fut.result()

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        buf = aligned_empty(len(slots) * self.stride)

        def pread(fd: int, view: memoryview, offset: int) -> None:
            got = os.preadv(fd, [view], offset)
            if got != len(view):
                raise TierKVError(f"disk tier: short read ({got} of {len(view)} bytes) at offset {offset}")

        if slots:
            self._run(pread, self._requests(slots), buf)
        rows = torch.from_numpy(buf).view(len(slots), self.stride)
        return rows if self.stride == self.slot_bytes else rows[:, : self.slot_bytes].contiguous()

    def write(self, slots: Sequence[int], rows: torch.Tensor) -> None:
        if rows.shape != (len(slots), self.slot_bytes) or rows.dtype != torch.uint8:
            raise ValueError(
                f"disk tier: write needs uint8 rows of shape {(len(slots), self.slot_bytes)}, "
                f"got {rows.dtype} {tuple(rows.shape)}"
            )
        if not slots:
            return
        buf = aligned_empty(len(slots) * self.stride)
        staged = torch.from_numpy(buf).view(len(slots), self.stride)
        staged[:, : self.slot_bytes].copy_(rows)
        if self.stride != self.slot_bytes:
            staged[:, self.slot_bytes :].zero_()

        def pwrite(fd: int, view: memoryview, offset: int) -> None:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)

        try:
            self._run(pwrite, self._requests(slots), buf)
        except OSError as e:
            raise TierKVError(f"disk tier: write failed in {self.directory}: {e.strerror}") from e
        self._dirty.update(s // self.slots_per_file for s in slots)

    def sync(self) -> None:
        """Make every write so far durable (fdatasync of the files written since the last sync)."""
        for f in sorted(self._dirty):
            os.fdatasync(self._fds[f])
        self._dirty.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds:
            os.close(fd)
        self._fds = []
