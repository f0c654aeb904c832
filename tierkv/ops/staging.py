"""Staged copies between device memory and pinned host rows: device kernels fill (or drain) staging
buffers, the copy engines move them, both overlapped through a few reused buffers.

Why: copy engines alone are slow on small scattered rows, and an SM kernel copying over UVA
holds SMs for the whole transfer. A short device-side gather into a staging buffer, then one DMA
entry per run of consecutive host rows, moves small blocks at link speed and frees the SMs
after each fill (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import dma
from .streams import side_stream

STAGING_BYTES = 32 << 20  # per staging buffer
# Buffers filled ahead of the copy engines: 4 x 32 MiB is 2.4 ms of PCIe traffic, longer than a
# 1.4 ms bf16 8192^3 matmul kernel that holds every SM while the next fill waits for one.
STAGING_BUFFERS = 4


def upload(t: torch.Tensor, s: torch.cuda.Stream) -> torch.Tensor:
    """A CPU index tensor on the stream's device, queued on that stream (so kernels see it in order).

    Staged through torch's pinned-memory cache: a copy from pageable memory would first wait for
    all work already queued on `s`, which serialises back-to-back transfers."""
    with torch.cuda.stream(s):
        return t.pin_memory().to(s.device, non_blocking=True)


def device_arange(n: int, s: torch.cuda.Stream) -> torch.Tensor:
    with torch.cuda.stream(s):
        return torch.arange(n, dtype=torch.int64, device=s.device)


# (staging buffer, this chunk's device items, rows 0..m-1 of the buffer, stream to launch on)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.cuda.Stream], None]


def _fill_stream(device: torch.device) -> torch.cuda.Stream:
    """A highest-priority stream for the staging kernels: when the model's kernels hold every SM,
    the block scheduler gives the next free SM to these short fills first, so the copy engines
    are not left waiting behind the model's queue."""
    return side_stream(device, "staging", priority=-100)


def _chunks(n: int, row_bytes: int) -> list[tuple[int, int]]:
    per = max(1, STAGING_BYTES // row_bytes)
    return [(a, min(a + per, n)) for a in range(0, n, per)]


def _host_order(host_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, host rows in that order): ascending host rows, so consecutive slots merge into one DMA entry."""
    arr = host_rows.numpy()
    if arr.size < 2 or bool(np.all(arr[1:] > arr[:-1])):
        return torch.arange(arr.size, dtype=torch.int64), host_rows
    order = torch.from_numpy(np.argsort(arr))
    return order, host_rows[order]


@dataclass(frozen=True)
class StagingPlan:
    """What both staged directions share, for one transfer queued after stream `s`."""

    host_rows: torch.Tensor  # host rows in ascending order, so consecutive slots merge into one DMA entry
    fill: torch.cuda.Stream  # the staging kernels' stream (highest priority)
    copy: torch.cuda.Stream  # the copy engines' stream
    items: torch.Tensor  # the device items in the order of `host_rows`, uploaded
    chunks: list[tuple[int, int]]  # [a, b) ranges of items, one staging buffer's worth each
    buffers: list[torch.Tensor]  # the staging buffers, reused round-robin
    buffer_rows: torch.Tensor  # 0..rows-1 of a buffer, on the device

    @classmethod
    def make(cls, items: torch.Tensor, host_rows: torch.Tensor, row_bytes: int, s: torch.cuda.Stream,
             to_device: bool) -> StagingPlan:
        order, sorted_rows = _host_order(host_rows)
        fs, cs = _fill_stream(s.device), dma.copy_stream(s.device, to_device)
        fs.wait_stream(s)
        cs.wait_stream(s)
        dev_items = upload(items[order], fs)
        chunks = _chunks(sorted_rows.numel(), row_bytes)
        bufs = _staging(chunks, row_bytes, fs)
        return cls(sorted_rows, fs, cs, dev_items, chunks, bufs, device_arange(bufs[0].shape[0], fs))


def staged_to_host(items: torch.Tensor, host_rows: torch.Tensor, host: torch.Tensor, row_bytes: int,
                    fill: Kernel, s: torch.cuda.Stream) -> None:
    """Device kernels fill staging buffers (items in host-row order), the copy engines drain them to host rows.

    Fills run on a high-priority stream `fs`, DMA on the copy stream `cs`; a buffer is refilled
    only after its DMA's event. Both streams start after `s` and `s` continues after both.
    """
    plan = StagingPlan.make(items, host_rows, row_bytes, s, to_device=False)
    fs, cs, bufs = plan.fill, plan.copy, plan.buffers
    dev_items, buf_rows, sorted_rows = plan.items, plan.buffer_rows, plan.host_rows
    freed: list[torch.cuda.Event | None] = [None] * len(bufs)
    for k, (a, b) in enumerate(plan.chunks):
        i = k % len(bufs)
        prev = freed[i]
        if prev is not None:
            fs.wait_event(prev)
        fill(bufs[i], dev_items[a:b], buf_rows[: b - a], fs)
        ready = torch.cuda.Event()
        ready.record(fs)
        cs.wait_event(ready)
        staged = torch.arange(b - a, dtype=torch.int64)
        dma.memcpy_batch(*dma.entries(host.data_ptr(), sorted_rows[a:b], bufs[i].data_ptr(), staged, row_bytes), cs)
        done = torch.cuda.Event()
        done.record(cs)
        freed[i] = done
    s.wait_stream(fs)
    s.wait_stream(cs)


def staged_from_host(items: torch.Tensor, host_rows: torch.Tensor, host: torch.Tensor, row_bytes: int,
                      drain: Kernel, s: torch.cuda.Stream) -> None:
    """The copy engines fill staging buffers from host rows (ascending), device kernels scatter them."""
    plan = StagingPlan.make(items, host_rows, row_bytes, s, to_device=True)
    fs, cs, bufs = plan.fill, plan.copy, plan.buffers
    dev_items, buf_rows, sorted_rows = plan.items, plan.buffer_rows, plan.host_rows
    freed: list[torch.cuda.Event | None] = [None] * len(bufs)
    for k, (a, b) in enumerate(plan.chunks):
        i = k % len(bufs)
        prev = freed[i]
        if prev is not None:
            cs.wait_event(prev)
        staged = torch.arange(b - a, dtype=torch.int64)
        dma.memcpy_batch(*dma.entries(bufs[i].data_ptr(), staged, host.data_ptr(), sorted_rows[a:b], row_bytes), cs)
        ready = torch.cuda.Event()
        ready.record(cs)
        fs.wait_event(ready)
        drain(bufs[i], dev_items[a:b], buf_rows[: b - a], fs)
        done = torch.cuda.Event()
        done.record(fs)
        freed[i] = done
    s.wait_stream(fs)
    s.wait_stream(cs)


def _staging(chunks: list[tuple[int, int]], row_bytes: int, fs: torch.cuda.Stream) -> list[torch.Tensor]:
    """Up to STAGING_BUFFERS buffers from torch's allocator on the fill stream.

    Freed memory is reused only in `fs`'s order, and `fs` ends after waiting for the copy
    stream, so no later user of the memory can overtake a DMA still reading or writing it."""
    rows = max(b - a for a, b in chunks)
    with torch.cuda.stream(fs):
        return [torch.empty((rows, row_bytes), dtype=torch.uint8, device=fs.device)
                for _ in range(min(len(chunks), STAGING_BUFFERS))]
