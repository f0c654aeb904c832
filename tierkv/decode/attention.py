"""Attention of one decode query per sequence over its selected pages: the Triton kernel on GPU, the torch reference elsewhere."""

from __future__ import annotations

import torch

from ..layout import KVLayout
from ..ops import reference as ref
from ..ops.paged_attention import paged_attention, triton_available


def attend_pages(q: torch.Tensor, pool: torch.Tensor, layout: KVLayout, block_table: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """`[n, q_heads, head_dim]` attention of `q` `[n, q_heads, head_dim]` over `pool` pages of a one-layer `layout`.

    `block_table[i]` lists sequence i's selected device slots in position order, the tail last;
    `context_lens[i]` the tokens they hold. The kernel needs head_dim 64 or 128; other head
    sizes (small test models) take the reference, which is what the kernel is tested against.
    """
    q4 = q.unsqueeze(1).to(layout.dtype)
    if q.is_cuda and triton_available() and layout.head_dim in (64, 128):
        out = paged_attention(q4, pool, layout, 0, block_table.to(torch.int32), context_lens, scale)
    else:
        out = ref.paged_attention(q4, pool, layout, 0, block_table, context_lens, scale)
    return out[:, 0]
