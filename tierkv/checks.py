"""Checks of what a caller hands the store, made before anything moves.

A `get` promotes blocks and a `put` evicts to make room before the bytes are copied, so an
argument that fails only at copy time (a device that does not exist here, a tensor on the meta
device, an engine page that is not there) has already changed the store by then. Each check
here runs first and raises a ValueError that names the argument and says what it must be.
"""

from __future__ import annotations

from typing import Any

import torch

from .ops.engine_layout import EngineKV


def memory_device(device: Any, what: str = "device") -> torch.device:
    """`device` as a torch.device the store can copy into here: the CPU, or a CUDA device this machine has."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what}: expected 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from None
    if d.type == "cpu":
        return d
    if d.type != "cuda":
        raise ValueError(f"{what}: the store copies blocks to CPU or CUDA memory, not {d.type!r} ({device!r})")
    if not torch.cuda.is_available():
        raise ValueError(f"{what}: {device!r} was asked for, but CUDA is not available here; use 'cpu'")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"{what}: {device!r} was asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def copyable(tensor: torch.Tensor, what: str) -> None:
    """A tensor whose bytes can be copied: dense, in CPU or CUDA memory (not meta, not sparse)."""
    if tensor.layout != torch.strided:
        raise ValueError(f"{what} is a {tensor.layout} tensor; pass a dense (strided) one")
    if tensor.is_meta or tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} lives on {tensor.device}, which holds no bytes the store can copy; pass a CPU or "
                         "CUDA tensor")


def engine_memory(engine: EngineKV) -> None:
    """The engine's pages are in memory the store can copy from and to, on a device this machine has."""
    if not isinstance(engine, EngineKV):
        raise TypeError(f"engine must be an EngineKV, got {type(engine).__name__}")
    memory_device(engine.device, "engine device")
    for i, t in enumerate(engine.tensors):
        copyable(t, f"engine tensor {i}")
