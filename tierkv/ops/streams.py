"""Named per-device CUDA side streams, created once: where tierkv queues work that must not wait in line.

Work on one stream runs in order, so a copy queued behind an unrelated one waits for it. Each
name is one queue per device: the copy engines' two directions (`dma`), the staging kernels
(`staging`, highest priority), and the read-ahead of verified loads and the copies of hashed
saves (`placement`, `tiers.memory`), which run beside the caller's stream instead of in it.
"""

from __future__ import annotations

import threading

import torch

_streams: dict[tuple[int, str], torch.cuda.Stream] = {}
_lock = threading.Lock()


def side_stream(device: torch.device, name: str, priority: int = 0) -> torch.cuda.Stream:
    """The stream `name` of `device` (the current device when it has no index); `priority` counts at creation only."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        s = _streams.get((index, name))
        if s is None:
            s = _streams[(index, name)] = torch.cuda.Stream(device=index, priority=priority)
        return s
