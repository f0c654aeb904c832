"""Launchers of the copy kernels in `csrc/transfer.cu`: argument packing, access width, grid size.

Callers pass device-resident int64 index tensors and a stream; nothing here synchronises.
"""

from __future__ import annotations

import torch

from .cuda_build import i32, i64, module, ptr
from .engine_layout import EngineKV

SOURCE = "transfer.cu"
THREADS = 256
WIDTHS = (16, 8, 4, 2, 1)
SEGMENT_BYTES = 64 << 10  # a row longer than this is split so one big block uses several SMs


def access_width(*values: int) -> int:
    """Widest vector access (bytes) that divides every address, stride and length given."""
    for w in WIDTHS:
        if all(v % w == 0 for v in values):
            return w
    return 1


def grid_size(pieces: int, num_sms: int, max_ctas: int | None) -> int:
    """Enough thread blocks to fill the GPU (8 per SM), never more than pieces, at most max_ctas."""
    limit = num_sms * 8 if max_ctas is None else max_ctas
    return max(1, min(pieces, limit))


def copy_rows(src: torch.Tensor, src_rows: torch.Tensor, dst: torch.Tensor, dst_rows: torch.Tensor, row_bytes: int,
              stream: torch.cuda.Stream, max_ctas: int | None = None) -> None:
    """`dst` row `dst_rows[j]` = `src` row `src_rows[j]`; either side may be pinned host memory (UVA)."""
    n = src_rows.numel()
    if n == 0:
        return
    device = stream.device
    mod = module(SOURCE, device)
    w = access_width(src.data_ptr(), dst.data_ptr(), row_bytes)
    seg_units = max(1, SEGMENT_BYTES // w)
    segs = -(-(row_bytes // w) // seg_units)
    mod.launch(
        f"tierkv_copy_rows_w{w}",
        grid_size(n * segs, mod.num_sms, max_ctas),
        THREADS,
        [ptr(src), ptr(src_rows), ptr(dst), ptr(dst_rows), i64(row_bytes), i32(n), i32(seg_units)],
        stream,
    )


def engine_copy(to_store: bool, engine: EngineKV, slots: torch.Tensor, chunk_tokens: int, block_tokens: int,
                store: torch.Tensor | int, store_rows: torch.Tensor, store_row_bytes: int,
                stream: torch.cuda.Stream, max_ctas: int | None = None, layer: int | None = None) -> None:
    """Gather (to_store) engine pages into store rows, or scatter store rows into engine pages.

    `slots` is the device copy of the `[n, chunks]` engine slots; `store` is the base of the store
    row pool (a tensor or a raw address, device or pinned host) and `store_rows` its rows. With
    `layer`, only that layer moves and each store row holds that layer alone (`[kv_factor,
    block_tokens, heads, head_dim]`, the slice of a block a layer-wise load stages).
    """
    n = store_rows.numel()
    if n == 0:
        return
    mod = module(SOURCE, stream.device)
    plan, lay = engine.plan, engine.layout
    base = store.data_ptr() if isinstance(store, torch.Tensor) else int(store)
    kvf = lay.kv_factor
    ptrs, table = plan.layer_ptrs, engine.device_ptrs()
    if layer is not None:
        ptrs, table = ptrs[layer * kvf : (layer + 1) * kvf], table[layer * kvf : (layer + 1) * kvf]
    w = access_width(plan.row_bytes, plan.block_stride, plan.head_stride, plan.token_stride,
                     base, store_row_bytes, *ptrs)
    layers_kv = len(ptrs)
    mod.launch(
        f"tierkv_{'gather' if to_store else 'scatter'}_w{w}",
        grid_size(n * layers_kv, mod.num_sms, max_ctas),
        THREADS,
        [ptr(table), i64(plan.block_stride), i64(plan.head_stride), i64(plan.token_stride),
         ptr(slots), i32(lay.block_size), i32(chunk_tokens), ptr(base), ptr(store_rows), i64(store_row_bytes),
         i32(n), i32(layers_kv), i32(block_tokens), i32(lay.num_kv_heads), i32(plan.row_bytes)],
        stream,
    )
