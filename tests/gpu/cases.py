"""Engine KV cases shared by the CPU reference tests and the GPU kernel tests.

The expected values come from indexing each engine tensor by the letters of its order, one
element at a time: an independent reading of the layout legend, not the stride arithmetic that
`EngineKV` and the kernels use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierkv import KVLayout
from tierkv.ops.engine_layout import DimOrder, EngineKV, EngineKVLayout, chunk_slots

# (engine block_size, store block_tokens): ratio 1, store 4x and 8x larger, engine 4x and 8x larger.
BLOCK_RATIOS = [(8, 8), (4, 16), (2, 16), (16, 4), (16, 2)]


@dataclass
class Case:
    layout: EngineKVLayout
    store: KVLayout
    raw: list[torch.Tensor]  # the engine tensors in the natural shape of the order
    engine: EngineKV
    slots: torch.Tensor  # [n, chunks]
    token_slots: list[list[int]]  # [n][block_tokens]


def natural_tensors(layout: EngineKVLayout, device: str | torch.device, fill: str = "randn") -> list[torch.Tensor]:
    """Engine tensors shaped exactly as the order reads; one for shared orders, else per layer (K, V apart)."""
    count = 1 if layout.shared else layout.num_layers * layout.tensors_per_layer()
    shape = layout.shape
    if layout.order is DimOrder.HBNC:  # what transformers holds: [batch=1, heads, tokens, head_dim]
        shape = (1, layout.num_kv_heads, layout.num_blocks * layout.block_size, layout.head_dim)
    make = torch.randn if fill == "randn" else torch.zeros
    return [make(shape, dtype=torch.float32, device=device).to(layout.dtype) for _ in range(count)]


def bind(layout: EngineKVLayout, raw: list[torch.Tensor]) -> EngineKV:
    if layout.shared:
        return EngineKV(layout, raw[0])
    if layout.tensors_per_layer() == 2:
        return EngineKV(layout, [(raw[2 * i], raw[2 * i + 1]) for i in range(layout.num_layers)])
    return EngineKV(layout, raw)


def make_case(order: DimOrder, engine_block: int, block_tokens: int, n: int, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", num_layers: int = 2, heads: int = 2, head_dim: int = 4,
              kv_factor: int = 2, seed: int = 0) -> Case:
    """A random engine of `order`, and slots for `n` store blocks taken at shuffled positions of a shuffled block table."""
    gen = torch.Generator().manual_seed(seed)
    seq_tokens = (n + 2) * block_tokens
    table_len = -(-seq_tokens // engine_block)
    num_blocks = table_len + 3
    layout = EngineKVLayout(order, num_layers=num_layers, num_blocks=num_blocks, block_size=engine_block,
                            num_kv_heads=heads, head_dim=head_dim, dtype=dtype, kv_factor=kv_factor)
    store = KVLayout(num_layers=num_layers, kv_factor=kv_factor, num_kv_heads=heads, head_dim=head_dim,
                     dtype=dtype, block_tokens=block_tokens)
    raw = natural_tensors(layout, device)
    engine = bind(layout, raw)
    table = torch.randperm(num_blocks, generator=gen)[:table_len]
    positions = torch.randperm(n + 2, generator=gen)[:n]
    slots = chunk_slots(layout, block_tokens, table, positions)
    tok = [[int(table[(int(p) * block_tokens + t) // engine_block]) * engine_block + (int(p) * block_tokens + t) % engine_block
            for t in range(block_tokens)] for p in positions]
    return Case(layout, store, raw, engine, slots, tok)


def element_ref(case: Case, layer: int, s: int, block: int, head: int, token: int) -> torch.Tensor:
    """The engine's `head_dim` channels for one (layer, K/V, engine block, head, token), found by letters."""
    lay = case.layout
    where = {"L": layer, "B": block, "H": head, "N": token, "S": s}
    if lay.shared:
        t = case.raw[0]
    else:
        t = case.raw[layer * lay.tensors_per_layer() + (0 if lay.fused_kv or lay.kv_factor == 1 else s)]
    letters = lay.order.value
    if lay.order is DimOrder.HBNC:  # tokens of a sequence buffer: blocks are runs of block_size tokens
        t = t.reshape(lay.num_kv_heads, lay.num_blocks, lay.block_size, lay.head_dim)
    index = tuple(where[d] for d in letters if d in where and (d != "L" or lay.shared))
    return t[index]


def expected_blocks(case: Case) -> torch.Tensor:
    """Store blocks `[n, L, kvf, block_tokens, H, C]` built one channel vector at a time."""
    lay, bt = case.layout, case.store.block_tokens
    n = len(case.token_slots)
    out = torch.empty((n, lay.num_layers, lay.kv_factor, bt, lay.num_kv_heads, lay.head_dim), dtype=lay.dtype)
    for j in range(n):
        for layer in range(lay.num_layers):
            for s in range(lay.kv_factor):
                for t in range(bt):
                    slot = case.token_slots[j][t]
                    for h in range(lay.num_kv_heads):
                        out[j, layer, s, t, h] = element_ref(case, layer, s, slot // lay.block_size, h, slot % lay.block_size).cpu()
    return out
