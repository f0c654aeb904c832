"""Block checksums: what makes every read from host or disk verifiable.

xxh3_64 runs at memory speed on one core, so checking each block read from a slower tier
costs little next to the copy itself, and a flipped bit is never served.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        raise ValueError(f"checksum_slots needs a 2-D uint8 CPU pool, got {storage.dtype} {tuple(storage.shape)} on {storage.device}")
    array = storage.numpy()
    return [_digest(array[s]) for s in slots]
