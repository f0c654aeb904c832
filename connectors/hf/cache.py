"""`TierKVCache`: a transformers `DynamicCache` that starts out holding the stored prefix of each prompt.

`model.generate` already knows how to continue from a filled cache: it feeds the model only the
prompt columns past `cache.get_seq_length()` and derives positions from the attention mask. So
reuse needs no change to transformers: fill the cache with the longest stored prefix before
`generate` starts, and write the prompt's new blocks back once prefill has computed them.

Batches are left-padded rectangles that share one cache length. Row `i` has `pad_i` padding
columns and `hit_i` stored tokens, so every column before `min_i(pad_i + hit_i)` is padding or
stored KV for every row; that is the cache length, and each row loads only its part of it
(padding columns hold zeros, which the attention mask hides). The forward pass then computes
`max_i(len_i - hit_i)` columns, the least any rectangular batch can.

Sliding-window and chunked-attention layers are rebuilt as transformers builds them: a
`DynamicSlidingWindowLayer` holding the last `W - 1` columns before the cache length, its
`cumulative_length` the cache length, so the cache is the one plain `generate` would hold after
computing the prefix itself. Their new KV is recorded as it is computed (the layer itself drops
what falls out of the window), so it can be stored.

Whether the model really used the loaded prefix is checked, not assumed: a model may drop the
cache it was given (Phi-3 / PhiMoE's `prepare_inputs_for_generation` does for LongRoPE prompts
past `original_max_position_embeddings`). `TierKV` hooks the model's forward: a forward that
runs without an armed cache, or gets one and does not fill it, raises `PrefixNotUsedError`
before any token is produced; `TierKV.generate` then recomputes the whole prompt.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any

import numpy as np
import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from tierkv import BlockStore, CapacityError, LayoutMismatchError, TierKVError

from .attention import hand_off
from .blocks import tokens_to_blocks
from .compat import CACHE_KEYWORD, given_cache
from .model import ModelKV
from .prompt_kv import BackgroundSave, PromptKV, PromptLayer, PromptLoads


def left_padded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple[int, np.ndarray]]:
    """`(padding, token ids)` of each row of a left-padded batch; anything else is refused."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise TypeError(
            f"input_ids must be a 2-D integer tensor [batch, tokens], got {getattr(input_ids, 'shape', type(input_ids))}"
        )
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids must hold at least one token in one row, got shape {tuple(input_ids.shape)}")
    ids = input_ids.detach().cpu()
    if attention_mask is None:
        return [(0, ids[i].numpy()) for i in range(batch)]
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {getattr(attention_mask, 'shape', type(attention_mask))}"
        )
    mask = attention_mask.detach().cpu().long()
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if (mask[:, 1:] < mask[:, :-1]).any() or not mask[:, -1].all():
        raise ValueError(
            "attention_mask must describe left padding (zeros, then ones up to the last column); "
            "set tokenizer.padding_side = 'left' for decoder-only generation"
        )
    pads = (mask == 0).sum(dim=1).tolist()
    return [(pad, ids[i, pad:].numpy()) for i, pad in enumerate(pads)]


def key_tenant(store: BlockStore, tenant: str | None, regime: str) -> str | None:
    """The tenant a cache's blocks are keyed under: the caller's, salted with the KV regime when there is one."""
    if tenant is not None and (not isinstance(tenant, str) or "\0" in tenant):
        raise ValueError(f"tenant must be a string without NUL characters, got {tenant!r}")
    if not regime:
        return tenant
    return f"{store.namespace.tenant if tenant is None else tenant}\0kv-regime:{regime}"


class PrefixNotUsedError(TierKVError):
    """The model ran without the `TierKVCache` it was given, or did not write into it: the stored prefix was not used.

    Raised from the model's forward hook before that forward computes anything, so no token was
    produced from a prompt computed without its prefix. `cache` is the cache that was passed by.
    """

    def __init__(self, message: str, cache: TierKVCache) -> None:
        super().__init__(message)
        self.cache = cache


