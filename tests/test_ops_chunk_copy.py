"""The CPU chunk copy (`tierkv.ops.chunk_copy`): the same bytes as the references, where it applies, and nothing where not."""

from __future__ import annotations

import pytest
import torch

from gpu.cases import expected_blocks, make_case
from tierkv import KVLayout
from tierkv.ops import chunk_copy, transfer
from tierkv.ops import reference as ref
from tierkv.ops.engine_layout import DimOrder, EngineKV, EngineKVLayout, chunk_slots

SHARED = [DimOrder.LBNHSC, DimOrder.LBHNSC, DimOrder.BLNHSC, DimOrder.BLHNSC]


@pytest.fixture
def every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the chunk path for the small shapes of these tests too."""
    monkeypatch.setattr(chunk_copy, "MIN_CHUNK_BYTES", 0)


@pytest.mark.usefixtures("every_chunk")
@pytest.mark.parametrize("order", SHARED, ids=lambda o: o.value)
@pytest.mark.parametrize(("engine_block", "block_tokens"), [(16, 16), (16, 4), (4, 16), (8, 32)])
def test_chunk_copy_moves_the_references_bytes(order: DimOrder, engine_block: int, block_tokens: int) -> None:
    case = make_case(order, engine_block, block_tokens, n=3, num_layers=3, heads=2, head_dim=8,
                     seed=engine_block + block_tokens)
    rows = [4, 0, 2]
    pool = torch.zeros((6, case.store.block_bytes), dtype=torch.uint8)
    assert chunk_copy.copy_chunks(True, case.engine, case.slots, pool, torch.tensor(rows), case.store)
    got = pool[rows].view(case.store.dtype).reshape(3, *case.store.block_shape)
    assert torch.equal(got, expected_blocks(case))
    assert not pool[[1, 3, 5]].any(), "a row nobody named was written"
    # Back into a zeroed engine: exactly the pages the reference scatter writes, nothing else.
    want = make_case(order, engine_block, block_tokens, n=3, num_layers=3, heads=2, head_dim=8,
                     seed=engine_block + block_tokens)
    for t in (*case.engine.tensors, *want.engine.tensors):
        t.zero_()
    ref.scatter_engine_blocks(want.engine, want.slots, got)
    assert chunk_copy.copy_chunks(False, case.engine, case.slots, pool, torch.tensor(rows), case.store)
    for a, b in zip(case.engine.tensors, want.engine.tensors):
        assert torch.equal(a, b)


def vllm_cpu_engine(layers: int = 3, blocks: int = 9, heads: int = 2, block_size: int = 16, head_dim: int = 8) -> EngineKV:
    """vLLM's CPU cache: one buffer, layer l's `[blocks, heads, 2 * block_size, head_dim]` view at l * layer_size."""
    lay = EngineKVLayout(DimOrder.BHSNC, num_layers=layers, num_blocks=blocks, block_size=block_size,
                         num_kv_heads=heads, head_dim=head_dim, dtype=torch.float32)
    per = blocks * heads * 2 * block_size * head_dim
    buf = torch.randn(layers * per)
    return EngineKV(lay, [buf[i * per:(i + 1) * per].view(blocks, heads, 2 * block_size, head_dim) for i in range(layers)])


@pytest.mark.usefixtures("every_chunk")
def test_per_layer_views_of_one_buffer_form_a_grid_and_copy_like_the_references() -> None:
    engine = vllm_cpu_engine()
    store = KVLayout(num_layers=3, kv_factor=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, block_tokens=16)
    assert engine.grid_view() is not None
    slots = chunk_slots(engine.layout, 16, [5, 1, 7], range(3))
    pool = torch.zeros((4, store.block_bytes), dtype=torch.uint8)
    assert chunk_copy.copy_chunks(True, engine, slots, pool, torch.tensor([3, 0, 1]), store)
    want = ref.gather_engine_blocks(engine, slots, 16)
    assert torch.equal(pool[[3, 0, 1]].view(torch.float32).reshape(3, *store.block_shape), want)


@pytest.mark.usefixtures("every_chunk")
def test_one_latent_per_token_in_views_of_one_buffer() -> None:
    """kv_factor 1 (MLA): per-layer `[blocks, block_size, heads, head_dim]` views carved from one allocation."""
    lay = EngineKVLayout(DimOrder.BNHC, num_layers=2, num_blocks=6, block_size=8, num_kv_heads=1, head_dim=16,
                         dtype=torch.float32, kv_factor=1)
    per = 6 * 8 * 16
    buf = torch.randn(2 * per)
    engine = EngineKV(lay, [buf[i * per:(i + 1) * per].view(6, 8, 1, 16) for i in range(2)])
    store = KVLayout(num_layers=2, kv_factor=1, num_kv_heads=1, head_dim=16, dtype=torch.float32, block_tokens=16)
    slots = chunk_slots(lay, 16, [4, 1, 5, 0], range(2))
    pool = torch.zeros((3, store.block_bytes), dtype=torch.uint8)
    assert chunk_copy.copy_chunks(True, engine, slots, pool, torch.tensor([2, 0]), store)
    assert torch.equal(pool[[2, 0]].view(torch.float32).reshape(2, *store.block_shape),
                       ref.gather_engine_blocks(engine, slots, 16))


def test_separate_tensors_and_small_chunks_are_left_to_the_references() -> None:
    case = make_case(DimOrder.BNHC, 16, 16, n=2, num_layers=2)  # K and V of each layer in tensors of their own
    pool = torch.zeros((2, case.store.block_bytes), dtype=torch.uint8)
    assert case.engine.grid_view() is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunk_copy, "MIN_CHUNK_BYTES", 0)
        assert not chunk_copy.copy_chunks(True, case.engine, case.slots, pool, torch.tensor([0, 1]), case.store)
    shared = make_case(DimOrder.LBNHSC, 16, 16, n=2)  # 2 layers x K,V x 16 tokens x 2 heads x 4 floats = 1 KiB a chunk
    assert shared.engine.grid_view() is not None
    assert not chunk_copy.copy_chunks(True, shared.engine, shared.slots, pool, torch.tensor([0, 1]), shared.store)
    assert not pool.any()


def test_the_transfer_api_takes_the_chunk_path_for_large_cpu_chunks() -> None:
    engine = vllm_cpu_engine(layers=4, heads=4, block_size=128, head_dim=64)  # 1 MiB a block
    store = KVLayout(num_layers=4, kv_factor=2, num_kv_heads=4, head_dim=64, dtype=torch.float32, block_tokens=128)
    slots = chunk_slots(engine.layout, 128, [5, 1, 7], range(3))
    pool = torch.zeros((3, store.block_bytes), dtype=torch.uint8)
    calls = []
    real = chunk_copy.copy_chunks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transfer, "copy_chunks", lambda *a: calls.append(1) or real(*a))
        transfer.gather_engine_blocks(engine, slots, pool, store, rows=[2, 0, 1])
    assert calls and torch.equal(pool[[2, 0, 1]].view(torch.float32).reshape(3, *store.block_shape),
                                 ref.gather_engine_blocks(engine, slots, 128))
    for t in engine.tensors:
        t.zero_()
    transfer.scatter_engine_blocks(engine, slots, pool, store, rows=[2, 0, 1])
    assert torch.equal(ref.gather_engine_blocks(engine, slots, 128),
                       pool[[2, 0, 1]].view(torch.float32).reshape(3, *store.block_shape))
