"""An engine's paged KV memory described as data, so tierkv can copy to and from it without importing the engine.

Every engine keeps KV in some arrangement of five dimensions plus, often, a K-or-V one. The
kernels only need, for each layer and each of K and V, a base address plus the byte strides of
block, head and token (channels are always contiguous). `EngineKVLayout` derives those from a
dimension order; `EngineKV` binds a layout to the engine's actual tensors and checks that every
address the copies can touch lies inside them.

Legend of the letters in a `DimOrder` (outermost first, like a shape):

    L  layer          present: one allocation holds every layer; absent: one tensor per layer
    B  engine block   a page of `block_size` tokens
    H  KV head
    N  token within the engine block
    S  K or V (size 2) present: K and V share the tensor; absent with kv_factor 2: separate K and V tensors
    C  channel        always last and contiguous: `head_dim` elements

vLLM names its layouts by L, B, N, H, C alone and counts K and V into C
(`head_size + head_size_v`): its LBNHC is `LBNHSC` here, because K's channels come before V's
inside the last dimension, which is exactly an S dimension just outside C.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from ..errors import LayoutMismatchError
from ..layout import KVLayout, dtype_name, parse_dtype


class DimOrder(str, Enum):
    """Physical order of an engine's KV dimensions; see the module legend."""

    LBNHSC = "LBNHSC"  # vLLM, one allocation, layer-major, tokens outside heads (vLLM "LBNHC")
    LBHNSC = "LBHNSC"  # vLLM, one allocation, layer-major, heads outside tokens (vLLM "LBHNC")
    BLNHSC = "BLNHSC"  # vLLM, one allocation, block-major: a block holds every layer (vLLM "BLNHC")
    BLHNSC = "BLHNSC"  # vLLM, one allocation, block-major, heads outside tokens (vLLM "BLHNC")
    BHSNC = "BHSNC"  # vLLM CPU attention: per layer, each (block, head) holds all K vectors then all V vectors
    SBNHC = "SBNHC"  # vLLM's classic per-layer `[2, num_blocks, block_size, heads, head_size]`
    BNHC = "BNHC"  # per-layer `[num_blocks, block_size, heads, head_dim]`; separate K and V tensors, or MLA latent
    HBNC = "HBNC"  # transformers: per-layer K and V `[heads, tokens, head_dim]`; a block is a run of tokens


_LETTERS = frozenset("LBHNSC")


