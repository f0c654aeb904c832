"""Engine pages <-> store rows in CPU memory: one strided copy per chunk, all layers at once, no temporary.

The references (`reference.py`) move a block token by token and layer by layer through a
temporary: the definition, but on a CPU it runs at a fifth of memory speed. A vLLM CPU step that
loads seven 3 MiB blocks spent ~10 ms there for ~1 ms of memory traffic, and every save as much
again on the save thread, beside the engine's own compute on the same cores. Where the engine's
layers lie on one grid (`EngineKV.grid_view`, true of vLLM's caches), the tokens a chunk of a
store block takes from one engine block are one strided `[layers, kv_factor, heads, g, head_dim]`
view of the engine and one of the store row, so each chunk is one `copy_`, straight between the
two, with the head_dim run contiguous on both sides.

Used for chunks of at least `MIN_CHUNK_BYTES` (all layers together): below that the Python loop
over chunks costs more than the references' indexing saves.
"""

from __future__ import annotations

import torch

from ..layout import KVLayout
from .engine_layout import EngineKV

MIN_CHUNK_BYTES = 32 << 10
# CPU loads and saves hash and copy this much at a time: the second pass over a piece reads what
# the first has just brought into the cache, instead of making a second trip to memory.
CACHED_PIECE_BYTES = 4 << 20


def copy_chunks(to_store: bool, engine: EngineKV, slots: torch.Tensor, pool: torch.Tensor, rows: torch.Tensor,
                layout: KVLayout) -> bool:
    """Copy store rows `rows[i]` of `pool` from (`to_store`) or into the engine tokens `slots[i]` names.

    `slots` is `[n, chunks]` from `chunk_slots` and `rows` `[n]`, both int64 on the CPU and checked
    by the caller; `pool` is `[num_rows, block_bytes]` uint8. Returns False, having copied
    nothing, where this path does not apply (memory off the CPU, layers not on one grid, small
    chunks, an unaligned pool): the caller then takes the references.
    """
    if engine.device.type != "cpu" or pool.device.type != "cpu":
        return False
    eng = engine.layout
    g = eng.chunk_tokens(layout.block_tokens)
    es = eng.element_size
    if layout.num_layers * layout.kv_factor * g * layout.num_kv_heads * layout.head_dim * es < MIN_CHUNK_BYTES:
        return False
    if pool.data_ptr() % es:
        return False
    grid = engine.grid_view()
    if grid is None:
        return False
    store = pool.view(layout.dtype).view(pool.shape[0], *layout.block_shape)  # [rows, L, kvf, bt, H, C]
    n = eng.block_size
    for row, chunks in zip(rows.tolist(), slots.tolist()):
        block = store[row]
        for j, slot in enumerate(chunks):
            b, off = divmod(slot, n)
            pages = grid[:, :, b, :, off : off + g]  # [L, kvf, H, g, C]
            stored = block[:, :, j * g : (j + 1) * g].transpose(2, 3)  # the same, in the store row
            if to_store:
                stored.copy_(pages)
            else:
                pages.copy_(stored)
    return True
