"""Paged attention over KV that lives in store pages (decode and one chunk of a chunked prefill).

Written in Triton rather than CUDA C++ because the kernel is a tiled matrix product with an
online softmax: Triton emits Hopper tensor-core code, software pipelining and the layout
conversions for every (dtype, head_dim, group) combination from one 60-line kernel, where a CUDA
C++ version would need hand-written MMA fragments per dtype to match it. The copy kernels stay
in CUDA C++ (`csrc/`): they are pure address arithmetic, where Triton gains nothing.

Work split: one program per (sequence, KV head, tile of query rows, KV split). A tile's rows are
(query token, query head of the group) pairs, so GQA heads that share a KV head read it once.
Long contexts with few programs are split along the keys (flash-decoding) and a second small
kernel merges the partial softmaxes.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from ..errors import LayoutMismatchError
from ..layout import KVLayout, dtype_name
from . import reference as ref

log = logging.getLogger("tierkv.ops")

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None

BLOCK_N = 64
_notice: list[str] = []


def triton_available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _attn_kernel(Q, KV, BT, CTX, O, M, L, slot_stride, layer, bt_stride, scale, B, Tq, split_tokens,
                     GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr):
        # q, out: contiguous [B, Tq, Hq, D]; partials: contiguous [splits, B, Tq, Hq(, D)].
        # A store block is [layers, 2, BLOCK_TOKENS, NUM_KV_HEADS, HEAD_DIM]: every stride but the
        # slot's follows from the constexprs, which keeps the launch short.
        HQ = NUM_KV_HEADS * GROUP
        TOK = NUM_KV_HEADS * HEAD_DIM
        KV_SPAN = BLOCK_TOKENS * TOK
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        split = tl.program_id(2)
        b = pid_bh // NUM_KV_HEADS
        kvh = pid_bh % NUM_KV_HEADS
        n_ctx = tl.load(CTX + b)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        qi = rows // GROUP
        qh = kvh * GROUP + rows % GROUP
        row_ok = qi < Tq
        d = tl.arange(0, HEAD_DIM)
        q_row = (b * Tq + qi) * HQ + qh
        q = tl.load(Q + q_row[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None], other=0.0)
        qpos = n_ctx - Tq + qi
        last_q = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, Tq * GROUP - 1) // GROUP
        start = split * split_tokens
        end = tl.minimum(start + split_tokens, n_ctx - Tq + last_q + 1)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        kv = KV + layer * (2 * KV_SPAN) + kvh * HEAD_DIM
        for n0 in range(start, end, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            t_ok = t < end
            slot = tl.load(BT + b * bt_stride + t // BLOCK_TOKENS, mask=t_ok, other=0).to(tl.int64)
            off = slot * slot_stride + (t % BLOCK_TOKENS) * TOK
            k = tl.load(kv + off[:, None] + d[None, :], mask=t_ok[:, None], other=0.0)
            v = tl.load(kv + KV_SPAN + off[:, None] + d[None, :], mask=t_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(t_ok[None, :] & (t[None, :] <= qpos[:, None]), s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if DIRECT:
            tl.store(O + q_row[:, None] * HEAD_DIM + d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
                     mask=row_ok[:, None])
        else:
            p_row = ((split * B + b) * Tq + qi) * HQ + qh
            tl.store(O + p_row[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
            tl.store(M + p_row, m_i, mask=row_ok)
            tl.store(L + p_row, l_i, mask=row_ok)

    @triton.jit
    def _combine_kernel(O, M, L, Out, num_splits, rows_per_split, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        row = tl.program_id(0)  # one (b, qi, qh) row of the output
        sp = tl.arange(0, SPLITS)
        ok = sp < num_splits
        d = tl.arange(0, HEAD_DIM)
        p_row = sp.to(tl.int64) * rows_per_split + row
        m = tl.load(M + p_row, mask=ok, other=float("-inf"))
        lsum = tl.load(L + p_row, mask=ok, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
        o = tl.load(O + p_row[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(lsum * w, 0)
        tl.store(Out + row.to(tl.int64) * HEAD_DIM + d, out.to(Out.dtype.element_ty))


def _check(q: torch.Tensor, kv_pool: torch.Tensor, layout: KVLayout, layer: int, block_table: torch.Tensor,
           context_lens: torch.Tensor | list[int]) -> torch.Tensor:
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, q_tokens, q_heads, head_dim], got shape {tuple(q.shape)}")
    b, tq, hq, d = q.shape
    if q.dtype != layout.dtype:
        raise LayoutMismatchError(f"q is {dtype_name(q.dtype)}, the store layout is {dtype_name(layout.dtype)}")
    if layout.kv_factor != 2:
        raise LayoutMismatchError("paged attention needs separate K and V (kv_factor 2)")
    if d != layout.head_dim or d not in (64, 128):
        raise ValueError(f"head_dim is {d}; the layout says {layout.head_dim}; supported: 64 and 128")
    if hq % layout.num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {layout.num_kv_heads} KV heads")
    if not 0 <= layer < layout.num_layers:
        raise IndexError(f"layer {layer} outside [0, {layout.num_layers})")
    if kv_pool.shape[0] == 0 or kv_pool[:1].numel() * kv_pool.element_size() != layout.block_bytes:
        raise LayoutMismatchError(f"kv_pool rows are not blocks of {layout.block_bytes} bytes: shape {tuple(kv_pool.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.is_floating_point():
        raise ValueError(
            f"block_table must be an integer [batch={b}, max_blocks] tensor, got {block_table.dtype} {tuple(block_table.shape)}"
        )
    if block_table.device != q.device or kv_pool.device != q.device:
        raise ValueError(f"q, kv_pool and block_table must share a device: {q.device}, {kv_pool.device}, {block_table.device}")
    lens = torch.as_tensor(context_lens)
    if lens.shape != (b,):
        raise ValueError(f"context_lens must hold one length per sequence ({b}), got shape {tuple(lens.shape)}")
    if lens.device.type == "cpu":  # values on the host are checked; on the device they are trusted (no sync)
        cap = block_table.shape[1] * layout.block_tokens
        if int(lens.min()) < tq or int(lens.max()) > cap:
            raise ValueError(f"context_lens must lie in [q_tokens={tq}, max_blocks * block_tokens={cap}], got {lens.tolist()}")
    return lens


def paged_attention(q: torch.Tensor, kv_pool: torch.Tensor, layout: KVLayout, layer: int, block_table: torch.Tensor,
                    context_lens: torch.Tensor | list[int], scale: float | None = None,
                    num_splits: int | None = None) -> torch.Tensor:
    """Causal GQA attention of `q` `[B, Tq, Hq, D]` over store pages; see `reference.paged_attention`.

    kv_pool: the device tier's `[num_slots, block_bytes]` storage (or `[num_slots, *block_shape]`);
    block_table: `[B, max_blocks]` slots of each sequence's blocks in order; context_lens: tokens
    per sequence including its Tq queries. Runs on the current stream.
    """
    lens = _check(q, kv_pool, layout, layer, block_table, context_lens)
    if not (triton_available() and q.is_cuda):
        if q.is_cuda and not _notice:
            _notice.append("x")
            log.warning("tierkv: Triton is not available; paged attention uses the torch reference")
        return ref.paged_attention(q, kv_pool, layout, layer, block_table, lens, scale)
    return _triton_attention(q, kv_pool, layout, layer, block_table, lens, scale, num_splits)


def _triton_attention(q: torch.Tensor, kv_pool: torch.Tensor, layout: KVLayout, layer: int, block_table: torch.Tensor,
                      lens: torch.Tensor, scale: float | None, num_splits: int | None) -> torch.Tensor:
    b, tq, hq, d = q.shape
    q = q.contiguous()
    lens = lens.to(device=q.device, dtype=torch.int32, non_blocking=True)
    bt, hkv = layout.block_tokens, layout.num_kv_heads
    group = hq // hkv
    pool = kv_pool.view(torch.uint8).reshape(kv_pool.shape[0], -1).view(layout.dtype)
    block_m = max(16, triton.next_power_of_2(min(tq * group, 64)))
    m_tiles = triton.cdiv(tq * group, block_m)
    max_ctx = block_table.shape[1] * bt
    if num_splits is None:
        programs = b * hkv * m_tiles
        # Enough programs for two waves of SMs, down to one BLOCK_N of keys per split: at batch 1
        # and 1k context, 16 splits ran in 5.9 us on an H100 where 4 took 9.4 us (docs/performance.md).
        num_splits = max(1, min(triton.cdiv(2 * _sm_count(q.device), programs), triton.cdiv(max_ctx, BLOCK_N), 64))
    split_tokens = triton.cdiv(triton.cdiv(max_ctx, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(max_ctx, split_tokens)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    direct = num_splits == 1
    if direct:
        o = m = lsum = out
    else:
        o = torch.empty((num_splits, b, tq, hq, d), dtype=torch.float32, device=q.device)
        m = torch.empty((num_splits, b, tq, hq), dtype=torch.float32, device=q.device)
        lsum = torch.empty_like(m)
    _attn_kernel[(b * hkv, m_tiles, num_splits)](
        q, pool, block_table, lens, o, m, lsum, layout.block_bytes // layout.element_size, layer,
        block_table.stride(0), scale, b, tq, split_tokens,
        GROUP=group, NUM_KV_HEADS=hkv, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_TOKENS=bt, HEAD_DIM=d,
        DIRECT=direct, IEEE=q.dtype == torch.float32, num_warps=4,
    )
    if not direct:
        _combine_kernel[(b * tq * hq,)](o, m, lsum, out, num_splits, b * tq * hq, HEAD_DIM=d,
                                        SPLITS=triton.next_power_of_2(num_splits), num_warps=4)
    return out


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
