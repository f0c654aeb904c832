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
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ...errors import TierKVError
from ..base import Tier
from .writeback import WriteQueue

ALIGN = 4096
MAX_REQUEST = 2 << 20  # split long runs so that every I/O thread gets a share of a batch


def aligned_empty(nbytes: int) -> np.ndarray:
    """A uint8 array whose data starts on a 4 KiB boundary, as O_DIRECT requires."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes]


class _BufferPool:
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


class _PosixFiles:
    """Positional I/O on plain descriptors, O_DIRECT where the file system takes it."""

    def __init__(self, paths: list[Path], sizes: list[int], threads: int) -> None:
        self.fds: list[int] = []
        self.direct = True
        for path, size in zip(paths, sizes):
            fd, direct = _open_data_file(path, size)
            self.fds.append(fd)
            self.direct &= direct
        self.name = "posix O_DIRECT" if self.direct else "posix buffered"
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tierkv-disk")

    @staticmethod
    def _pread(fd: int, view: memoryview, offset: int) -> None:
        got = os.preadv(fd, [view], offset)
        if got != len(view):
            raise TierKVError(f"disk tier: short read ({got} of {len(view)} bytes) at offset {offset}")

    @staticmethod
    def _pwrite(fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)

    def run(self, write: bool, reqs: list[tuple[int, int, int, int]], buf: np.ndarray) -> None:
        fn = self._pwrite if write else self._pread
        view = memoryview(buf)
        futures = [self._pool.submit(fn, self.fds[f], view[b : b + n], off) for f, off, b, n in reqs]
        for fut in futures:
            fut.result()

    def sync(self, f: int) -> None:
        os.fdatasync(self.fds[f])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class _KvikioFiles:
    """kvikio `CuFile`s: GPUDirect Storage where the machine has it, kvikio's POSIX path otherwise.

    Buffers may be host arrays or CUDA tensors; kvikio splits and parallelises each request.
    """

    def __init__(self, paths: list[Path], sizes: list[int]) -> None:
        import kvikio

        for path, size in zip(paths, sizes):
            os.close(_open_data_file(path, size)[0])  # create and preallocate with our checks
        self.files = [kvikio.CuFile(path, "r+") for path in paths]
        self.name = kvikio_status()[1]

    def run(self, write: bool, reqs: list[tuple[int, int, int, int]], buf: np.ndarray | torch.Tensor) -> None:
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


class DiskTier(Tier):
    """Slots in data files under `directory`; the manifest lives beside them (store's job).

    `io` picks the file I/O: "posix" (everywhere), "kvikio" (needs kvikio and a CUDA driver)
    or "auto" (kvikio when it can work, else posix).
    """

    def __init__(self, directory: Path, num_slots: int, block_bytes: int, file_bytes: int = 16 << 30,
                 io_threads: int = 4, io: str = "auto", writeback_bytes: int = 256 << 20,
                 sync_writes: bool = True) -> None:
        super().__init__("disk", num_slots, block_bytes)
        self.directory = directory
        self.stride = slot_stride(block_bytes)
        self.slots_per_file = max(1, file_bytes // self.stride)
        num_files = -(-num_slots // self.slots_per_file) if num_slots else 0
        paths = [directory / f"data{i:03d}.bin" for i in range(num_files)]
        sizes = [min(self.slots_per_file, num_slots - i * self.slots_per_file) * self.stride for i in range(num_files)]
        usable, why = kvikio_status()
        if io == "kvikio" and not usable:
            raise TierKVError(f"disk tier: disk_io='kvikio' was asked for but {why}; use disk_io='posix' or 'auto'")
        if io not in ("auto", "posix", "kvikio"):
            raise TierKVError(f"disk tier: disk_io must be 'auto', 'posix' or 'kvikio', got {io!r}")
        self._files: _PosixFiles | _KvikioFiles
        if io == "kvikio" or (io == "auto" and usable):
            self._files = _KvikioFiles(paths, sizes)
        else:
            self._files = _PosixFiles(paths, sizes, io_threads)
        self._dirty: set[int] = set()
        self.sync_writes = sync_writes
        self._buffers = _BufferPool()
        self.queue = WriteQueue(self.stride, max(writeback_bytes, self.stride), self._write_job, self._buffers.release)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def io_path(self) -> str:
        return self._files.name

    def take(self, slots: Sequence[int]) -> None:
        """Mark slots recovered from the manifest as used."""
        used = set(slots)
        self._free = [s for s in self._free if s not in used]

    def allocate(self, n: int) -> list[int]:
        self._free.extend(self.queue.take_released())
        return super().allocate(n)

    def free(self, slots: Sequence[int]) -> None:
        super().free(self.queue.cancel(slots))

    # -- I/O -----------------------------------------------------------------------

    def _requests(self, slots: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """Merge slots into (file index, file offset, buffer offset, length) requests.

        The buffer holds the slots in the order given; consecutive slots of one file become
        one request, split at MAX_REQUEST so that several threads share a big batch.
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

    def write(self, slots: Sequence[int], rows: torch.Tensor) -> None:
        """Write now, on the caller's thread; durable after `sync()`."""
        if slots:
            buf = self._stage(slots, rows)
            try:
                self._write_buffer(slots, buf)
            finally:
                self._buffers.release(buf)

    def write_behind(self, slots: Sequence[int], rows: torch.Tensor) -> list[int]:
        """Queue the rows for the write-back thread; returns one generation per slot.

        The rows are copied, so the caller may reuse its memory at once. Blocks while the
        queue is full. Completion is reported through `queue.take_results()`.
        """
        return self.queue.submit(list(slots), self._stage(slots, rows)) if slots else []

    def drain(self) -> None:
        """Wait for the write-back queue to empty."""
        self.queue.drain()

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
        """One write-back batch, made durable before it is reported complete (unless sync is off)."""
        self._files.run(True, self._requests(slots), buf)
        if self.sync_writes:
            for f in sorted({s // self.slots_per_file for s in slots}):
                self._files.sync(f)

    def _write_buffer(self, slots: Sequence[int], buf: np.ndarray | torch.Tensor) -> None:
        try:
            self._files.run(True, self._requests(slots), buf)
        except OSError as e:
            raise TierKVError(f"disk tier: write failed in {self.directory}: {e.strerror}") from e
        self._dirty.update(s // self.slots_per_file for s in slots)

    # -- device memory (kvikio / GPUDirect Storage) -----------------------------------

    def read_to_device(self, slots: Sequence[int], device: torch.device) -> torch.Tensor:
        """Rows read straight into CUDA memory (GDS where available): needs the kvikio path."""
        self._need_kvikio()
        out = torch.empty((len(slots) * self.stride,), dtype=torch.uint8, device=device)
        if slots:
            self._files.run(False, self._requests(slots), out)
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

    def _need_kvikio(self) -> None:
        if not isinstance(self._files, _KvikioFiles):
            raise TierKVError(f"disk tier: device-memory I/O needs the kvikio path; this tier uses {self.io_path}")

    def sync(self) -> None:
        """Make every write so far durable (fdatasync of the files written since the last sync)."""
        for f in sorted(self._dirty):
            self._files.sync(f)
        self._dirty.clear()

    def close(self) -> None:
        self.queue.close()
        self._files.close()
