"""Torch references of every kernel: the definition the CUDA and Triton versions are tested against.

They run anywhere torch runs, and they are also the path tierkv takes where CUDA is absent, so
they favour plain indexing over cleverness. Store blocks are the contiguous cross-layer format of
`tierkv.layout`: `[n, num_layers, kv_factor, block_tokens, num_kv_heads, head_dim]`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import LayoutMismatchError
from ..layout import KVLayout
from .engine_layout import EngineKV


def token_slots(engine: EngineKV, slots: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """Expand per-chunk engine slots `[n, chunks]` to per-token slots `[n, block_tokens]`."""
    g = engine.layout.chunk_tokens(block_tokens)
    if slots.dim() != 2 or slots.shape[1] * g != block_tokens:
        raise LayoutMismatchError(
            f"slots must be [n, {block_tokens // g}] (one engine slot per {g}-token chunk of a "
            f"{block_tokens}-token store block), got {tuple(slots.shape)}; build them with chunk_slots()"
        )
    slots = slots.to(torch.int64)
    per_token = slots[:, :, None] + torch.arange(g, dtype=torch.int64)
    return per_token.reshape(slots.shape[0], block_tokens)


def check_slots(engine: EngineKV, slots: torch.Tensor, block_tokens: int, unique: bool) -> None:
    """Bounds (and, for writes, uniqueness) of engine slots, checked on the host before any copy.

    On the chunk starts in numpy, not on every token in torch: it runs before each GPU copy is
    queued, while the link waits. A chunk covers `g` consecutive tokens from its start, so the
    bounds are those of the starts (plus `g - 1`), and two chunks share a token exactly when two
    sorted starts are less than `g` apart.
    """
    lay = engine.layout
    if slots.is_floating_point() or slots.is_complex() or slots.dtype == torch.bool:
        raise TypeError(f"slots must be an integer tensor, got {slots.dtype}")
    g = engine.layout.chunk_tokens(block_tokens)
    if slots.dim() != 2 or slots.shape[1] * g != block_tokens:
        raise LayoutMismatchError(
            f"slots must be [n, {block_tokens // g}] (one engine slot per {g}-token chunk of a "
            f"{block_tokens}-token store block), got {tuple(slots.shape)}; build them with chunk_slots()"
        )
    starts = slots.detach().to(device="cpu", dtype=torch.int64).numpy().reshape(-1)
    if starts.size == 0:
        return
    lo, hi = int(starts.min()), int(starts.max()) + g - 1
    limit = lay.num_blocks * lay.block_size
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        raise IndexError(
            f"engine slot {bad} (block {bad // lay.block_size}) is outside the engine's "
            f"{lay.num_blocks} blocks of {lay.block_size} tokens"
        )
    if unique and starts.size > 1 and bool((np.diff(np.sort(starts)) < g).any()):
        raise ValueError("slots name the same engine token twice: a scatter would write it twice")


def gather_engine_blocks(engine: EngineKV, slots: torch.Tensor, block_tokens: int) -> torch.Tensor:
    """New store blocks `[n, L, kvf, block_tokens, H, C]` read from the engine's pages."""
    lay = engine.layout
    tok = token_slots(engine, slots.cpu(), block_tokens).to(engine.device)
    blk, off = tok // lay.block_size, tok % lay.block_size
    n = slots.shape[0]
    out = torch.empty((n, lay.num_layers, lay.kv_factor, block_tokens, lay.num_kv_heads, lay.head_dim),
                      dtype=lay.dtype, device=engine.device)
    for layer in range(lay.num_layers):
        for s in range(lay.kv_factor):
            view = engine.layer_view(layer, s)  # [blocks, H, N, C]
            out[:, layer, s] = view[blk, :, off, :]  # -> [n, block_tokens, H, C]
    return out


def scatter_engine_blocks(engine: EngineKV, slots: torch.Tensor, blocks: torch.Tensor) -> None:
    """Write store blocks `[n, L, kvf, block_tokens, H, C]` into the engine's pages."""
    lay = engine.layout
    block_tokens = blocks.shape[3]
    tok = token_slots(engine, slots.cpu(), block_tokens).to(engine.device)
    blk, off = tok // lay.block_size, tok % lay.block_size
    blocks = blocks.to(engine.device)
    for layer in range(lay.num_layers):
        for s in range(lay.kv_factor):
            view = engine.layer_view(layer, s)
            view[blk, :, off, :] = blocks[:, layer, s]


def _widest_rows(pool: torch.Tensor) -> torch.Tensor:
    """The pool viewed as the widest integer type that divides a row: torch's CPU index ops on
    uint8 rows run at a fraction of memory speed, on int64 rows at nearly all of it."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if pool.shape[1] % size == 0 and pool.data_ptr() % size == 0:
            return pool.view(dtype)
    return pool


def _run_start(rows: torch.Tensor) -> int | None:
    """First row if `rows` is a run of consecutive ascending rows (a slice then beats a gather)."""
    if rows.numel() == 0:
        return None
    first = int(rows[0])
    expected = torch.arange(first, first + rows.numel(), device=rows.device, dtype=rows.dtype)
    return first if torch.equal(rows, expected) else None


def copy_slots(src: torch.Tensor, src_rows: torch.Tensor, dst: torch.Tensor, dst_rows: torch.Tensor) -> None:
    """`dst[dst_rows] = src[src_rows]` for two row pools of equal row width."""
    s, d = _widest_rows(src), _widest_rows(dst)
    if s.dtype != d.dtype:
        s, d = src, dst
    n = src_rows.numel()
    first = _run_start(src_rows)
    rows = s[first : first + n] if first is not None else s.index_select(0, src_rows.to(src.device))
    first = _run_start(dst_rows)
    if first is not None:
        d[first : first + n].copy_(rows)
    else:
        d.index_copy_(0, dst_rows.to(dst.device), rows.to(dst.device))


def paged_attention(q: torch.Tensor, kv_pool: torch.Tensor, layout: KVLayout, layer: int,
                    block_table: torch.Tensor, context_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal GQA attention of `q` `[B, Tq, Hq, D]` over KV in store pages, accumulated in fp32.

    Sequence b's KV is the first `context_lens[b]` tokens of the store blocks `block_table[b]`
    (slots of `kv_pool`, `[num_slots, block_bytes]` uint8 or `[num_slots, *block_shape]`); its
    queries are its last Tq tokens, so query i sits at position `context_lens[b] - Tq + i` and
    sees keys up to there. Tq = 1 is decode; Tq > 1 is one chunk of a chunked prefill.
    """
    b, tq, hq, d = q.shape
    bt, hkv = layout.block_tokens, layout.num_kv_heads
    pool = kv_pool.view(torch.uint8).reshape(kv_pool.shape[0], -1).view(layout.dtype)
    pool = pool.reshape(kv_pool.shape[0], *layout.block_shape)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    for i in range(b):
        n_ctx = int(context_lens[i])
        nb = -(-n_ctx // bt)
        slots = block_table[i, :nb].to(torch.int64).to(pool.device)
        kv = pool.index_select(0, slots)[:, layer]  # [nb, 2, bt, hkv, d]
        k = kv[:, 0].reshape(nb * bt, hkv, d)[:n_ctx].float()
        v = kv[:, 1].reshape(nb * bt, hkv, d)[:n_ctx].float()
        group = hq // hkv
        k = k.repeat_interleave(group, dim=1)  # [ctx, hq, d]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[i].float(), k) * scale
        qpos = torch.arange(n_ctx - tq, n_ctx, device=q.device)[:, None]
        kpos = torch.arange(n_ctx, device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        out[i] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
