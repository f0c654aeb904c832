"""The disk tier's file I/O: preallocated data files, aligned staging buffers, POSIX or kvikio requests.

I/O is positional (`os.preadv` / `os.pwrite`) from a thread pool, through O_DIRECT where the
file system allows it, with consecutive slots merged into one request by the tier. Slots are
aligned to 4 KiB so the same files also suit kvikio / GPUDirect Storage.
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ...errors import TierKVError
from ..host_rows import HUGE_MIN_BYTES, empty_rows
from . import faults

ALIGN = 4096


def aligned_empty(nbytes: int) -> np.ndarray:
    """A uint8 array whose data starts on a 4 KiB boundary, as O_DIRECT requires (large ones on huge pages)."""
    if nbytes >= HUGE_MIN_BYTES:
        return empty_rows(1, nbytes).numpy()[0]  # 2 MiB-aligned
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes]


class BufferPool:
    """Reused aligned staging buffers: a fresh one costs a page fault per 4 KiB on first touch,
    which at disk-write sizes is as slow as the disk."""

    def __init__(self, keep: int = 8) -> None:
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._keep = keep

    def get(self, nbytes: int) -> np.ndarray:
        with self._lock:
            bufs = self._free.get(nbytes)
            if bufs:
                return bufs.pop()
        return aligned_empty(nbytes)

    def release(self, buf: np.ndarray) -> None:
        with self._lock:
            bufs = self._free.setdefault(buf.nbytes, [])
            if len(bufs) < self._keep:
                bufs.append(buf)


class IORequest(NamedTuple):
    """One positional transfer: `length` bytes at `offset` of data file `file`, at `buffer_offset` of the buffer."""

    file: int
    offset: int
    buffer_offset: int
    length: int


def slot_stride(block_bytes: int) -> int:
    """Bytes a slot takes in a data file: the block rounded up to the 4 KiB that O_DIRECT and GDS want."""
    return -(-block_bytes // ALIGN) * ALIGN


def open_data_file(path: Path, size: int) -> tuple[int, bool]:
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
            os.preadv(dfd, [probe.data], 0)
        except OSError:
            os.close(dfd)
            return fd, False
        os.close(fd)
        return dfd, True
    return fd, False


def kvikio_status() -> tuple[bool, str]:
    """Whether kvikio can do file I/O here, and why (or why not), without ever hanging.

    kvikio `dlopen`s libcuda even in compatibility mode and its driver probe hangs without
    a GPU, so it is only tried where torch already sees a working CUDA driver.
    """
    try:
        import kvikio  # noqa: F401
    except ImportError:
        return False, "kvikio is not installed (pip install 'tierkv[gpu]')"
    if not torch.cuda.is_available():
        return False, "kvikio is installed but there is no CUDA driver, which its file I/O needs"
    import kvikio.defaults

    mode = kvikio.defaults.get("compat_mode")
    return True, f"kvikio {kvikio.__version__}, compat_mode={getattr(mode, 'name', mode)}"


class PosixFiles:
    """Positional I/O on plain descriptors, O_DIRECT where the file system takes it."""

    def __init__(self, paths: list[Path], sizes: list[int], threads: int) -> None:
        self.fds: list[int] = []
        self.direct = True
        for path, size in zip(paths, sizes):
            fd, direct = open_data_file(path, size)
            self.fds.append(fd)
            self.direct &= direct
        self.name = "posix O_DIRECT" if self.direct else "posix buffered"
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tierkv-disk")

    def _pread(self, f: int, view: memoryview, offset: int) -> None:
        faults.check("read", f, offset, len(view))
        got = os.preadv(self.fds[f], [view], offset)
        if got != len(view):
            raise OSError(errno.EIO, f"short read ({got} of {len(view)} bytes) at offset {offset} of data file {f}")

    def _pwrite(self, f: int, view: memoryview, offset: int) -> None:
        faults.check("write", f, offset, len(view))
        done = 0
        while done < len(view):
            done += os.pwrite(self.fds[f], view[done:], offset + done)

    def run(self, write: bool, reqs: list[IORequest], buf: np.ndarray) -> None:
        """Every request of one batch, in parallel; the first OSError is raised once all have ended."""
        fn = self._pwrite if write else self._pread
        view = buf.data  # the array's own memoryview (numpy types __buffer__ only for Python >= 3.12)
        futures = [self._pool.submit(fn, f, view[b : b + n], off) for f, off, b, n in reqs]
        errors = [e for e in (fut.exception() for fut in futures) if e is not None]
        if errors:
            raise errors[0]

    def sync(self, f: int) -> None:
        faults.check("sync", f, 0, 0)
        os.fdatasync(self.fds[f])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class KvikioFiles:
    """kvikio `CuFile`s: GPUDirect Storage where the machine has it, kvikio's POSIX path otherwise.

    Buffers may be host arrays or CUDA tensors; kvikio splits and parallelises each request.
    """

    def __init__(self, paths: list[Path], sizes: list[int]) -> None:
        import kvikio

        for path, size in zip(paths, sizes):
            os.close(open_data_file(path, size)[0])  # create and preallocate with our checks
        self.files = [kvikio.CuFile(path, "r+") for path in paths]
        self.name = kvikio_status()[1]

    def run(self, write: bool, reqs: list[IORequest], buf: np.ndarray | torch.Tensor) -> None:
        futures = []
        for f, off, b, n in reqs:
            part = buf[b : b + n]
            io = self.files[f].pwrite if write else self.files[f].pread
            futures.append((io(part, n, off), n, off))
        for fut, n, off in futures:
            got = fut.get()
            if got != n:
                raise TierKVError(f"disk tier: kvikio moved {got} of {n} bytes at offset {off}")

    def sync(self, f: int) -> None:
        os.fdatasync(self.files[f].fileno())

    def close(self) -> None:
        for file in self.files:
            file.close()
        self.files = []


