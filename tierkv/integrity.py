"""Block checksums: what makes every read from host, disk or a remote store verifiable.

Every tier checks blocks with one function, `TREE_CHECKSUM` below: a tree over 4 KiB sectors
that a CUDA kernel computes where the bytes are (`tierkv.ops.checksum`, as part of a gather to
the host or after a DMA from it) and that this module computes bit-identically on the CPU (CPU
stores, disk-tier recovery and scrubs, the remote tier's records). `LEGACY_CHECKSUM` is the
whole-block xxh3_64 that stores used before; it is kept only to verify old disk manifests while
they are migrated (`tiers/disk/migrate.py`).
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import xxhash

from .ops.cpu_build import native_checksums

_digest = xxhash.xxh3_64_intdigest

LEGACY_CHECKSUM = "xxh3-64-whole-block"


def legacy_checksum_rows(rows: torch.Tensor) -> list[int]:
    """`LEGACY_CHECKSUM` (xxh3_64 of the whole block) of each row of a CPU `[n, nbytes]` uint8 tensor."""
    if rows.device.type != "cpu" or rows.dtype != torch.uint8 or rows.dim() != 2:
        raise ValueError(f"legacy_checksum_rows needs a 2-D uint8 CPU tensor, got {rows.dtype} {tuple(rows.shape)} "
                         f"on {rows.device}")
    array = rows.contiguous().numpy()
    return [_digest(row) for row in array]


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


def _roots(leaves: Any, m: int, k: int, n: int) -> list[int]:
    """The roots of `m` blocks of `n` bytes from their `m * k` leaves (little-endian u64, in block order)."""
    view = memoryview(leaves).cast("B")
    kb = 8 * k
    return [_xxh64(view[o:o + kb], n) for o in range(0, m * kb, kb)]


LEAF_SLICE = 256  # sectors (1 MiB) hashed per stretch of holding the interpreter lock


def _leaves(sectors: Any, count: int) -> np.ndarray:
    """XXH3 of each 4 KiB sector that `sectors` yields: one C call each, collected without a Python loop.

    The path without the compiled hasher (`ops/cpu_build.py`). In slices of `LEAF_SLICE`: the C
    loop holds the interpreter lock throughout, and between slices a thread that has asked for it
    gets it. (A `sched_yield` between slices, tried before, made it worse: every short release
    resets the waiting thread's clock, so it never asks, and waited seconds.)
    """
    out = np.empty(count, dtype="<u8")
    it = iter(sectors)
    for start in range(0, count, LEAF_SLICE):
        n = min(LEAF_SLICE, count - start)
        out[start : start + n] = np.fromiter(map(_digest, itertools.islice(it, n)), dtype="<u8", count=n)
    return out


def _native(array: np.ndarray, rows: np.ndarray | None) -> list[int] | None:
    """Checksums of rows `rows` (all when None) of a C-contiguous `[m, n]` uint8 array by the compiled
    hasher, in one call without the interpreter lock; None where it is not built."""
    fn = native_checksums()
    if fn is None:
        return None
    m = array.shape[0] if rows is None else rows.size
    out = np.empty(m, dtype=np.uint64)
    if m and fn(array.ctypes.data, None if rows is None else rows.ctypes.data, m, array.shape[1], out.ctypes.data):
        raise MemoryError(f"no memory for the sector hashes of blocks of {array.shape[1]} bytes")
    return out.tolist()


def _whole_sector_rows(array: np.ndarray) -> list[int]:
    """Checksums of the rows of a C-contiguous `[m, n]` uint8 array, `n` a multiple of 4096 (a KV block's usual size).

    All leaves are hashed in one pass over the sectors in place, then the roots over the leaves:
    fewer Python-level steps per block than `_tree` (which builds slices and packs per block).
    """
    m, n = array.shape
    k = n // SECTOR_BYTES
    return _roots(_leaves(array.reshape(m * k, SECTOR_BYTES), m * k), m, k, n)


def checksum_blocks(rows: torch.Tensor) -> list[int]:
    """`block_checksum` of each row of a CPU `[n, nbytes]` uint8 tensor."""
    rows = rows.contiguous()
    view, n = _pool_view(rows, "checksum_blocks")
    native = _native(rows.numpy(), None)
    if native is not None:
        return native
    if n and n % SECTOR_BYTES == 0:
        return _whole_sector_rows(rows.numpy())
    return [_tree(view[o:o + n]) for o in range(0, rows.shape[0] * n, n)] if n else [_tree(view)] * rows.shape[0]


def checksum_block_slots(storage: torch.Tensor, slots: Sequence[int]) -> list[int]:
    """`block_checksum` of rows `slots` of a CPU `[num_slots, nbytes]` uint8 pool, hashed in place."""
    if not storage.is_contiguous():
        raise ValueError(f"checksum_block_slots needs a contiguous pool, got strides {storage.stride()}")
    view, n = _pool_view(storage, "checksum_block_slots")
    num = storage.shape[0]
    picks = np.asarray(slots, dtype=np.int64).reshape(-1)
    if picks.size and (int(picks.min()) < 0 or int(picks.max()) >= num):
        bad = int(picks.min()) if int(picks.min()) < 0 else int(picks.max())
        raise IndexError(f"slot {bad} outside [0, {num})")
    if not picks.size:
        return []
    native = _native(storage.numpy(), np.ascontiguousarray(picks))
    if native is not None:
        return native
    if n and n % SECTOR_BYTES == 0:
        # Runs of consecutive slots are 2-D views of sectors; all leaves in one pass over them.
        k = n // SECTOR_BYTES
        sectors = storage.numpy().reshape(num * k, SECTOR_BYTES)
        cuts = (np.flatnonzero(np.diff(picks) != 1) + 1).tolist()
        runs = zip([0, *cuts], [*cuts, picks.size])
        views = [sectors[int(picks[a]) * k:(int(picks[b - 1]) + 1) * k] for a, b in runs]
        return _roots(_leaves(itertools.chain.from_iterable(views), picks.size * k), picks.size, k, n)
    return [_tree(view[s * n:(s + 1) * n]) for s in picks.tolist()]


def checksum_rows(rows: torch.Tensor) -> list[int]:
    """The store's block checksum (`TREE_CHECKSUM`) of each row of a CPU `[n, nbytes]` uint8 tensor: `checksum_blocks`."""
    return checksum_blocks(rows)


def checksum_slots(storage: torch.Tensor, slots: Sequence[int]) -> list[int]:
    """The store's block checksum of rows `slots` of a CPU pool, in place: `checksum_block_slots`."""
    return checksum_block_slots(storage, slots)
