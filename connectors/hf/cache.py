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
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tierkv import BlockStore, CapacityError, LayoutMismatchError, TierKVError

from .blocks import copy_blocks_to_tokens, tokens_to_blocks
from .model import ModelKV


def _filled_kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer of a `TierKVCache` after prefill: a `DynamicCache` made without a
    config has plain `DynamicLayer`s, and prefill has run through every one of them."""
    assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


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


class TierKVCache(DynamicCache):
    """A `DynamicCache` pre-filled from a `BlockStore` with the longest stored prefix of each prompt.

    Pass it as `past_key_values` to `model.generate(input_ids, attention_mask=..., ...)` with the
    same `input_ids` and `attention_mask` it was built from; a first forward pass that does not
    complete exactly that prompt raises `TierKVError`. When that pass has run through the last
    layer, the cache stores the prompts' new full blocks (unless `save_prompt=False`);
    `save_sequences` stores the generated tokens' blocks too.

    At least the last prompt token is always computed, so there are logits to sample from. One
    cache serves one `generate` call: beam search and `num_return_sequences > 1` reshape the
    batch and are refused. For a direct `model(...)` call on a left-padded batch, pass
    `position_ids` from the attention mask as `generate` does, or the KV stored is that of
    shifted positions.

    Attributes, one entry per row: `prompt_tokens` (without padding), `hit_tokens` (stored
    prefix found), `reused_tokens` (tokens whose KV came from the store), `computed_tokens`
    (prompt tokens the model computes). `stored_blocks` counts blocks this cache newly stored.
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
    ) -> None:
        expected = model_kv.layout(store.layout.block_tokens)
        if store.layout != expected:
            raise LayoutMismatchError(
                "the store's layout does not match the model's KV: " + "; ".join(store.layout.differences(expected))
            )
        rows = left_padded_rows(input_ids, attention_mask)
        bt = store.layout.block_tokens
        home = model_kv.layer_devices[0]
        found = [store.get(tokens, device=home, tenant=tenant) for _, tokens in rows]
        hits = [blocks.shape[0] * bt for blocks in found]
        # Columns before `start` are padding or stored KV in every row; the last token is always computed.
        start = min(pad + min(hit, len(tokens) - 1) for (pad, tokens), hit in zip(rows, hits))
        reused = [max(0, start - pad) for pad, _ in rows]
        if start > 0:
            layout = store.layout
            shape = (layout.num_layers, 2, len(rows), layout.num_kv_heads, start, layout.head_dim)
            kv = torch.empty(shape, dtype=layout.dtype, device=home)
            for i, ((pad, _), blocks, n) in enumerate(zip(rows, found, reused)):
                kv[:, :, i, :, : min(pad, start)].zero_()  # padding: hidden by the mask, but never garbage
                if n:
                    copy_blocks_to_tokens(blocks, kv[:, :, i, :, pad:start])
            data = [(kv[layer, 0].to(dev), kv[layer, 1].to(dev)) for layer, dev in enumerate(model_kv.layer_devices)]
            super().__init__(ddp_cache_data=data)
        else:
            super().__init__()
        self.store = store
        self.tenant = tenant
        self._rows = rows
        self._batch = len(rows)
        self._prompt_columns = input_ids.shape[1]
        self._prompt_ids = input_ids.detach().cpu()
        self._last_layer = store.layout.num_layers - 1
        self._start = start
        self._save_prompt = save_prompt
        self._prefilled = False
        self.prompt_tokens = [len(tokens) for _, tokens in rows]
        self.hit_tokens = hits
        self.reused_tokens = reused
        self.computed_tokens = [len(tokens) - n for (_, tokens), n in zip(rows, reused)]
        self.stored_blocks = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`DynamicCache.update` (same signature, forwarded whole), then store the prompt once prefill is done."""
        if key_states.shape[0] != self._batch:
            raise TierKVError(
                f"this TierKVCache was built for {self._batch} prompt row(s) but the model ran {key_states.shape[0]}; "
                "beam search and num_return_sequences > 1 are not supported with prefix reuse"
            )
        if not self._prefilled and layer_idx == 0 and self._start + key_states.shape[-2] != self._prompt_columns:
            # The loaded KV belongs to the prompt the cache was built for; any other prompt would
            # attend to it, and its KV would be stored under that prompt's keys.
            raise TierKVError(
                f"the first forward pass brings the cache to {self._start + key_states.shape[-2]} columns, but this "
                f"TierKVCache was built for a prompt of {self._prompt_columns}: pass the input_ids and attention_mask "
                "it was built from, and compute the rest of the prompt in one forward pass (no chunked prefill)"
            )
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if not self._prefilled and layer_idx == self._last_layer:
            self._prefilled = True
            if self._save_prompt:
                self._store([tokens for _, tokens in self._rows])
        return keys, values

    def save_sequences(self, sequences: torch.Tensor) -> int:
        """Store the full blocks of prompt + generated tokens whose KV this cache holds; returns new blocks.

        `sequences` is what `generate` returned for this cache's prompts. The last generated token
        has no KV yet (it was never fed back), so it is not stored.
        """
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.shape[0] != self._batch:
            raise ValueError(f"sequences must be a [{self._batch}, tokens] tensor returned by generate for these prompts")
        seqs = sequences.detach().cpu()
        if seqs.shape[1] < self._prompt_columns or not torch.equal(seqs[:, : self._prompt_columns], self._prompt_ids):
            raise ValueError("sequences do not start with the prompts this cache was built for")
        columns = min(seqs.shape[1], self.get_seq_length())
        before = self.stored_blocks
        self._store([seqs[i, pad:columns].numpy() for i, (pad, _) in enumerate(self._rows)])
        return self.stored_blocks - before

    def _store(self, row_tokens: list[np.ndarray]) -> None:
        """Put the full blocks of each row's `row_tokens`, whose KV sits at columns `pad:` of the cache."""
        bt = self.store.layout.block_tokens
        for i, ((pad, _), tokens, hit) in enumerate(zip(self._rows, row_tokens, self.hit_tokens)):
            full = len(tokens) // bt * bt
            if full <= hit:  # every full block was found stored when the cache was built
                continue
            first = hit // bt  # blocks that were loaded from the store: only the rest is converted
            start = pad + first * bt
            layer_kv = [_filled_kv(layer) for layer in self.layers]
            keys = [k[i, :, start : pad + full].detach() for k, _ in layer_kv]
            values = [v[i, :, start : pad + full].detach() for _, v in layer_kv]
            home = keys[0].device
            blocks = tokens_to_blocks([k.to(home) for k in keys], [v.to(home) for v in values], bt)
            try:
                self.stored_blocks += self.store.put(tokens[:full], blocks, tenant=self.tenant, first_block=first)
            except CapacityError as e:
                warnings.warn(f"tierkv stored no KV for row {i}: {e}", RuntimeWarning, stacklevel=3)
