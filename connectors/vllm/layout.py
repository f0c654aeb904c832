"""vLLM's KV cache described as data: the store layout (both roles) and the engine layout (workers).

vLLM hands a connector one view per attention layer, logically `[blocks, heads, tokens, content]`
where content is K's channels then V's; the physical order of blocks, heads and tokens is the
resolved `KVCacheLayout`, and how the attention backend reads the content is the backend's own
business. Both are mapped here to a `DimOrder` of `tierkv.ops.engine_layout`, and every view's
strides are checked against that order before a single byte moves: a layout this module does not
know is refused at start, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tierkv import ConfigError, DimOrder, EngineKV, EngineKVLayout, KVLayout, LayoutMismatchError

# Attention backends whose pages are laid out by their kernels in a way of their own, not token by
# token: tierkv copies such a page only whole, as bytes, so a stored block must hold whole pages.
# vLLM's CPU attention keeps each (block, head) page as K then V, K channel-major ([head_dim,
# block_size], token innermost) and V token-major; copying some of its tokens (blocks smaller than
# the page) put K values at the wrong tokens, and greedy answers changed (docs/vllm.md).
WHOLE_PAGE_BACKENDS: dict[str, str] = {
    "CPU_ATTN": "vLLM's CPU attention keeps each page's K channel-major (a layout of its kernels' own), "
                "so tierkv can copy only whole pages of it",
}

# Resolved vLLM layout -> our order, for backends that split the content dimension into K | V.
_SHARED_ORDERS = {
    "LBNHC": DimOrder.LBNHSC,
    "LBHNC": DimOrder.LBHNSC,
    "BLNHC": DimOrder.BLNHSC,
    "BLHNC": DimOrder.BLHNSC,
}


@dataclass(frozen=True)
class AttentionKV:
    """The one KV cache group tierkv can store: plain full attention, every layer alike."""

    layer_names: tuple[str, ...]  # in layer order
    block_size: int  # vLLM's (manager) block size: the unit of the scheduler's block ids
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def store_layout(self, block_tokens: int) -> KVLayout:
        return KVLayout(num_layers=len(self.layer_names), kv_factor=2, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, dtype=self.dtype, block_tokens=block_tokens)


def _layer_index(name: str) -> int:
    digits = [int(part) for part in name.split(".") if part.isdigit()]
    if len(digits) != 1:
        raise ConfigError(f"cannot tell the layer index of attention layer {name!r}")
    return digits[0]


def _layers(names: Sequence[str]) -> str:
    indices = [int(p) for n in names for p in n.split(".") if p.isdigit()]
    return f"layers {sorted(indices)}" if len(indices) == len(names) else f"layers {sorted(names)}"


def _spec_kind(spec: object) -> str:
    kind = type(spec).__name__
    window, chunk = getattr(spec, "sliding_window", None), getattr(spec, "attention_chunk_size", None)
    if window is not None:
        return f"{kind}(sliding_window={window})"
    if chunk is not None:
        return f"{kind}(attention_chunk_size={chunk})"
    return kind


def _model_layer_types() -> str:
    """The model's own layer types, from the HF config of the vLLM config being built (empty if none is at hand)."""
    try:
        from vllm.config import get_current_vllm_config

        hf = get_current_vllm_config().model_config.hf_text_config
    except Exception:
        return ""
    types = getattr(hf, "layer_types", None)
    parts = []
    if isinstance(types, (list, tuple)) and types:
        where: dict[str, list[int]] = {}
        for i, t in enumerate(types):
            where.setdefault(str(t), []).append(i)
        parts.append(", ".join(f"{t} at layers {layers}" for t, layers in where.items()))
    sizes = [f"{f}={getattr(hf, f)}" for f in ("sliding_window", "attention_chunk_size") if getattr(hf, f, None) is not None]
    if sizes and not parts:  # no layer_types: transformers makes every layer windowed
        kind = "sliding_attention" if getattr(hf, "sliding_window", None) is not None else "chunked_attention"
        parts.append(f"{kind} at every layer")
    return "; ".join(parts + sizes)


def _refusal(reason: str, groups: Sequence[object], windowed: bool) -> ConfigError:
    """A refusal naming the model's layer types and vLLM's KV cache groups, and what to do instead."""
    described = "; ".join(
        f"{_spec_kind(g.kv_cache_spec)} for {_layers(g.layer_names)}"  # type: ignore[attr-defined]
        for g in groups
    )
    model = _model_layer_types()
    hybrid = (
        "; the connector does not implement SupportsHMA (vLLM's hybrid KV cache, one group per attention type), "
        "so vLLM turns its hybrid manager off and the windowed layers' KV cannot be stored as full attention"
        if windowed
        else ""
    )
    return ConfigError(
        f"tierkv cannot store this model's KV: {reason}. "
        + (f"The model's layer types: {model}. " if model else "")
        + f"vLLM's KV cache groups: {described}. tierkv stores one group of plain full attention{hybrid}. "
        "Serve this model without kv_transfer_config"
    )


