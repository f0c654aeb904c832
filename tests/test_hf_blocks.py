"""Block <-> per-layer token conversions of the transformers connector, against plain index arithmetic."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tierkv_connectors.hf.blocks import tokens_to_blocks  # noqa: E402

LAYERS, HEADS, BT, DIM = 3, 2, 4, 5


def blocks(n: int) -> torch.Tensor:
    return torch.randn(n, LAYERS, 2, BT, HEADS, DIM, generator=torch.Generator().manual_seed(n))


def expected_token(b: torch.Tensor, layer: int, kv: int, head: int, token: int) -> torch.Tensor:
    return b[token // BT, layer, kv, token % BT, head]


def test_tokens_to_blocks_lays_each_token_where_the_block_layout_says() -> None:
    want = blocks(3)
    keys = [torch.empty(HEADS, 3 * BT, DIM) for _ in range(LAYERS)]
    values = [torch.empty(HEADS, 3 * BT, DIM) for _ in range(LAYERS)]
    for layer in range(LAYERS):
        for head in range(HEADS):
            for t in range(3 * BT):
                keys[layer][head, t] = expected_token(want, layer, 0, head, t)
                values[layer][head, t] = expected_token(want, layer, 1, head, t)
    assert torch.equal(tokens_to_blocks(keys, values, BT), want)


def test_tokens_to_blocks_refuses_a_partial_block() -> None:
    keys = [torch.zeros(HEADS, BT + 1, DIM)] * LAYERS
    with pytest.raises(ValueError, match="not a whole number of 4-token blocks"):
        tokens_to_blocks(keys, keys, BT)
