"""Torch references of the transfer kernels against a per-element reading of every engine layout."""

from __future__ import annotations

import pytest
import torch

from gpu.cases import BLOCK_RATIOS, element_ref, expected_blocks, make_case
from tierkv.ops import reference as ref
from tierkv.ops.engine_layout import DimOrder

ORDERS = list(DimOrder)


@pytest.mark.parametrize("order", ORDERS, ids=[o.value for o in ORDERS])
@pytest.mark.parametrize("ratio", BLOCK_RATIOS, ids=[f"e{e}-s{s}" for e, s in BLOCK_RATIOS])
def test_gather_matches_elementwise(order: DimOrder, ratio: tuple[int, int]) -> None:
    engine_block, block_tokens = ratio
    case = make_case(order, engine_block, block_tokens, n=3, seed=hash((order.value, ratio)) & 0xFFFF)
    got = ref.gather_engine_blocks(case.engine, case.slots, block_tokens)
    assert torch.equal(got, expected_blocks(case))


@pytest.mark.parametrize("order", ORDERS, ids=[o.value for o in ORDERS])
@pytest.mark.parametrize("ratio", [(8, 8), (2, 16), (16, 2)], ids=["e8-s8", "e2-s16", "e16-s2"])
def test_scatter_writes_exactly_the_addressed_tokens(order: DimOrder, ratio: tuple[int, int]) -> None:
    engine_block, block_tokens = ratio
    case = make_case(order, engine_block, block_tokens, n=5, seed=7)
    before = [t.clone() for t in case.raw]
    blocks = torch.randn((5, *case.store.block_shape))
    ref.scatter_engine_blocks(case.engine, case.slots, blocks)
    lay = case.layout
    written = set()
    for j, toks in enumerate(case.token_slots):
        for t, slot in enumerate(toks):
            blk, off = divmod(slot, lay.block_size)
            written.add((blk, off))
            for layer in range(lay.num_layers):
                for s in range(lay.kv_factor):
                    for h in range(lay.num_kv_heads):
                        assert torch.equal(element_ref(case, layer, s, blk, h, off), blocks[j, layer, s, t, h])
    # everything else is untouched: compare against the saved copy at every unaddressed token
    saved = type(case)(case.layout, case.store, before, case.engine, case.slots, case.token_slots)
    for blk in range(lay.num_blocks):
        for off in range(lay.block_size):
            if (blk, off) in written:
                continue
            for layer in range(lay.num_layers):
                for s in range(lay.kv_factor):
                    for h in range(lay.num_kv_heads):
                        assert torch.equal(element_ref(case, layer, s, blk, h, off), element_ref(saved, layer, s, blk, h, off))


@pytest.mark.parametrize("ratio", [(4, 16), (16, 4)], ids=["e4-s16", "e16-s4"])
def test_mla_latent_kv_factor_1(ratio: tuple[int, int]) -> None:
    case = make_case(DimOrder.BNHC, *ratio, n=3, kv_factor=1, heads=1, seed=3)
    assert torch.equal(ref.gather_engine_blocks(case.engine, case.slots, ratio[1]), expected_blocks(case))


def test_gather_then_scatter_round_trips_into_a_second_engine() -> None:
    src = make_case(DimOrder.BLHNSC, 16, 4, n=5, seed=11)
    blocks = ref.gather_engine_blocks(src.engine, src.slots, 4)
    dst = make_case(DimOrder.HBNC, 4, 4, n=5, seed=12)
    ref.scatter_engine_blocks(dst.engine, dst.slots, blocks)
    assert torch.equal(ref.gather_engine_blocks(dst.engine, dst.slots, 4), blocks)


def test_copy_slots_moves_rows() -> None:
    src = torch.randint(0, 256, (7, 24), dtype=torch.uint8)
    dst = torch.randint(0, 256, (9, 24), dtype=torch.uint8)
    want = dst.clone()
    src_rows, dst_rows = torch.tensor([6, 0, 3]), torch.tensor([2, 8, 5])
    for a, b in zip(src_rows.tolist(), dst_rows.tolist()):
        want[b] = src[a]
    ref.copy_slots(src, src_rows, dst, dst_rows)
    assert torch.equal(dst, want)


def test_token_slots_rejects_wrong_chunk_count() -> None:
    case = make_case(DimOrder.LBNHSC, 4, 16, n=3)
    with pytest.raises(ValueError, match=r"slots must be \[n, 4\]"):
        ref.gather_engine_blocks(case.engine, case.slots[:, :2], 16)


def test_check_slots_names_out_of_range_block_and_duplicates() -> None:
    case = make_case(DimOrder.LBNHSC, 8, 8, n=3)
    bad = case.slots.clone()
    bad[1, 0] = case.layout.num_blocks * 8
    with pytest.raises(IndexError, match=rf"\(block {case.layout.num_blocks}\) is outside"):
        ref.check_slots(case.engine, bad, 8, unique=False)
    dup = torch.cat([case.slots, case.slots[:1]])
    ref.check_slots(case.engine, dup, 8, unique=False)  # reading a token twice is fine
    with pytest.raises(ValueError, match="same engine token twice"):
        ref.check_slots(case.engine, dup, 8, unique=True)
    with pytest.raises(TypeError, match="integer tensor"):
        ref.check_slots(case.engine, case.slots.float(), 8, unique=False)
