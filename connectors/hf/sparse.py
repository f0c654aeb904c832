"""Decode under a GPU page budget in transformers: `TierKV(model, decode_budget=...)`.

Prefill is dense, as transformers computes it (with a stored prefix reused when the store holds
one: `PagedDecodeCache` is a `TierKVCache`). When prefill has run through the last layer, every
layer's KV moves into a `tierkv.PageManager`: each page's home is the host pool, and the device
keeps each row's sinks and recent window. From then on each decode step appends the new token
to the manager and attends over the pages the query selects, fetched in one batched copy.

No transformers code is patched: the attention runs as tierkv's function registered through
`transformers.AttentionInterface` (`attention.py`), which `tierkv_attention_for` selects on the
model for the duration of `generate` only; it asks the cache that the layer's `update` handed
it. Prefill and any multi-token forward run as `TierKVCache` runs them; a one-token forward of
a paged cache runs the page manager (`PagedDecodeCache.attention`).

Exact mode (`decode_budget=1.0`, or a budget at least the sequence) keeps every page resident
and attends over all of them: the same tokens as dense decode (tests/test_hf_decode.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from tierkv import BlockStore, DecodeBudget, PageManager, TierKVError

from .attention import hand_off
from .cache import TierKVCache
from .model import ModelKV, UnsupportedModelError

_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")


class PagedLayer(CacheLayerMixin):
    """A layer whose KV lives in the page manager: it only counts the cache's columns for transformers' masks."""

    is_sliding = False

    def __init__(self, columns: int) -> None:
        super().__init__()
        self.columns = columns
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.columns += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1


class PagedDecodeCache(TierKVCache):
    """A `TierKVCache` whose decode steps attend over a page budget (`DecodeBudget`) instead of every token.

    `max_new_tokens` sizes the page tables (prompt + reply). `cuda_graphs`: on a GPU, replay each
    layer's decode step from CUDA graphs (`PageManager`'s option). The reply's KV is not stored:
    `save_sequences` refuses. `manager` is None until prefill has run; then it holds one
    sequence per row (its tokens without padding).
    """

    def __init__(self, store: BlockStore, model_kv: ModelKV, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, *, budget: DecodeBudget, max_new_tokens: int,
                 tenant: str | None = None, save_prompt: bool = True, load: bool = True,
                 cuda_graphs: bool = True) -> None:
        if model_kv.sliding:
            raise UnsupportedModelError(
                "decode_budget pages full-attention layers only; this model has sliding-window or chunked layers "
                f"(windows {sorted({w for w in model_kv.layer_windows if w is not None})})"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        super().__init__(store, model_kv, input_ids, attention_mask, tenant=tenant, save_prompt=save_prompt, load=load,
                         record_reply=False)
        self.budget = budget
        self.cuda_graphs = cuda_graphs
        self.max_new_tokens = max_new_tokens
        self.manager: PageManager | None = None
        self._seqs: list[int] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if self.manager is None:  # `TierKVCache.update` hands this cache to the layer's attention
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if self.prefilled:
                self._page()
            return keys, values
        if key_states.shape[-2] != 1 or key_states.shape[0] != len(self._seqs):
            raise TierKVError(
                f"decode_budget decodes one token per row per step ({len(self._seqs)} rows); this forward brings "
                f"{key_states.shape[-2]} tokens for {key_states.shape[0]} rows (assisted generation and chunked decode "
                "are not supported)"
            )
        hand_off(self)
        self.manager.append(layer_idx, self._seqs, key_states[:, :, 0], value_states[:, :, 0])
        layer = self.layers[layer_idx]
        assert isinstance(layer, PagedLayer)
        layer.update(key_states, value_states)
        return key_states, value_states

    def _page(self) -> None:
        """Move every layer's dense KV into a page manager, one sequence per row (its padding left out)."""
        layout = self.store.layout
        bt = layout.block_tokens
        lengths = [self._prompt_columns - pad + self.max_new_tokens for pad, _ in self._rows]
        max_pages = max(-(-n // bt) for n in lengths) + 1
        device_pages = sum(self.budget.wanted(-(-n // bt)) for n in lengths)
        device_pages = max(device_pages, len(lengths) * (self.budget.sink_pages + self.budget.window_pages))
        home = self.model_kv.layer_devices[0]
        dense = []
        for layer in self.layers:
            assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
            dense.append((layer.keys, layer.values))
        # On a GPU each layer's decode step is replayed from CUDA graphs (the same results, without
        # the Python launch cost of its few hundred small kernels).
        self.manager = PageManager(layout, self.budget, device_pages=device_pages, host_pages=len(lengths) * max_pages,
                                   max_seqs=len(lengths), max_pages=max_pages, device=home,
                                   cuda_graphs=self.cuda_graphs and torch.device(home).type == "cuda")
        for row, (pad, _) in enumerate(self._rows):
            keys = [k[row, :, pad:].transpose(0, 1).to(home) for k, _ in dense]
            values = [v[row, :, pad:].transpose(0, 1).to(home) for _, v in dense]
            self._seqs.append(self.manager.add(keys, values))
        self.layers = [PagedLayer(self._prompt_columns) for _ in dense]

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """`[batch, 1, q_heads, head_dim]` attention of a decode query `[batch, q_heads, 1, head_dim]`."""
        assert self.manager is not None
        out = self.manager.attend(layer_idx, self._seqs, query[:, :, 0], scaling)
        return out.unsqueeze(1)

    def attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scaling: float | None, dropout: float, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """A decode step's attention over the selected pages; the prompt's as `TierKVCache` computes it."""
        for name in _UNSUPPORTED_KWARGS:
            if kwargs.get(name) is not None:
                raise UnsupportedModelError(
                    f"{type(module).__name__} passes {name}={kwargs[name]!r} to attention; decode_budget supports plain "
                    "softmax attention only"
                )
        if kwargs.get("sliding_window") is not None:
            raise UnsupportedModelError(f"{type(module).__name__} uses a sliding window; decode_budget pages full attention only")
        if query.shape[2] != 1 or self.manager is None:
            return super().attention(module, query, key, value, scaling, dropout, kwargs)
        if dropout and module.training:
            raise TierKVError("decode_budget is for inference: the model is in training mode with attention dropout")
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        layer_idx: int = module.layer_idx  # type: ignore[assignment]  # every attention module of transformers 5 has it
        return self.attend(layer_idx, query, scale)

    def save_sequences(self, sequences: torch.Tensor) -> int:
        raise TierKVError("a decode_budget cache keeps the reply's KV in pages, not in blocks to store: "
                          "store_generated is not supported with decode_budget")


def check_paged_decode(model: PreTrainedModel, model_kv: ModelKV) -> None:
    """Refuse, with the reason, a model whose decode the page manager cannot run exactly."""
    name = type(model).__name__
    if model_kv.sliding:
        raise UnsupportedModelError(f"decode_budget cannot serve {name}: it has sliding-window or chunked-attention layers")
    for key in ("attn_logit_softcapping", "attention_chunk_size"):
        value = getattr(model.config, key, None)
        if value is not None:
            raise UnsupportedModelError(f"decode_budget cannot serve {name}: its config sets {key}={value!r}")
    if not model._can_set_attn_implementation():
        raise UnsupportedModelError(
            f"decode_budget cannot serve {name}: its attention does not go through transformers' AttentionInterface"
        )
    if model.config._attn_implementation not in ("sdpa", "eager"):
        raise UnsupportedModelError(
            f"decode_budget cannot serve {name}: it runs attention implementation "
            f"{model.config._attn_implementation!r}; load it with attn_implementation='sdpa'"
        )