@dataclass(frozen=True)
class EngineKVLayout:
    """Shape and dimension order of an engine's paged KV; pure data, no tensors.

    num_blocks: engine blocks per layer (for HBNC: tokens // block_size of the sequence buffer).
    block_size: tokens per engine block; must divide or be a multiple of the store's block_tokens.
    kv_factor: 2 for K and V, 1 for a single latent (MLA); with 1 the order may not contain S.
    """

    order: DimOrder
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    kv_factor: int = 2

    def __post_init__(self) -> None:
        try:
            order = DimOrder(self.order)
        except ValueError:
            raise LayoutMismatchError(
                f"EngineKVLayout.order {self.order!r} is not a known order; use one of {[o.value for o in DimOrder]}"
            ) from None
        object.__setattr__(self, "order", order)
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LayoutMismatchError(f"EngineKVLayout.{name} must be a positive int, got {value!r}")
        if self.kv_factor not in (1, 2):
            raise LayoutMismatchError(f"EngineKVLayout.kv_factor must be 1 or 2, got {self.kv_factor!r}")
        if self.kv_factor == 1 and "S" in order.value:
            raise LayoutMismatchError(
                f"order {order.value} has a K/V dimension S, which kv_factor 1 (one latent per token) cannot fill"
            )
        try:
            object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        except ValueError as e:
            raise LayoutMismatchError(f"EngineKVLayout.dtype: {e}") from None

    # -- derived facts -------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """One allocation for every layer (the order has L)."""
        return "L" in self.order.value

    @property
    def fused_kv(self) -> bool:
        """K and V live in one tensor (the order has S); else kv_factor 2 means separate tensors."""
        return "S" in self.order.value

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def sizes(self) -> dict[str, int]:
        return {
            "L": self.num_layers,
            "B": self.num_blocks,
            "H": self.num_kv_heads,
            "N": self.block_size,
            "S": 2,
            "C": self.head_dim,
        }

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one engine tensor written in `order` (the whole allocation if shared, else one layer's)."""
        sizes = self.sizes()
        return tuple(sizes[d] for d in self.order.value)

    def strides(self) -> dict[str, int]:
        """Element stride of each letter of the order in a contiguous tensor of `shape`."""
        sizes, out, step = self.sizes(), {}, 1
        for d in reversed(self.order.value):
            out[d] = step
            step *= sizes[d]
        return out

    def tensors_per_layer(self) -> int:
        """How many tensors make up one layer when the layout is not shared: 2 for separate K and V."""
        return 2 if (self.kv_factor == 2 and not self.fused_kv) else 1

    def check_store(self, layout: KVLayout) -> None:
        """Raise unless blocks of `layout` can be filled from (and written back to) this engine layout."""
        problems = []
        for mine, theirs in (("num_layers", "num_layers"), ("num_kv_heads", "num_kv_heads"),
                             ("head_dim", "head_dim"), ("kv_factor", "kv_factor")):
            if getattr(self, mine) != getattr(layout, theirs):
                problems.append(f"{mine}: engine {getattr(self, mine)} != store {getattr(layout, theirs)}")
        if self.dtype != layout.dtype:
            problems.append(f"dtype: engine {dtype_name(self.dtype)} != store {dtype_name(layout.dtype)}")
        e, s = self.block_size, layout.block_tokens
        if e % s and s % e:
            problems.append(
                f"block sizes: engine block_size {e} and store block_tokens {s} must be whole multiples of one another"
            )
        if problems:
            raise LayoutMismatchError("engine KV layout does not match the store layout: " + "; ".join(problems))

    def chunk_tokens(self, block_tokens: int) -> int:
        """Tokens per copy chunk: the smaller block size, so a chunk never crosses an engine block."""
        return min(self.block_size, block_tokens)


@dataclass(frozen=True)
class AddressPlan:
    """What the kernels need: byte address of K (and V) of every layer, and byte strides of B, H, N."""

    layer_ptrs: tuple[int, ...]  # [num_layers * kv_factor], layer-major
    block_stride: int
    head_stride: int
    token_stride: int
    row_bytes: int  # head_dim * element_size: one contiguous channel run


class EngineKV:
    """An `EngineKVLayout` bound to the engine's tensors.

    tensors:
      - shared orders (with L): the whole allocation as one tensor, or one per-layer view into it
        (vLLM hands out such views; each view's data pointer is that layer's base);
      - per-layer orders with S, or kv_factor 1: one tensor per layer;
      - per-layer orders without S and kv_factor 2: one (K, V) pair per layer.

    Every tensor must be of the layout's dtype, all on one device, and its storage must hold every
    element the layout can address from its data pointer: that check is what makes a wrong layout
    an exception rather than a stray write.
    """

    def __init__(
        self, layout: EngineKVLayout, tensors: torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]]
    ) -> None:
        if not isinstance(layout, EngineKVLayout):
            raise TypeError(f"layout must be an EngineKVLayout, got {type(layout).__name__}")
        self.layout = layout
        self.tensors = self._flatten(layout, tensors)
        first = self.tensors[0]
        self.device = first.device
        for i, t in enumerate(self.tensors):
            if t.dtype != layout.dtype:
                raise LayoutMismatchError(
                    f"engine tensor {i} is {dtype_name(t.dtype)}, the layout says {dtype_name(layout.dtype)}"
                )
            if t.device != self.device:
                raise LayoutMismatchError(f"engine tensors are on {self.device} and {t.device}; keep them on one device")
        self.plan = self._plan()
        self._grid: tuple[torch.Tensor | None] | None = None  # grid_view(), found once
        self._device_ptrs: torch.Tensor | None = None

    @staticmethod
    def _flatten(layout: EngineKVLayout, tensors: object) -> list[torch.Tensor]:
        if isinstance(tensors, torch.Tensor):
            if not layout.shared:
                raise LayoutMismatchError(
                    f"order {layout.order.value} has no layer dimension L: pass one entry per layer, not one tensor"
                )
            return [tensors]
        if not isinstance(tensors, Sequence) or not tensors:
            raise TypeError("tensors must be a tensor or a non-empty sequence of per-layer entries")
        if len(tensors) != layout.num_layers:
            raise LayoutMismatchError(f"got {len(tensors)} per-layer entries for {layout.num_layers} layers")
        per = layout.tensors_per_layer()
        flat: list[torch.Tensor] = []
        for i, entry in enumerate(tensors):
            if per == 2:
                if not (isinstance(entry, Sequence) and len(entry) == 2 and all(isinstance(t, torch.Tensor) for t in entry)):
                    raise LayoutMismatchError(
                        f"layer {i}: order {layout.order.value} keeps K and V apart; pass a (K, V) pair of tensors"
                    )
                flat.extend(entry)
            else:
                if not isinstance(entry, torch.Tensor):
                    raise LayoutMismatchError(f"layer {i}: expected one tensor, got {type(entry).__name__}")
                flat.append(entry)
        return flat

    def _plan(self) -> AddressPlan:
        lay, es = self.layout, self.layout.element_size
        st = lay.strides()
        span = 1 + sum((lay.sizes()[d] - 1) * st[d] for d in lay.order.value)  # elements reachable from a base
        kvf = lay.kv_factor
        ptrs: list[int] = []
        if lay.shared and len(self.tensors) == 1:
            base = self.tensors[0]
            self._check_span(base, 0, span)
            for layer in range(lay.num_layers):
                for s in range(kvf):
                    ptrs.append(base.data_ptr() + (layer * st["L"] + s * st.get("S", 0)) * es)
        elif lay.shared:
            # Per-layer views of one allocation: each view starts at its layer, L is not walked.
            layer_span = span - (lay.num_layers - 1) * st["L"]
            for layer, t in enumerate(self.tensors):
                self._check_span(t, layer, layer_span)
                ptrs.extend(t.data_ptr() + s * st["S"] * es for s in range(kvf))
        else:
            for i, t in enumerate(self.tensors):
                self._check_span(t, i, span)
                if lay.fused_kv:
                    ptrs.extend(t.data_ptr() + s * st["S"] * es for s in range(kvf))
                else:
                    ptrs.append(t.data_ptr())
        return AddressPlan(
            layer_ptrs=tuple(ptrs),
            block_stride=st["B"] * es,
            head_stride=st["H"] * es,
            token_stride=st["N"] * es,
            row_bytes=lay.head_dim * es,
        )

    def _check_span(self, t: torch.Tensor, which: int, span: int) -> None:
        es = self.layout.element_size
        available = t.untyped_storage().nbytes() // es - t.storage_offset()
        if available < span:
            raise LayoutMismatchError(
                f"engine tensor {which} (shape {tuple(t.shape)}) holds {available} elements from its start, "
                f"but layout {self.layout.order.value} with shape {self.layout.shape} addresses {span}; "
                "check num_blocks, block_size, heads and head_dim"
            )

    def device_ptrs(self) -> torch.Tensor:
        """The layer pointer table as an int64 tensor on the engine's device (made once)."""
        if self._device_ptrs is None:
            self._device_ptrs = torch.tensor(self.plan.layer_ptrs, dtype=torch.int64).to(self.device)
        return self._device_ptrs

    def layer_view(self, layer: int, s: int) -> torch.Tensor:
        """K (s=0) or V (s=1) of one layer as a strided `[num_blocks, heads, block_size, head_dim]` view."""
        lay, es = self.layout, self.layout.element_size
        ptr = self.plan.layer_ptrs[layer * lay.kv_factor + s]
        owner = self._owner(ptr)
        offset = (ptr - owner.untyped_storage().data_ptr()) // es
        p = self.plan
        return owner.as_strided(
            (lay.num_blocks, lay.num_kv_heads, lay.block_size, lay.head_dim),
            (p.block_stride // es, p.head_stride // es, p.token_stride // es, 1),
            offset,
        )

    def grid_view(self) -> torch.Tensor | None:
        """K and V of every layer as one strided `[layers, kv_factor, blocks, heads, block_size, head_dim]` view.

        Possible when every layer's K (and V) starts on one grid, `base + layer * a + s * b`, inside
        one tensor: vLLM's caches (one allocation, layer-major) and per-layer tensors carved out of
        one buffer. Then a chunk of one engine block, across all layers, is a single strided view,
        which is what lets the CPU copy a block in one call instead of one per layer. None otherwise.
        Found once per binding: the tensors and their layout never change.
        """
        if self._grid is None:
            self._grid = (self._find_grid(),)
        return self._grid[0]

    def _find_grid(self) -> torch.Tensor | None:
        lay, p, es = self.layout, self.plan, self.layout.element_size
        ptrs, kvf = p.layer_ptrs, lay.kv_factor
        base = ptrs[0]
        a = ptrs[kvf] - base if lay.num_layers > 1 else 0
        b = ptrs[1] - base if kvf > 1 else 0
        strides = (a, b, p.block_stride, p.head_stride, p.token_stride)
        if any(x < 0 or x % es for x in strides):
            return None
        if any(ptrs[layer * kvf + s] != base + layer * a + s * b for layer in range(lay.num_layers) for s in range(kvf)):
            return None
        sizes = (lay.num_layers, kvf, lay.num_blocks, lay.num_kv_heads, lay.block_size, lay.head_dim)
        owner = self._owner(base)
        start = owner.untyped_storage().data_ptr()
        last = base + sum((n - 1) * x for n, x in zip(sizes, (*strides, es))) + es
        if last > start + owner.untyped_storage().nbytes() or (base - start) % es:
            return None
        return owner.as_strided(sizes, tuple(x // es for x in (*strides, es)), (base - start) // es)

    def _owner(self, ptr: int) -> torch.Tensor:
        for t in self.tensors:
            start = t.untyped_storage().data_ptr()
            if start <= ptr < start + t.untyped_storage().nbytes():
                return t
        raise AssertionError("layer pointer outside every engine tensor")  # _plan only makes pointers inside them


def chunk_slots(layout: EngineKVLayout, block_tokens: int, block_table: Sequence[int] | torch.Tensor,
                store_positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Engine token slots (`block * block_size + offset`) of each copy chunk of each store block.

    A request's `block_table` lists its engine blocks in sequence order; store block `p` covers
    sequence tokens `[p * block_tokens, (p + 1) * block_tokens)`. Returns int64 `[len(positions),
    block_tokens // chunk]` where `chunk = min(block_size, block_tokens)`: the slot of each chunk's
    first token. Concatenate the results of several requests to move them in one launch.
    """
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens <= 0:
        raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
    e = layout.block_size
    if e % block_tokens and block_tokens % e:
        raise LayoutMismatchError(
            f"engine block_size {e} and store block_tokens {block_tokens} must be whole multiples of one another"
        )
    table = torch.as_tensor(block_table, dtype=torch.int64).reshape(-1)
    pos = torch.as_tensor(store_positions, dtype=torch.int64).reshape(-1)
    if pos.numel() and int(pos.min()) < 0:
        raise ValueError(f"store_positions must be >= 0, got {int(pos.min())}")
    g = layout.chunk_tokens(block_tokens)
    per = block_tokens // g
    first = pos[:, None] * block_tokens + torch.arange(per, dtype=torch.int64) * g  # [n, per] sequence tokens
    if first.numel() and int(first.max()) + g > table.numel() * e:
        need = (int(pos.max()) + 1) * block_tokens
        raise ValueError(
            f"store block {int(pos.max())} ends at token {need}, but the block table covers only "
            f"{table.numel()} engine blocks x {e} tokens = {table.numel() * e}"
        )
    blocks = table[first // e]
    if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= layout.num_blocks):
        bad = int(blocks.min()) if int(blocks.min()) < 0 else int(blocks.max())
        raise ValueError(f"block_table names engine block {bad}, but the engine has blocks 0 to {layout.num_blocks - 1}: "
                         "a wrong table would copy other requests' pages")
    return blocks * e + first % e
