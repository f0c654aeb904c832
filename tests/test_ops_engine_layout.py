"""Engine layout descriptors: the vLLM and transformers arrangements, and clear errors for wrong ones."""

from __future__ import annotations

import pytest
import torch

from gpu.cases import make_case
from tierkv import KVLayout, LayoutMismatchError
from tierkv.ops import reference as ref
from tierkv.ops.engine_layout import DimOrder, EngineKV, EngineKVLayout, chunk_slots


def layout(order: DimOrder = DimOrder.LBNHSC, **kw: object) -> EngineKVLayout:
    args = dict(num_layers=3, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    args.update(kw)
    return EngineKVLayout(order, **args)  # type: ignore[arg-type]


def vllm_layer_views(base: torch.Tensor, order: DimOrder) -> list[torch.Tensor]:
    """What vLLM hands a connector: per-layer `[num_blocks, heads, block_size, head_size + head_size_v]` views."""
    views = []
    for layer in range(base.shape[order.value.index("L")]):
        v = base[layer] if order.value[0] == "L" else base[:, layer]
        v = v.flatten(-2)  # S and C fused, as vLLM's last dimension
        if order.value.replace("L", "").startswith("BN"):
            v = v.permute(0, 2, 1, 3)  # physical N-outside-H, logical [B, H, N, 2C]
        views.append(v)
    return views


@pytest.mark.parametrize("order", [DimOrder.LBNHSC, DimOrder.LBHNSC, DimOrder.BLNHSC, DimOrder.BLHNSC],
                         ids=lambda o: o.value)
def test_vllm_per_layer_views_address_the_same_memory_as_the_allocation(order: DimOrder) -> None:
    case = make_case(order, 4, 8, n=3, seed=5)
    views = vllm_layer_views(case.raw[0], order)
    assert views[0].shape == (case.layout.num_blocks, 2, 4, 8)
    from_views = EngineKV(case.layout, views)
    assert from_views.plan == case.engine.plan
    assert torch.equal(ref.gather_engine_blocks(from_views, case.slots, 8), ref.gather_engine_blocks(case.engine, case.slots, 8))


def test_strides_follow_the_order() -> None:
    lay = layout(DimOrder.BLHNSC)
    assert lay.shape == (6, 3, 2, 4, 2, 8)
    st = lay.strides()
    assert (st["C"], st["S"], st["N"], st["H"], st["L"], st["B"]) == (1, 8, 16, 64, 128, 384)
    assert lay.shared and lay.fused_kv
    cpu = layout(DimOrder.BHSNC)
    assert not cpu.shared and cpu.strides()["S"] == 4 * 8  # V starts after all K vectors of the (block, head)
    hf = layout(DimOrder.HBNC)
    assert hf.tensors_per_layer() == 2 and hf.shape == (2, 6, 4, 8)


def test_transformers_layout_binds_k_v_pairs() -> None:
    lay = layout(DimOrder.HBNC)
    pairs = [(torch.randn(1, 2, 24, 8).half(), torch.randn(1, 2, 24, 8).half()) for _ in range(3)]
    kv = EngineKV(lay, pairs)
    assert kv.plan.layer_ptrs[1] == pairs[0][1].data_ptr()
    assert kv.plan.token_stride == 8 * 2 and kv.plan.head_stride == 24 * 8 * 2


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"num_blocks": 0}, "num_blocks must be a positive int"),
        ({"block_size": True}, "block_size must be a positive int"),
        ({"kv_factor": 3}, "kv_factor must be 1 or 2"),
        ({"kv_factor": 1}, "kv_factor 1 .* cannot fill"),
        ({"dtype": "float64"}, "dtype"),
    ],
)
def test_bad_descriptor_fields(kw: dict, message: str) -> None:
    with pytest.raises(LayoutMismatchError, match=message):
        layout(**kw)


def test_unknown_order_lists_the_known_ones() -> None:
    with pytest.raises(LayoutMismatchError, match="not a known order.*LBNHSC"):
        layout("NBHC")  # type: ignore[arg-type]


def test_binding_errors_name_the_problem() -> None:
    lay = layout(DimOrder.LBNHSC)
    good = torch.zeros(lay.shape, dtype=torch.float16)
    with pytest.raises(LayoutMismatchError, match="is float32, the layout says float16"):
        EngineKV(lay, good.float())
    with pytest.raises(LayoutMismatchError, match="addresses"):
        EngineKV(lay, good.flatten()[:-1].clone())
    with pytest.raises(LayoutMismatchError, match="holds 2303 elements from its start"):
        EngineKV(lay, good.flatten()[1:])  # a view whose storage ends where the layout would still reach
    with pytest.raises(LayoutMismatchError, match="got 2 per-layer entries for 3 layers"):
        EngineKV(lay, [good[0], good[1]])
    per_layer = layout(DimOrder.SBNHC)
    with pytest.raises(LayoutMismatchError, match="no layer dimension L"):
        EngineKV(per_layer, torch.zeros(per_layer.shape, dtype=torch.float16))
    hf = layout(DimOrder.HBNC)
    with pytest.raises(LayoutMismatchError, match=r"pass a \(K, V\) pair"):
        EngineKV(hf, [torch.zeros(hf.shape, dtype=torch.float16)] * 3)
    with pytest.raises(TypeError, match="EngineKVLayout"):
        EngineKV(lay.shape, good)  # type: ignore[arg-type]


def test_check_store_lists_every_mismatch() -> None:
    lay = layout(DimOrder.LBNHSC, block_size=6)
    store = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_tokens=4)
    with pytest.raises(LayoutMismatchError) as err:
        lay.check_store(store)
    text = str(err.value)
    assert "num_layers: engine 3 != store 2" in text
    assert "dtype: engine float16 != store bfloat16" in text
    assert "whole multiples" in text
    layout(DimOrder.LBNHSC, num_layers=2, block_size=16, dtype=torch.bfloat16).check_store(store)


def test_chunk_slots_both_ratios() -> None:
    small = layout(DimOrder.LBNHSC, block_size=4)
    # store blocks of 8 tokens from engine blocks of 4: two chunks each, from consecutive table entries
    assert chunk_slots(small, 8, [5, 2, 0, 3], [1, 0]).tolist() == [[0, 12], [20, 8]]
    big = layout(DimOrder.LBNHSC, block_size=8)
    # store blocks of 4 tokens inside engine blocks of 8: one chunk each, half an engine block
    assert chunk_slots(big, 4, [5, 2], [0, 1, 3]).tolist() == [[40], [44], [20]]


def test_chunk_slots_errors() -> None:
    lay = layout(DimOrder.LBNHSC, block_size=4)
    with pytest.raises(LayoutMismatchError, match="whole multiples"):
        chunk_slots(lay, 6, [0, 1], [0])
    with pytest.raises(ValueError, match="covers only 2 engine blocks"):
        chunk_slots(lay, 8, [0, 1], [1])
    with pytest.raises(ValueError, match="must be >= 0"):
        chunk_slots(lay, 4, [0, 1], [-1])
    with pytest.raises(ValueError, match="positive int"):
        chunk_slots(lay, 0, [0, 1], [0])