def attention_kv(kv_cache_config: object) -> AttentionKV:
    """Read vLLM's `KVCacheConfig`; refuse anything whose KV does not follow from the token ids alone."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups  # type: ignore[attr-defined]
    if len(groups) != 1:
        raise _refusal(f"it has {len(groups)} KV cache groups (hybrid, sliding-window or multi-type attention)", groups, True)
    spec = groups[0].kv_cache_spec
    problems = []
    if not isinstance(spec, FullAttentionSpec) or isinstance(spec, MLAAttentionSpec):
        problems.append(f"its KV cache spec is {type(spec).__name__}, not plain full attention")
    else:
        if spec.sliding_window is not None or spec.attention_chunk_size is not None:
            problems.append("it uses windowed or chunked-local attention")
        if spec.non_causal:
            problems.append("its attention is not causal")
        if spec.head_size_v != spec.head_size:
            problems.append(f"K and V head sizes differ ({spec.head_size} vs {spec.head_size_v})")
        if getattr(spec, "page_size_padded", None) is not None:
            problems.append("its KV pages are padded")
        if spec.kv_quant_mode.name != "NONE":
            problems.append(f"its KV cache is quantized with separate scales ({spec.kv_quant_mode.name})")
    if problems:
        windowed = getattr(spec, "sliding_window", None) is not None or getattr(spec, "attention_chunk_size", None) is not None
        raise _refusal("; ".join(problems), groups, windowed)
    names = tuple(sorted(groups[0].layer_names, key=_layer_index))
    return AttentionKV(layer_names=names, block_size=spec.block_size, num_kv_heads=spec.num_kv_heads,
                       head_dim=spec.head_size, dtype=spec.dtype)


def engine_order(backend: str, vllm_layout: str) -> DimOrder:
    """Our `DimOrder` for vLLM's per-layer views of `backend` under resolved layout `vllm_layout`."""
    if backend in WHOLE_PAGE_BACKENDS:  # K then V in each (block, head) page, moved only as whole pages
        if vllm_layout != "LBHNC":
            raise LayoutMismatchError(f"attention backend {backend} with KV cache layout {vllm_layout} is not supported")
        return DimOrder.BHSNC
    order = _SHARED_ORDERS.get(vllm_layout)
    if order is None:
        raise LayoutMismatchError(
            f"vLLM KV cache layout {vllm_layout} (backend {backend}) has no tierkv engine layout; "
            f"supported: {sorted(_SHARED_ORDERS)}"
        )
    return order


def _expected_view_strides(engine: EngineKVLayout) -> tuple[int, int, int, int]:
    """Element strides vLLM's `[B, H, N, K|V channels]` view must have for `engine.order`."""
    st = engine.strides()
    if engine.order is DimOrder.BHSNC:  # the view is the contiguous `[B, H, N, 2C]` allocation shape
        c2 = 2 * engine.head_dim
        return (engine.num_kv_heads * engine.block_size * c2, engine.block_size * c2, c2, 1)
    return (st["B"], st["H"], st["N"], 1)


def check_whole_pages(backend: str, block_tokens: int, vllm_block_size: int) -> None:
    """Refuse stored blocks that would cut a page of a `WHOLE_PAGE_BACKENDS` backend."""
    reason = WHOLE_PAGE_BACKENDS.get(backend)
    if reason is not None and block_tokens % vllm_block_size:
        raise ConfigError(
            f"kv_connector_extra_config.block_tokens is {block_tokens}, less than vLLM's block size {vllm_block_size}, "
            f"but {reason}. Leave block_tokens unset (it takes vLLM's block size), set a multiple of "
            f"{vllm_block_size}, or give vLLM a --block-size that divides {block_tokens}"
        )


def engine_kv(kv_caches: Mapping[str, torch.Tensor], attention: AttentionKV, backend: str, vllm_layout: str) -> EngineKV:
    """Bind vLLM's per-layer views to an `EngineKV`, after checking every view against the layout."""
    missing = [n for n in attention.layer_names if n not in kv_caches]
    if missing:
        raise LayoutMismatchError(f"vLLM registered no KV cache for attention layers {missing}")
    views = [kv_caches[n] for n in attention.layer_names]
    first = views[0]
    if first.dim() != 4:
        raise LayoutMismatchError(f"expected 4-D [blocks, heads, tokens, channels] KV views, got shape {tuple(first.shape)}")
    num_blocks, heads, tokens, content = first.shape
    if heads != attention.num_kv_heads or content != 2 * attention.head_dim:
        raise LayoutMismatchError(
            f"KV view {tuple(first.shape)} does not hold {attention.num_kv_heads} heads of K and V "
            f"with {attention.head_dim} channels each"
        )
    if attention.block_size % tokens:
        raise LayoutMismatchError(f"kernel block of {tokens} tokens does not divide vLLM's block size {attention.block_size}")
    layout = EngineKVLayout(order=engine_order(backend, vllm_layout), num_layers=len(views), num_blocks=num_blocks,
                            block_size=tokens, num_kv_heads=heads, head_dim=attention.head_dim, dtype=first.dtype)
    expected = _expected_view_strides(layout)
    for name, view in zip(attention.layer_names, views):
        if tuple(view.shape) != tuple(first.shape) or view.dtype != first.dtype:
            raise LayoutMismatchError(f"KV view of {name} is {view.dtype} {tuple(view.shape)}, unlike the first layer's")
        bad = [i for i in range(4) if view.shape[i] > 1 and view.stride(i) != expected[i]]
        if bad:
            raise LayoutMismatchError(
                f"KV view of {name} has strides {view.stride()}, but layout {vllm_layout} read as "
                f"{layout.order.value} needs {expected}"
            )
    return EngineKV(layout, views)


def engine_block_table(block_ids: Sequence[int], attention: AttentionKV, engine: EngineKVLayout) -> list[int]:
    """vLLM block ids (manager blocks) as engine blocks of `engine.block_size` tokens, in sequence order."""
    ratio = attention.block_size // engine.block_size
    if ratio == 1:
        return list(block_ids)
    return [b * ratio + j for b in block_ids for j in range(ratio)]
