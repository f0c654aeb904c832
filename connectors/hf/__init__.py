"""Prefix reuse for Hugging Face transformers: the longest stored prefix of a prompt is never recomputed.

    from tierkv_connectors.hf import TierKV
    tkv = TierKV(model)                                   # a BlockStore keyed by this model
    out = tkv.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=64)
    tok.batch_decode(out.sequences)

`TierKV.generate` is a thin wrapper over `model.generate`: it builds a `TierKVCache` (a
`DynamicCache` pre-filled from the store), hands it to `generate` (as `cache=`, or
`past_key_values=` before transformers 5.20: `cache_argument` knows which), and can store the
generated tokens' blocks afterwards. Use `TierKV.cache` to drive `model.generate` yourself:
`model.generate(ids, attention_mask=mask, **cache_argument(tkv.cache(ids, mask)))`.

`TierKV` hooks the model's forward (`CacheWatch`), so a model that drops or ignores the cache
it was given never returns output computed without the prefix it reports as reused:
`TierKV.generate` recomputes the whole prompt (with a `RuntimeWarning` and
`GenerateResult.recomputed` saying why); a `TierKVCache` from `TierKV.cache` handed to
`model.generate` or `model(...)` raises `PrefixNotUsedError` instead.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from tierkv import BlockStore, DecodeBudget, StoreConfig, TierKVError

from .attention import tierkv_attention_for, uses_sdpa
from .cache import CacheWatch, PrefixNotUsedError, TierKVCache, left_padded_rows
from .compat import cache_argument
from .model import (
    ModelKV,
    UnsupportedModelError,
    describe_model,
    fingerprint_weights,
    model_namespace,
    namespace_for,
)
from .sparse import PagedDecodeCache, check_paged_decode

__all__ = [
    "GenerateResult",
    "ModelKV",
    "PagedDecodeCache",
    "PrefixNotUsedError",
    "TierKV",
    "TierKVCache",
    "UnsupportedModelError",
    "cache_argument",
    "describe_model",
    "fingerprint_weights",
    "namespace_for",
    "tierkv_attention_for",
]


@dataclass(frozen=True)
class GenerateResult:
    """What `generate` returned, and what reuse did, one list entry per prompt row.

    `recomputed` is empty, or why the stored prefix could not be used and the whole prompt was
    computed instead (then `reused_tokens` are all 0).
    """

    sequences: torch.Tensor
    prompt_tokens: list[int]
    reused_tokens: list[int]
    computed_tokens: list[int]
    stored_blocks: int
    recomputed: str = ""


class TierKV:
    """One model's prefix reuse: the model, its `BlockStore`, and caches built for its prompts.

    `config` sizes the store's tiers (`StoreConfig`); `block_tokens` is the tokens per stored
    block. `name`, `weights_fingerprint` and `adapter` override the model's identity (see
    `model_namespace`). Models whose cache is not plain per-layer K/V raise `UnsupportedModelError`.

    `decode_budget` (a `DecodeBudget`, an int of pages or a float fraction of each sequence's
    pages) decodes with token-level preemption: only that many pages of each row's KV stay on
    the device, the rest in host memory, fetched when a query selects them (docs/preemption.md).
    `1.0` is exact mode (every page, the same tokens as dense decode). On a GPU each layer's
    decode step is replayed from CUDA graphs; `decode_cuda_graphs=False` runs it eagerly.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: StoreConfig | None = None,
        *,
        block_tokens: int = 16,
        name: str | None = None,
        weights_fingerprint: str | None = None,
        adapter: str = "",
        decode_budget: DecodeBudget | int | float | None = None,
        decode_cuda_graphs: bool = True,
    ) -> None:
        if not isinstance(decode_cuda_graphs, bool):
            raise TypeError(f"decode_cuda_graphs must be a bool, got {decode_cuda_graphs!r}")
        self.model = model
        self.decode_cuda_graphs = decode_cuda_graphs
        self.model_kv: ModelKV = describe_model(model)
        self.decode_budget = DecodeBudget.parse(decode_budget)
        if self.decode_budget is not None:
            check_paged_decode(model, self.model_kv)
        self.layout = self.model_kv.layout(block_tokens)
        self.namespace = model_namespace(model, name=name, weights_fingerprint=weights_fingerprint, adapter=adapter)
        self.store = BlockStore(self.layout, self.namespace, config)
        self.watch = CacheWatch(model)

    def close(self) -> None:
        self.watch.remove()
        self.store.close()

    def __enter__(self) -> TierKV:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cache(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        tenant: str | None = None,
        save_prompt: bool = True,
        load: bool = True,
        record_reply: bool = True,
        max_new_tokens: int | None = None,
    ) -> TierKVCache:
        """A cache holding the stored prefix of each prompt row, for `model.generate(..., **cache_argument(cache))`.

        The model's forward checks that it is used (`PrefixNotUsedError` otherwise); see `TierKVCache`
        for `save_prompt`, `load` and `record_reply`. With `decode_budget`, a `PagedDecodeCache`
        sized for `max_new_tokens` reply tokens (default: the model's generation config).
        """
        if self.decode_budget is not None:
            reply = max_new_tokens if max_new_tokens is not None else _reply_tokens(self.model.generation_config, input_ids)
            paged = PagedDecodeCache(self.store, self.model_kv, input_ids, attention_mask, budget=self.decode_budget,
                                     max_new_tokens=reply, tenant=tenant, save_prompt=save_prompt, load=load,
                                     cuda_graphs=self.decode_cuda_graphs)
            paged._watch = self.watch
            return paged
        cache = TierKVCache(
            self.store, self.model_kv, input_ids, attention_mask,
            tenant=tenant, save_prompt=save_prompt, load=load, record_reply=record_reply,
        )
        cache._watch = self.watch
        return cache

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        generation_config: GenerationConfig | None = None,
        streamer: BaseStreamer | None = None,
        store_generated: bool = False,
        tenant: str | None = None,
    ) -> GenerateResult:
        """`model.generate` with prefix reuse; with `store_generated`, the reply's blocks are stored too.

        `generation_config` defaults to the model's; greedy and sampling work, beam search and
        several sequences per prompt do not (one cache row per prompt row).
        """
        config = copy.deepcopy(generation_config if generation_config is not None else self.model.generation_config)
        if max_new_tokens is not None:
            config.max_new_tokens = max_new_tokens
        if generation_config is None or config.use_cache is None:
            # Explicit: a model whose default is use_cache=False (MPT) would otherwise lend generate that
            # default, which then feeds the whole sequence at every step on top of the filled cache.
            config.use_cache = True
        _check_generation_config(config)
        if store_generated and self.decode_budget is not None:
            raise ValueError("store_generated=True is not supported with decode_budget: the reply's KV stays in pages")
        reply = _reply_tokens(config, input_ids)
        if attention_mask is None:
            # Explicit, so generate does not guess padding from pad_token_id behind the cache's back.
            left_padded_rows(input_ids, None)
            attention_mask = torch.ones_like(input_ids)
        cache = self.cache(input_ids, attention_mask, tenant=tenant, record_reply=store_generated, max_new_tokens=reply)
        recomputed = ""
        try:
            sequences = self._generate(input_ids, attention_mask, cache, config, streamer)
        except PrefixNotUsedError as e:
            if e.cache is not cache:
                raise
            # Raised before anything was produced or stored: by the forward hook before the model ran, or
            # at the prompt's last layer when a block it loaded failed its checksum.
            cache.release_loads()
            recomputed = str(e)
            warnings.warn(f"tierkv recomputed the whole prompt: {e}", RuntimeWarning, stacklevel=2)
            cache = self.cache(input_ids, attention_mask, tenant=tenant, load=False, record_reply=store_generated,
                               max_new_tokens=reply)
            sequences = self._generate(input_ids, attention_mask, cache, config, _AfterPrompt(streamer) if streamer else None)
        if store_generated:
            cache.save_sequences(sequences)
        return GenerateResult(
            sequences=sequences,
            prompt_tokens=cache.prompt_tokens,
            reused_tokens=cache.reused_tokens,
            computed_tokens=cache.computed_tokens,
            stored_blocks=cache.stored_blocks,
            recomputed=recomputed,
        )

    def _generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: TierKVCache,
        config: GenerationConfig,
        streamer: BaseStreamer | None,
    ) -> torch.Tensor:
        cache.arm()
        own = self.decode_budget is not None or uses_sdpa(self.model)
        attention = tierkv_attention_for(self.model) if own else contextlib.nullcontext()
        try:
            with attention:
                # PreTrainedModel lacks GenerationMixin in transformers 5 (the causal-LM classes add it)
                sequences = self.model.generate(  # type: ignore[operator]
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    streamer=streamer,
                    **cache_argument(cache),
                )
        finally:
            self.watch.armed.discard(cache)
        cache.wait_saved()
        if cache.loaded and not cache.prefilled:
            # The hooks make this unreachable unless the model was called some other way (compiled, ...).
            raise TierKVError(
                f"{type(self.model).__name__}.generate returned without writing the prompt into the TierKVCache "
                f"holding {cache.reused_tokens} stored tokens per row: its output was computed without that prefix"
            )
        return sequences


