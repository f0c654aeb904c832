"""Block checksums: what makes every read from host or disk verifiable.

xxh3_64 runs at memory speed on one core, so checking each block read from a slower tier
costs little next to the copy itself, and a flipped bit is never served.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import xxhash

_digest = xxhash.xxh3_64_intdigest


def checksum_rows(rows: torch.Tensor) -> list[int]:
    """xxh3_64 of each row of a CPU `[n, nbytes]` uint8 tensor."""
    if rows.device.type != "cpu" or rows.dtype != torch.uint8 or rows.dim() != 2:
        raise ValueError(f"checksum_rows needs a 2-D uint8 CPU tensor, got {rows.dtype} {tuple(rows.shape)} on {rows.device}")
    array = rows.contiguous().numpy()
    return [_digest(row) for row in array]


def checksum_slots(storage: torch.Tensor, slots: Sequence[int]) -> list[int]:
    """xxh3_64 of rows `slots` of a CPU `[num_slots, nbytes]` uint8 pool, hashed in place."""
    if storage.device.type != "cpu" or storage.dtype != torch.uint8 or storage.dim() != 2:
        raise ValueError(
            f"checksum_slots needs a 2-D uint8 CPU pool, got {storage.dtype} {tuple(storage.shape)} on {storage.device}"
        )
    array = storage.numpy()
    return [_digest(array[s]) for s in slots]


# -- block checksums: a tree over 4 KiB sectors ----------------------------------------------
#
# A block of n bytes is cut into k = ceil(n / 4096) sectors, the last one zero-padded to 4096
# bytes. leaf_i = XXH3_64bits(sector_i) (default secret, seed 0), and the block's checksum is
# XXH64 of the leaves as little-endian u64 words, seeded with n. The GPU computes the same bits
# as part of a gather or after a scatter (`tierkv.ops.checksum`, `csrc/checksum.cu`); this is
# the CPU side, for CPU stores, disk-tier recovery and scrubs.
#
# Why this function: every leaf is a 64-bit hash of one sector and the root hashes the leaves in
# order, so a flipped bit, a torn sector (stale or zeroed), two sectors swapped or a sector moved
# all change the ordered leaves, and any one such change goes unseen with probability ~2^-64. The
# seed binds the length (n = 4096 and n = 4000 with zero bytes differ). XXH3's 32x32->64 multiplies
# run at memory speed on a GPU (four lanes per sector, no shuffles until the merge), and on the
# CPU both levels are calls into the C `xxhash` package. A block swapped for another block is
# caught by the caller comparing with the checksum recorded for that key.

TREE_CHECKSUM = "xxh3-4k-sectors/xxh64-v1"
SECTOR_BYTES = 4096
_xxh64 = xxhash.xxh64_intdigest
_ZERO_SECTOR = bytes(SECTOR_BYTES)


@functools.lru_cache(maxsize=64)
def _sector_plan(n: int) -> tuple[tuple[slice, ...], int, Callable[..., bytes]]:
    """For blocks of n bytes: the slices of the full sectors, where a short last one starts (-1: none), the leaf packer."""
    full = n // SECTOR_BYTES
    tail = full * SECTOR_BYTES if n % SECTOR_BYTES else -1
    k = full + (tail >= 0)
    slices = tuple(slice(o, o + SECTOR_BYTES) for o in range(0, full * SECTOR_BYTES, SECTOR_BYTES))
    return slices, tail, struct.Struct(f"<{k}Q").pack


def _tree(block: memoryview) -> int:
    """The checksum of one block given as a 1-D byte memoryview (no copy but the short last sector)."""
    n = len(block)
    slices, tail, pack = _sector_plan(n)
    leaves = map(_digest, map(block.__getitem__, slices))  # one C call per sector, no Python loop
    if tail < 0:
        return _xxh64(pack(*leaves), n)
    last = block[tail:]
    return _xxh64(pack(*leaves, _digest(bytes(last) + _ZERO_SECTOR[len(last):])), n)


def _bytes_view(block: object) -> memoryview:
    if isinstance(block, torch.Tensor):
        if block.device.type != "cpu":
            raise ValueError(f"block_checksum hashes CPU memory, got a tensor on {block.device}")
        block = block.contiguous().reshape(-1).view(torch.uint8).numpy()
    buffer: Any = block  # anything with the buffer protocol
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError("block_checksum needs a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def block_checksum(block: bytes | bytearray | memoryview | np.ndarray | torch.Tensor) -> int:
    """The `TREE_CHECKSUM` of one block: XXH64(XXH3 of each zero-padded 4 KiB sector, seed = length).

    Any contiguous bytes-like object (numpy arrays and CPU tensors of any dtype count by their
    bytes). A block of 0 bytes has no sectors: its checksum is XXH64 of nothing, seed 0.
    """
    return _tree(_bytes_view(block))


def _pool_view(storage: torch.Tensor, what: str) -> tuple[memoryview, int]:
    """A 2-D uint8 CPU pool as one flat byte memoryview, and its row length."""
    if storage.device.type != "cpu" or storage.dtype != torch.uint8 or storage.dim() != 2:
        raise ValueError(f"{what} needs a 2-D uint8 CPU tensor, got {storage.dtype} {tuple(storage.shape)} on {storage.device}")
    array: Any = storage.numpy()
    return (memoryview(array).cast("B") if storage.numel() else memoryview(b"")), storage.shape[1]


def checksum_blocks(rows: torch.Tensor) -> list[int]:
    """`block_checksum` of each row of a CPU `[n, nbytes]` uint8 tensor."""
    view, n = _pool_view(rows.contiguous(), "checksum_blocks")
    return [_tree(view[o:o + n]) for o in range(0, rows.shape[0] * n, n)] if n else [_tree(view)] * rows.shape[0]


def checksum_block_slots(storage: torch.Tensor, slots: Sequence[int]) -> list[int]:
    """`block_checksum` of rows `slots` of a CPU `[num_slots, nbytes]` uint8 pool, hashed in place."""
    if not storage.is_contiguous():
        raise ValueError(f"checksum_block_slots needs a contiguous pool, got strides {storage.stride()}")
    view, n = _pool_view(storage, "checksum_block_slots")
    num = storage.shape[0]
    out = []
    for s in slots:
        s = int(s)
        if not 0 <= s < num:
            raise IndexError(f"slot {s} outside [0, {num})")
        out.append(_tree(view[s * n:(s + 1) * n]))
    return out
