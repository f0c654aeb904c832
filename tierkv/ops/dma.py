"""Copy-engine transfers: many (dst, src, size) copies queued by one `cuMemcpyBatchAsync` call.

DMA copies use no SMs, so they do not slow the model's kernels the way a copy kernel that
streams over PCIe does. The driver's batch call needs a stream other than the legacy default
stream, so DMA always runs on a per-device copy stream of its direction (host -> device, or
device -> host/device) that is ordered after the caller's stream on entry and before it on
exit (see `transfer.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .cuda_build import KernelError, check_cuda, cuda_driver
from .streams import side_stream

BATCH_ENTRIES = 1024  # queue in slices so the copy engines start while later entries are built

_attrs: object | None = None


def copy_stream(device: torch.device, to_device: bool = False) -> torch.cuda.Stream:
    """The per-device stream the DMA batches of one direction run on.

    Uploads (`to_device`: host -> device) and downloads (device -> host, device -> device) have
    a stream each: a GPU has a copy engine per direction, and batches of both directions on one
    stream would run one after the other (a put and a get at once took 1.03x one's time on an H200).
    """
    return side_stream(device, "dma-h2d" if to_device else "dma-d2h")


def _as_numpy(rows: torch.Tensor | np.ndarray) -> np.ndarray:
    return rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows, dtype=np.int64)


def runs(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs where both int64 CPU index arrays advance by one together: (a_starts, b_starts, lengths).

    In numpy: it runs on the host before every DMA batch is queued, while the link waits, and a
    handful of numpy calls on a few hundred rows take microseconds where torch's took ~0.2 ms.
    """
    x, y = _as_numpy(a), _as_numpy(b)
    n = x.size
    if n == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    breaks = np.flatnonzero((x[1:] != x[:-1] + 1) | (y[1:] != y[:-1] + 1)) + 1
    idx = np.concatenate((np.zeros(1, dtype=np.int64), breaks))
    lengths = np.diff(idx, append=n)
    return x[idx], y[idx], lengths


def entries(dst_base: int, dst_rows: torch.Tensor | np.ndarray, src_base: int, src_rows: torch.Tensor | np.ndarray,
            row_bytes: int) -> tuple[list[int], list[int], list[int]]:
    """DMA (dsts, srcs, sizes) copying row `src_rows[i]` to row `dst_rows[i]`, one entry per joint run."""
    d0, s0, k = runs(dst_rows, src_rows)
    return ((dst_base + d0 * row_bytes).tolist(), (src_base + s0 * row_bytes).tolist(), (k * row_bytes).tolist())


def _attributes() -> object:
    global _attrs
    if _attrs is None:
        driver = cuda_driver()
        attrs = driver.CUmemcpyAttributes()
        attrs.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        attrs.flags = driver.CUmemcpyFlags.CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE
        _attrs = attrs
    return _attrs


def memcpy_batch(dsts: Sequence[int], srcs: Sequence[int], sizes: Sequence[int], stream: torch.cuda.Stream) -> None:
    """Queue `dsts[i] <- srcs[i]` (`sizes[i]` bytes each) on `stream` through the copy engines."""
    if stream.cuda_stream == 0:
        raise KernelError("cuMemcpyBatchAsync cannot run on the legacy default stream; use copy_stream()")
    driver = cuda_driver()
    attrs = [_attributes()]
    for start in range(0, len(dsts), BATCH_ENTRIES):
        stop = min(start + BATCH_ENTRIES, len(dsts))
        count = stop - start
        d = [driver.CUdeviceptr(x) for x in dsts[start:stop]]
        s = [driver.CUdeviceptr(x) for x in srcs[start:stop]]
        check_cuda(
            driver.cuMemcpyBatchAsync(d, s, list(sizes[start:stop]), count, attrs, [0], 1, driver.CUstream(stream.cuda_stream)),
            f"cuMemcpyBatchAsync ({count} copies)",
        )


def memcpy_2d(dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
              stream: torch.cuda.Stream) -> None:
    """Queue a pitched copy on `stream`: `height` rows of `width` bytes, `src_pitch` / `dst_pitch` bytes apart.

    One call moves one layer of a run of consecutive store blocks (a strided slice of each block)
    through the copy engines, where a batch would need an entry, and a Python object, per block.
    Both addresses are unified (device or pinned host memory).
    """
    driver = cuda_driver()
    p = driver.CUDA_MEMCPY2D()
    p.srcMemoryType = driver.CUmemorytype.CU_MEMORYTYPE_UNIFIED
    p.srcDevice = driver.CUdeviceptr(src)
    p.srcPitch = src_pitch
    p.dstMemoryType = driver.CUmemorytype.CU_MEMORYTYPE_UNIFIED
    p.dstDevice = driver.CUdeviceptr(dst)
    p.dstPitch = dst_pitch
    p.WidthInBytes = width
    p.Height = height
    check_cuda(driver.cuMemcpy2DAsync(p, driver.CUstream(stream.cuda_stream)), f"cuMemcpy2DAsync ({height} x {width} B)")
