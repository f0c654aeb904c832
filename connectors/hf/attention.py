"""tierkv's registered attention: where a tierkv cache knows a faster exact way, it computes the layer itself.

transformers calls a model's attention through `AttentionInterface`; `tierkv_attention_for(model)`
selects the function here for the duration of a `generate` (and restores the model's own after),
so nothing is patched. Each layer's cache `update` hands the cache to this function through a
thread-local, used once; the cache's `attention(...)` either computes the layer or returns None,
and then transformers' own sdpa runs, with the mask transformers built. Two caches compute:

- `TierKVCache`, for the prompt's forward pass over a loaded prefix when no row is padded: the
  mask is then exactly causal with the queries at the end of the keys, so sdpa runs with
  `causal_lower_right` and `enable_gqa` (flash attention on a GPU) instead of materialising the
  mask and repeating K and V for every query head (`repeat_kv`);
- `PagedDecodeCache` (`decode_budget`), for decode steps: attention over the selected pages.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION = "tierkv"
_HANDOFF = threading.local()


class ComputesAttention(Protocol):
    def attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scaling: float | None, dropout: float, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The layer's `[batch, q_len, heads, head_dim]` output, or None to let sdpa compute it."""


def hand_off(cache: ComputesAttention) -> None:
    """Called by a cache's `update`: the attention of the same layer, next, may ask this cache."""
    _HANDOFF.cache = cache


def tierkv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention: the handed-off cache's own, else transformers' sdpa."""
    # Used once: a later forward with another cache (or none) must not find this one.
    cache = getattr(_HANDOFF, "cache", None)
    _HANDOFF.cache = None
    if cache is not None:
        out = cache.attention(module, query, key, value, scaling, dropout, kwargs)
        if out is not None:
            return out, None
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return out, None


AttentionInterface.register(ATTENTION, tierkv_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def uses_sdpa(model: PreTrainedModel) -> bool:
    """Whether the model runs transformers' sdpa through `AttentionInterface` (what `tierkv_attention` falls back to)."""
    return model._can_set_attn_implementation() and model.config._attn_implementation == "sdpa"


@contextlib.contextmanager
def tierkv_attention_for(model: PreTrainedModel) -> Iterator[None]:
    """Run the model's attention through `tierkv_attention` inside the block; restore it after."""
    saved = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(saved)
        _HANDOFF.cache = None