class _AfterPrompt(BaseStreamer):
    """A streamer that skips the prompt: it was already put once, by the attempt that could not use the prefix."""

    def __init__(self, inner: BaseStreamer) -> None:
        self.inner = inner
        self.prompt_skipped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_skipped:
            self.prompt_skipped = True
            return
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


def _reply_tokens(config: GenerationConfig, input_ids: torch.Tensor) -> int:
    """The most tokens `generate` adds under `config` (max_new_tokens, else max_length past the prompt)."""
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    return max(0, int(config.max_length or 20) - int(input_ids.shape[-1]))


def _check_generation_config(config: GenerationConfig) -> None:
    # Unset fields are None in transformers 5 and mean the defaults (1 beam, 1 sequence).
    if (config.num_beams or 1) != 1:
        raise ValueError(
            f"num_beams={config.num_beams}: beam search is not supported with prefix reuse (one cache row per prompt)"
        )
    if (config.num_return_sequences or 1) != 1:
        raise ValueError(
            f"num_return_sequences={config.num_return_sequences}: several sequences per prompt are not supported "
            "with prefix reuse; repeat the prompt in the batch instead"
        )
    if config.cache_implementation not in (None, "dynamic"):
        raise ValueError(
            f"cache_implementation={config.cache_implementation!r}: tierkv fills a plain DynamicCache; "
            "quantized, static and offloaded caches cannot hold the stored blocks"
        )
    config.cache_implementation = None  # generate refuses a cache object next to any cache_implementation
    if config.prefill_chunk_size is not None:
        raise ValueError(
            f"prefill_chunk_size={config.prefill_chunk_size}: chunked prefill is not supported with prefix reuse; "
            "the stored prefix already spares most of the prompt"
        )
    if config.use_cache is False:
        raise ValueError("use_cache=False: prefix reuse needs the KV cache")
    if config.return_dict_in_generate:
        raise ValueError("return_dict_in_generate=True is not supported by TierKV.generate; use TierKV.cache with model.generate")
