"""Conversions between tierkv blocks and transformers' per-layer K/V tensors.

tierkv stores a block as `[num_layers, kv_factor, block_tokens, kv_heads, head_dim]` (one
contiguous cross-layer range, the unit tiers move); a transformers `DynamicLayer` keeps
`[batch, kv_heads, tokens, head_dim]` per layer. Each function here does one copy.
"""

from __future__ import annotations

import torch


def copy_blocks_to_tokens(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Copy the first `out.shape[-2]` tokens of `[n, layers, 2, block_tokens, heads, dim]` blocks into `out`.

    `out` is `[layers, 2, heads, tokens, dim]`, typically a strided view of one row of a batched
    cache; tokens may end inside a block. Copies straight into it, with no staging tensor.
    """
    block_tokens = blocks.shape[3]
    tokens = out.shape[-2]
    full, rest = divmod(tokens, block_tokens)
    if full:
        out[..., : full * block_tokens, :].unflatten(-2, (full, block_tokens)).copy_(blocks[:full].permute(1, 2, 4, 0, 3, 5))
    if rest:
        out[..., full * block_tokens :, :].copy_(blocks[full, :, :, :rest].permute(0, 1, 3, 2, 4))


def tokens_to_blocks(keys: list[torch.Tensor], values: list[torch.Tensor], block_tokens: int) -> torch.Tensor:
    """Per-layer `[heads, n * block_tokens, dim]` keys and values -> `[n, layers, 2, block_tokens, heads, dim]`.

    The result lands on the device of the first layer's keys (layers may live on several GPUs).
    """
    heads, tokens, dim = keys[0].shape
    if tokens % block_tokens:
        raise ValueError(f"{tokens} tokens are not a whole number of {block_tokens}-token blocks")
    n = tokens // block_tokens
    out = torch.empty((n, len(keys), 2, block_tokens, heads, dim), dtype=keys[0].dtype, device=keys[0].device)
    for layer, pair in enumerate(zip(keys, values)):
        for kv, tensor in enumerate(pair):
            src = tensor.reshape(heads, n, block_tokens, dim).permute(1, 2, 0, 3)
            out[:, layer, kv].copy_(src)
    return out
