"""Checks of what a caller hands the store, made before anything moves.

A `get` promotes blocks and a `put` evicts to make room before the bytes are copied, so an
argument that fails only at copy time (a device that does not exist here, a tensor on the meta
device, an engine page that is not there) has already changed the store by then. Each check
here runs first and raises a ValueError that names the argument and says what it must be.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import StoreConfig
from .errors import TierKVError
from .layout import KVLayout
from .namespace import Namespace
from .ops.engine_layout import EngineKV


def same_process(opened_by: int) -> None:
    """Refuse a forked child (multiprocessing's default start method on Linux) the use of a store opened by
    `opened_by`: its lock may have been held by a thread that does not exist there, and its tiers write the
    parent's files."""
    if os.getpid() != opened_by:
        raise TierKVError(
            f"this BlockStore was opened by process {opened_by}; this is process {os.getpid()}, a forked child, "
            "where the store's locks and threads did not survive the fork and its files are the parent's. "
            "Open a BlockStore of its own in the child (another disk_path, or the same one once the parent closed it)"
        )


def store_arguments(layout: Any, namespace: Any, config: Any) -> StoreConfig:
    """A `BlockStore`'s arguments checked for their types; the config (the default one for None)."""
    if not isinstance(layout, KVLayout):
        raise TypeError(f"layout must be a KVLayout, got {type(layout).__name__}")
    if not isinstance(namespace, Namespace):
        raise TypeError(f"namespace must be a Namespace, got {type(namespace).__name__}")
    config = StoreConfig() if config is None else config
    if not isinstance(config, StoreConfig):
        raise TypeError(f"config must be a StoreConfig, got {type(config).__name__}")
    return config


def check_first_block(first_block: int, n: int) -> None:
    """`first_block` of a put/get/save/load: an int from 0 to the `n` full blocks of tokens."""
    if isinstance(first_block, bool) or not isinstance(first_block, int) or not 0 <= first_block <= n:
        raise ValueError(f"first_block must be an int from 0 to {n} (the full blocks of tokens), got {first_block!r}")


def kv_rows(layout: KVLayout, kv: Any, num_tokens: int, first_block: int) -> torch.Tensor:
    """The KV of a `put` of `num_tokens` tokens from `first_block` on, checked, as `[n, block_bytes]` uint8 rows."""
    bt = layout.block_tokens
    n = num_tokens // bt
    check_first_block(first_block, n)
    if isinstance(kv, torch.Tensor) and kv.dim() >= 1 and kv.shape[0] != n - first_block:
        raise ValueError(
            f"kv holds {kv.shape[0]} blocks but tokens hold {n} full blocks of {bt} ({num_tokens} tokens)"
            + (f" from block {first_block} on" if first_block else "")
            + "; pass one block of KV per full block of tokens"
        )
    layout.check_blocks(kv, n - first_block)
    copyable(kv, "kv")
    return kv.contiguous().view(torch.uint8).reshape(n - first_block, layout.block_bytes)


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
