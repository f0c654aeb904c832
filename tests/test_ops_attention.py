"""Paged attention: the torch reference against a per-query, per-key loop, and the public wrapper's checks."""

from __future__ import annotations

import math

import pytest
import torch

from tierkv import KVLayout, LayoutMismatchError
from tierkv.ops import reference as ref
from tierkv.ops.paged_attention import paged_attention


def setup(dtype: torch.dtype = torch.float32, head_dim: int = 64, hq: int = 4, hkv: int = 2, bt: int = 4,
          lens: tuple[int, ...] = (9, 14), tq: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lay = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=hkv, head_dim=head_dim, dtype=dtype, block_tokens=bt)
    max_blocks = -(-max(lens) // bt)
    slots = len(lens) * max_blocks + 2
    pool = torch.randn((slots, *lay.block_shape), generator=gen).to(dtype)
    table = torch.randperm(slots, generator=gen)[: len(lens) * max_blocks].reshape(len(lens), max_blocks)
    q = torch.randn((len(lens), tq, hq, head_dim), generator=gen).to(dtype)
    return lay, pool, table, q, torch.tensor(lens)


def loop_attention(q, pool, lay, layer, table, lens):
    """One query head and one key at a time, the textbook formula."""
    b, tq, hq, d = q.shape
    group = hq // lay.num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        for t in range(tq):
            pos = n - tq + t
            for h in range(hq):
                kvh = h // group
                scores, values = [], []
                for key in range(pos + 1):
                    block = pool[int(table[i, key // lay.block_tokens]), layer]
                    k = block[0, key % lay.block_tokens, kvh].double()
                    values.append(block[1, key % lay.block_tokens, kvh].double())
                    scores.append(float(q[i, t, h].double() @ k) / math.sqrt(d))
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                out[i, t, h] = sum(w * v for w, v in zip(weights, values)) / total
    return out


@pytest.mark.parametrize(("tq", "lens"), [(1, (9, 14)), (3, (5, 12)), (4, (4, 4))], ids=["decode", "prefill-chunk", "chunk-is-whole"])
def test_reference_matches_loop(tq: int, lens: tuple[int, ...]) -> None:
    lay, pool, table, q, lens_t = setup(tq=tq, lens=lens)
    got = ref.paged_attention(q, pool, lay, 1, table, lens_t)
    want = loop_attention(q, pool, lay, 1, table, lens_t)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)


def test_reference_reads_uint8_pool_rows_like_typed_blocks() -> None:
    lay, pool, table, q, lens = setup(dtype=torch.bfloat16)
    typed = ref.paged_attention(q, pool, lay, 0, table, lens)
    raw = ref.paged_attention(q, pool.view(torch.uint8).reshape(pool.shape[0], -1), lay, 0, table, lens)
    assert torch.equal(typed, raw)


def test_public_wrapper_falls_back_to_reference_on_cpu() -> None:
    lay, pool, table, q, lens = setup(tq=2, lens=(6, 11))
    assert torch.equal(paged_attention(q, pool, lay, 1, table, lens), ref.paged_attention(q, pool, lay, 1, table, lens))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, r"q must be \[batch"),
        (lambda a: {**a, "q": a["q"].half()}, LayoutMismatchError, "q is float16"),
        (lambda a: {**a, "layer": 2}, IndexError, "layer 2 outside"),
        (lambda a: {**a, "block_table": a["block_table"].float()}, ValueError, "integer"),
        (lambda a: {**a, "context_lens": [9]}, ValueError, "one length per sequence"),
        (lambda a: {**a, "context_lens": [9, 99]}, ValueError, r"context_lens must lie in"),
        (lambda a: {**a, "context_lens": [0, 5]}, ValueError, r"context_lens must lie in"),
        (lambda a: {**a, "kv_pool": a["kv_pool"][:, :1]}, LayoutMismatchError, "not blocks of"),
    ],
)
def test_wrapper_rejects_bad_arguments(change, error, message) -> None:
    lay, pool, table, q, lens = setup()
    args = {"q": q, "kv_pool": pool, "layout": lay, "layer": 0, "block_table": table, "context_lens": lens}
    with pytest.raises(error, match=message):
        paged_attention(**change(args))


def test_wrapper_rejects_unsupported_head_dim_and_group() -> None:
    lay, pool, table, q, lens = setup(head_dim=32)
    with pytest.raises(ValueError, match="supported: 64 and 128"):
        paged_attention(q, pool, lay, 0, table, lens)
    lay, pool, table, q, lens = setup(hq=3, hkv=2)
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        paged_attention(q, pool, lay, 0, table, lens)