class CacheWatch:
    """Forward hooks that check a model really uses the `TierKVCache`s handed to it (installed by `TierKV`).

    A cache is *armed* when `generate` takes it (or `TierKV.generate` arms it): the next forward
    of the model must receive it. Any forward that receives a cache holding a loaded prefix must
    leave it filled with the prompt. Either failure raises `PrefixNotUsedError`.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.armed: weakref.WeakSet[TierKVCache] = weakref.WeakSet()
        self._model_name = type(model).__name__
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed.clear()

    def _before(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        given = given_cache(kwargs)
        missed = [cache for cache in self.armed if cache is not given]
        self.armed.clear()
        if missed:
            cache = missed[0]
            cache.bypassed = True
            prepare = getattr(type(module), "prepare_inputs_for_generation", None)
            caller = getattr(prepare, "__qualname__", "prepare_inputs_for_generation")
            raise PrefixNotUsedError(
                f"{self._model_name} was called with {CACHE_KEYWORD}={type(given).__name__} instead of the TierKVCache "
                f"holding {cache.reused_tokens} stored tokens per row that generate was given ({caller} did not pass "
                "it on: Phi-3 / PhiMoE drop the cache when a LongRoPE prompt is longer than "
                "original_max_position_embeddings and the cache is not). Nothing was computed; TierKV.generate "
                "recomputes the whole prompt in this case",
                cache,
            )
        if isinstance(given, TierKVCache) and kwargs.get("use_cache") is False:
            given.bypassed = True
            raise PrefixNotUsedError(
                f"{self._model_name} was called with a TierKVCache and use_cache=False (the model's default "
                "generation config may say so): generate then feeds the whole sequence again at every step on top "
                "of the cache. Pass use_cache=True",
                given,
            )

    def _after(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        given = given_cache(kwargs)
        if isinstance(given, TierKVCache) and given.loaded and not given.prefilled:
            given.bypassed = True
            raise PrefixNotUsedError(
                f"{self._model_name}'s forward got a TierKVCache holding {given.reused_tokens} stored tokens per row "
                "but did not write the prompt's KV into it, so it did not attend to the stored prefix: "
                "its output is discarded",
                given,
            )


class TierKVCache(DynamicCache):
    """A `DynamicCache` pre-filled from a `BlockStore` with the longest stored prefix of each prompt.

    Pass it to `model.generate(input_ids, attention_mask=..., **cache_argument(cache))` (as `cache=`,
    or `past_key_values=` before transformers 5.20: `compat.cache_argument` knows which) with the
    same `input_ids` and `attention_mask` it was built from; a first forward pass that does not
    complete exactly that prompt raises `TierKVError`. When that pass has run through the last
    layer, the cache stores the prompts' new full blocks (unless `save_prompt=False`);
    `save_sequences` stores the generated tokens' blocks too. `load=False` looks nothing up (the
    whole prompt is computed) but still stores.

    At least the last prompt token is always computed, so there are logits to sample from. One
    cache serves one `generate` call: beam search and `num_return_sequences > 1` reshape the
    batch and are refused. For a direct `model(...)` call on a left-padded batch, pass
    `position_ids` from the attention mask as `generate` does, or the KV stored is that of
    shifted positions.

    Sliding-window layers keep only their window; the KV this cache's forwards compute for them
    is recorded besides, so that it can be stored. `record_reply=False` stops recording after the
    prompt (for long replies that will not be stored: `save_sequences` then refuses).

    Attributes, one entry per row: `prompt_tokens` (without padding), `hit_tokens` (stored
    prefix found), `reused_tokens` (tokens whose KV came from the store), `computed_tokens`
    (prompt tokens the model computes). `stored_blocks` counts blocks this cache newly stored.
    `prefilled` says the first forward pass wrote the prompt into the cache, that is, the loaded
    prefix was used; `kv_regime` is the model's KV regime for these prompts (`ModelKV.kv_regime`).
    """

    def __init__(
        self,
        store: BlockStore,
        model_kv: ModelKV,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        tenant: str | None = None,
        save_prompt: bool = True,
        load: bool = True,
        record_reply: bool = True,
    ) -> None:
        expected = model_kv.layout(store.layout.block_tokens)
        if store.layout != expected:
            raise LayoutMismatchError(
                "the store's layout does not match the model's KV: " + "; ".join(store.layout.differences(expected))
            )
        rows = left_padded_rows(input_ids, attention_mask)
        bt = store.layout.block_tokens
        home = model_kv.layer_devices[0]
        self.kv_regime = model_kv.kv_regime(max(len(tokens) for _, tokens in rows))
        self._key_tenant = key_tenant(store, tenant, self.kv_regime)
        windows = [model_kv.window(layer) for layer in range(model_kv.num_layers)]
        # The prompt's columns are written in place, and loaded layer by layer, when every layer keeps
        # them all on one device; else loads are finished here and the layers built from them.
        in_place = not model_kv.sliding and len(set(model_kv.layer_devices)) == 1
        prompt: PromptKV | None = None
        loads: PromptLoads | None = None
        hits = [0] * len(rows)
        if load:
            prompt = PromptKV(model_kv, bt, [pad for pad, _ in rows], input_ids.shape[1], home)
            loads = prompt.load(store, [tokens for _, tokens in rows], self._key_tenant)
            hits = [n * bt for n in (loads.ends if in_place else loads.finish())]
        # Columns before `start` are padding or stored KV in every row; the last token is always computed.
        start = min(pad + min(hit, len(tokens) - 1) for (pad, tokens), hit in zip(rows, hits))
        reused = [max(0, start - pad) for pad, _ in rows]
        if start == 0:
            if loads is not None:
                loads.finish()
            prompt = loads = None
        if start == 0 and not model_kv.sliding:
            # As empty as a fresh DynamicCache: layers appear at the first update (an empty cache is falsy, as
            # plain generate's is before its first forward pass).
            super().__init__()
        elif in_place:
            assert prompt is not None and loads is not None
            layers: list[DynamicLayer] = [
                PromptLayer(prompt.keys(layer), prompt.values(layer), start, functools.partial(loads.wait, layer))
                for layer in range(model_kv.num_layers)
            ]
            Cache.__init__(self, layers=list(layers))
        else:
            layers = [DynamicLayer() if w is None else DynamicSlidingWindowLayer(sliding_window=w) for w in windows]
            if prompt is not None:
                for index, (layer, window, dev) in enumerate(zip(layers, windows, model_kv.layer_devices)):
                    keys, values = prompt.keys(index)[:, :, :start], prompt.values(index)[:, :, :start]
                    if window is not None:
                        # What DynamicSlidingWindowLayer.update keeps of `start` tokens: the last window - 1
                        # (the same slice, so the same tensor).
                        keys, values = keys[:, :, -window + 1 :, :], values[:, :, -window + 1 :, :]
                    keys, values = keys.to(dev), values.to(dev)
                    layer.lazy_initialization(keys, values)
                    layer.keys, layer.values = keys, values
                    if isinstance(layer, DynamicSlidingWindowLayer):
                        layer.cumulative_length = start
            prompt = loads = None  # the layers hold what they keep; the prompt is stored from them
            Cache.__init__(self, layers=list(layers))
        self._prompt = prompt
        self._loads = loads
        self._save: BackgroundSave | None = None
        # With the prompt in one buffer and no row padded, the prompt pass's mask is exactly causal with the
        # queries at the end of the keys: `attention` computes it so, without the materialised mask.
        self._lower_right = prompt is not None and all(pad == 0 for pad, _ in rows)  # `prompt` only when in place
        self.store = store
        self.tenant = tenant
        self.model_kv = model_kv
        self._rows = rows
        self._batch = len(rows)
        self._prompt_columns = input_ids.shape[1]
        self._prompt_ids = input_ids.detach().cpu()
        self._last_layer = store.layout.num_layers - 1
        self._start = start
        self._save_prompt = save_prompt
        self._record_reply = record_reply
        self._windows = windows
        # Per sliding layer: the K and V computed by this cache's forwards, columns `start:` of the cache.
        self._computed: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {
            i: ([], []) for i, w in enumerate(windows) if w is not None
        }
        self._watch: CacheWatch | None = None
        self._user_defined = False
        self.prefilled = False
        self.bypassed = False
        self.prompt_tokens = [len(tokens) for _, tokens in rows]
        self.hit_tokens = hits
        self.reused_tokens = reused
        self.computed_tokens = [len(tokens) - n for (_, tokens), n in zip(rows, reused)]
        self.stored_blocks = 0

    @property
    def loaded(self) -> bool:
        """Whether the cache holds stored KV (the model must attend to it)."""
        return self._start > 0

    @property
    def _is_user_defined(self) -> bool:
        return self._user_defined

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        # `generate` marks a cache passed by the caller: from here on its next forward must receive it.
        self._user_defined = value
        if value:
            self.arm()

    def arm(self) -> None:
        """Expect the model's next forward pass to receive this cache (no-op unless built by `TierKV` and loaded)."""
        if self._watch is not None and self.loaded and not self.prefilled:
            self._watch.armed.add(self)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`DynamicCache.update` (same signature, forwarded whole), then store the prompt once prefill is done."""
        if key_states.shape[0] != self._batch:
            raise TierKVError(
                f"this TierKVCache was built for {self._batch} prompt row(s) but the model ran {key_states.shape[0]}; "
                "beam search and num_return_sequences > 1 are not supported with prefix reuse"
            )
        if not self.prefilled and layer_idx == 0 and self._start + key_states.shape[-2] != self._prompt_columns:
            # The loaded KV belongs to the prompt the cache was built for; any other prompt would
            # attend to it, and its KV would be stored under that prompt's keys.
            raise TierKVError(
                f"the first forward pass brings the cache to {self._start + key_states.shape[-2]} columns, but this "
                f"TierKVCache was built for a prompt of {self._prompt_columns}: pass the input_ids and attention_mask "
                "it was built from, and compute the rest of the prompt in one forward pass (no chunked prefill)"
            )
        hand_off(self)
        record = self._computed.get(layer_idx)
        if record is not None and (not self.prefilled or self._record_reply):
            record[0].append(key_states.detach())
            record[1].append(value_states.detach())
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if not self.prefilled and layer_idx == self._last_layer:
            self._check_loads()
            self.prefilled = True
            if self._save_prompt:
                self._store_prompt()
            self._prompt = None  # the layers hold the prompt's KV from here on (or a page manager takes it)
            if not self._record_reply:
                self._computed = {i: ([], []) for i in self._computed}
        return keys, values

    def attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scaling: float | None, dropout: float, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The prompt pass's attention over the loaded prefix, as lower-right causal sdpa with GQA; else None (sdpa).

        Called by `tierkv_attention` (the model runs inside `tierkv_attention_for`, as `TierKV.generate` does).
        Only where that is exactly transformers' own mask: no padding, a causal layer of full attention, no
        soft-capping or sinks, no dropout, and this layer's keys are the whole prompt.
        """
        q_len, k_len = query.shape[2], key.shape[2]
        if not (self._lower_right and 1 < q_len < k_len == self._prompt_columns and q_len == k_len - self._start):
            return None
        if any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sinks", "sliding_window")):
            return None
        if (dropout and module.training) or not getattr(module, "is_causal", False):
            return None
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=causal_lower_right(q_len, k_len), scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous()

    def _check_loads(self) -> None:
        """Before the prompt is stored or a token produced: every stored block this pass used passed its checksum.

        Loads arrive layer by layer and are verified only once the last layer is in (a checksum
        covers all layers); a row that lost a block it used raises `PrefixNotUsedError`, so this
        forward's output is never used (`TierKV.generate` recomputes the prompt; the corrupt copy
        is gone from the store).
        """
        if self._loads is None:
            return
        loads, self._loads = self._loads, None
        bt = self.store.layout.block_tokens
        verified = loads.finish()
        lost = [i for i, (n, used) in enumerate(zip(verified, self.reused_tokens)) if n * bt < used]
        if lost:
            self.bypassed = True
            raise PrefixNotUsedError(
                f"a stored block of row {lost[0]} failed its checksum once it had reached the GPU (its copy was dropped "
                "from the store); this forward pass attended to it, so its output is discarded: TierKV.generate "
                "recomputes the prompt",
                self,
            )

    def release_loads(self) -> None:
        """Finish the loads a forward pass never consumed (their blocks stay leased until then)."""
        if self._loads is not None:
            loads, self._loads = self._loads, None
            loads.finish()

    def _store_prompt(self) -> None:
        """Store each row's new full prompt blocks: from the prompt buffer in the background on a GPU, else now."""
        row_tokens = [tokens for _, tokens in self._rows]
        if self._prompt is None:
            self._store(row_tokens)
            return
        bt = self.store.layout.block_tokens
        jobs = [(row, tokens[: len(tokens) // bt * bt], hit // bt)
                for row, tokens, hit in zip(self._prompt.rows, row_tokens, self.hit_tokens) if len(tokens) // bt * bt > hit]
        self._save = BackgroundSave(self.store, jobs, self._key_tenant, self._prompt.kv.is_cuda)
        if not self._prompt.kv.is_cuda:
            self.wait_saved()

    def wait_saved(self) -> None:
        """Wait until the prompt's blocks are stored (on a GPU they are written in the background after prefill).

        Re-raises what that save raised. `TierKV.generate` calls this before it returns.
        """
        if self._save is not None:
            save, self._save = self._save, None
            try:
                save.join()
            finally:
                self.stored_blocks += save.stored

    def save_sequences(self, sequences: torch.Tensor) -> int:
        """Store the full blocks of prompt + generated tokens whose KV this cache holds; returns new blocks.

        `sequences` is what `generate` returned for these prompts. The last generated token has
        no KV yet (it was never fed back), so it is not stored. Under LongRoPE's short regime only
        tokens before the switch point are stored: a pass past it rotates with the long factors.
        """
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.shape[0] != self._batch:
            raise ValueError(f"sequences must be a [{self._batch}, tokens] tensor returned by generate for these prompts")
        seqs = sequences.detach().cpu()
        if seqs.shape[1] < self._prompt_columns or not torch.equal(seqs[:, : self._prompt_columns], self._prompt_ids):
            raise ValueError("sequences do not start with the prompts this cache was built for")
        columns = min(seqs.shape[1], self.get_seq_length())
        switch = self.model_kv.longrope_switch
        if switch is not None and not self.kv_regime:
            # A decode step at column c runs positions up to c - min(pad): past the switch it is the long regime.
            columns = min(columns, min(pad for pad, _ in self._rows) + switch)
        if columns > self._prompt_columns and self._computed and not self._record_reply:
            raise ValueError(
                "this cache was built with record_reply=False: its sliding-window layers kept no KV of the reply to store"
            )
        self.wait_saved()  # the prompt's blocks first: the chain must not have a gap
        before = self.stored_blocks
        self._store([seqs[i, pad:columns].numpy() for i, (pad, _) in enumerate(self._rows)])
        return self.stored_blocks - before

    def _layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The K and V this cache holds for one layer, and the cache column their first token sits at."""
        record = self._computed.get(layer_idx)
        if record is None:
            layer = self.layers[layer_idx]
            # Built from DynamicLayers (or lazily by DynamicCache), and prefill has run through every one.
            assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
            return layer.keys, layer.values, 0
        keys, values = record
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2), self._start

    def _store(self, row_tokens: list[np.ndarray]) -> None:
        """Put the full blocks of each row's `row_tokens`, whose KV sits at columns `pad:` of the cache."""
        bt = self.store.layout.block_tokens
        per_layer: list[tuple[torch.Tensor, torch.Tensor, int]] | None = None
        for i, ((pad, _), tokens, hit) in enumerate(zip(self._rows, row_tokens, self.hit_tokens)):
            full = len(tokens) // bt * bt
            if full <= hit:  # every full block was found stored when the cache was built
                continue
            if per_layer is None:
                per_layer = [self._layer_kv(layer) for layer in range(len(self.layers))]
            first = hit // bt  # blocks that were loaded from the store: only the rest is converted
            start, end = pad + first * bt, pad + full
            keys = [k[i, :, start - at : end - at].detach() for k, _, at in per_layer]
            values = [v[i, :, start - at : end - at].detach() for _, v, at in per_layer]
            home = keys[0].device
            blocks = tokens_to_blocks([k.to(home) for k in keys], [v.to(home) for v in values], bt)
            try:
                self.stored_blocks += self.store.put(tokens[:full], blocks, tenant=self._key_tenant, first_block=first)
            except CapacityError as e:
                warnings.warn(f"tierkv stored no KV for row {i}: {e}", RuntimeWarning, stacklevel=3)
