"""Block <-> per-layer token conversions of the transformers connector, against plain index arithmetic."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tierkv_connectors.hf.blocks import copy_blocks_to_tokens, tokens_to_blocks  # noqa: E402

LAYERS, HEADS, BT, DIM = 3, 2, 4, 5


def blocks(n: int) -> torch.Tensor:
    return torch.randn(n, LAYERS, 2, BT, HEADS, DIM, generator=torch.Generator().manual_seed(n))


def expected_token(b: torch.Tensor, layer: int, kv: int, head: int, token: int) -> torch.Tensor:
    return b[token // BT, layer, kv, token % BT, head]


@pytest.mark.parametrize("tokens", [1, BT - 1, BT, 2 * BT + 3, 3 * BT])
def test_copy_blocks_to_tokens_into_a_strided_batch_row(tokens: int) -> None:
    b = blocks(3)
    batch = torch.full((LAYERS, 2, 2, HEADS, 20, DIM), float("nan"))
    out = batch[:, :, 1, :, 20 - tokens :]  # row 1 of a left-padded batch, a strided view
    copy_blocks_to_tokens(b, out)
    for layer in range(LAYERS):
        for kv in range(2):
            for head in range(HEADS):
                for t in range(tokens):
                    assert torch.equal(out[layer, kv, head, t], expected_token(b, layer, kv, head, t))
    assert batch[:, :, 0].isnan().all() and batch[:, :, 1, :, : 20 - tokens].isnan().all()  # nothing else written


def test_tokens_to_blocks_inverts_copy_blocks_to_tokens() -> None:
    b = blocks(3)
    flat = torch.empty(LAYERS, 2, HEADS, 3 * BT, DIM)
    copy_blocks_to_tokens(b, flat)
    keys = [flat[layer, 0] for layer in range(LAYERS)]
    values = [flat[layer, 1] for layer in range(LAYERS)]
    assert torch.equal(tokens_to_blocks(keys, values, BT), b)


def test_tokens_to_blocks_refuses_a_partial_block() -> None:
    keys = [torch.zeros(HEADS, BT + 1, DIM)] * LAYERS
    with pytest.raises(ValueError, match="not a whole number of 4-token blocks"):
        tokens_to_blocks(keys, keys, BT)
