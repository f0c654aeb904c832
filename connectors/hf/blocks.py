"""Per-layer transformers K/V -> tierkv blocks, for caches that store from their layers.

tierkv stores a block as `[num_layers, kv_factor, block_tokens, kv_heads, head_dim]` (one
contiguous cross-layer range, the unit tiers move); a transformers `DynamicLayer` keeps
`[batch, kv_heads, tokens, head_dim]` per layer. Loads, and the prompt stores of caches that loaded a
prefix into one buffer, go through the store's engine door instead (`prompt_kv.py`).
"""

from __future__ import annotations

import torch


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
