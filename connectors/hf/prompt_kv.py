"""The prompt's KV in one buffer per layer: stored blocks loaded straight into it, the rest written by prefill.

`PromptKV` holds `[layers, 2, batch, kv_heads, columns, head_dim]` for a left-padded batch of
prompts and binds each row to the store as an `EngineKV` in the transformers order (`HBNC`), so
the store's own front door moves the blocks: `load_layers` copies stored blocks host -> GPU
layer by layer (verified on the GPU), and `save_from` gathers the prompt's new blocks out of the
same buffer (hashed on the GPU, one copy to pinned host). Nothing goes through `store.get`,
a temporary or a permute.

`PromptLayer` is the cache layer over one layer's buffer: before the prompt's forward pass it
holds the loaded columns; that pass first waits (on the GPU) for its layer's copy, then writes
its new K and V into the buffer in place instead of concatenating. So layer 0 computes while
layers 1.. are still arriving.

A block's checksum covers every layer, so a load is known intact only when its last layer is
in: `verified_rows()` (called once the forward pass has run through the last layer, before the
prompt is stored or any token is produced) says which rows lost a block they used.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from tierkv import BlockStore, CapacityError, DimOrder, EngineKV, EngineKVLayout, LayerLoad

from .model import ModelKV


@dataclass(frozen=True)
class RowBinding:
    """One prompt row of the buffer as the store sees it: its engine view and block table."""

    engine: EngineKV
    table: list[int]


class PromptKV:
    """One buffer for every layer's prompt K and V, rows bound to the store (see the module docstring).

    `columns` is the prompt's width (padding included); row `i` holds its tokens at columns
    `pads[i]:`. The buffer is `block_tokens`-aligned in length so every row is whole engine
    blocks of `gcd(block_tokens, pads)` tokens; `keys(l)` / `values(l)` are its first `columns`.
    """

    def __init__(self, model_kv: ModelKV, block_tokens: int, pads: Sequence[int], columns: int,
                 device: torch.device) -> None:
        self.columns = columns
        padded = -(-columns // block_tokens) * block_tokens
        shape = (model_kv.num_layers, 2, len(pads), model_kv.num_kv_heads, padded, model_kv.head_dim)
        self.kv = torch.empty(shape, dtype=model_kv.dtype, device=device)
        for i, pad in enumerate(pads):
            if pad:
                self.kv[:, :, i, :, :pad].zero_()  # padding: hidden by the mask, but never garbage
        g = math.gcd(block_tokens, *pads)
        layout = EngineKVLayout(DimOrder.HBNC, num_layers=model_kv.num_layers, num_blocks=padded // g, block_size=g,
                                num_kv_heads=model_kv.num_kv_heads, head_dim=model_kv.head_dim, dtype=model_kv.dtype)
        layers = range(model_kv.num_layers)
        self.rows = [
            RowBinding(EngineKV(layout, [(self.kv[layer, 0, i], self.kv[layer, 1, i]) for layer in layers]),
                       list(range(pad // g, padded // g)))
            for i, pad in enumerate(pads)
        ]

    def keys(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0, :, :, : self.columns]

    def values(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1, :, :, : self.columns]

    def load(self, store: BlockStore, row_tokens: Sequence[np.ndarray], tenant: str | None) -> PromptLoads:
        """Queue the stored prefix of each row into the buffer (layer by layer where the store can)."""
        return PromptLoads([store.load_layers(r.engine, r.table, tokens, tenant=tenant)
                            for r, tokens in zip(self.rows, row_tokens)])


class PromptLoads:
    """The per-row `LayerLoad`s of one `PromptKV`; released (finished) at the latest when collected."""

    def __init__(self, loads: list[LayerLoad]) -> None:
        self.loads = loads
        self._finalizer = weakref.finalize(self, _finish_all, loads)

    @property
    def ends(self) -> list[int]:
        """Blocks each row's load covers (if it verifies)."""
        return [load.end for load in self.loads]

    def wait(self, layer: int) -> None:
        """The current stream waits until layer `layer` of every row has arrived."""
        for load in self.loads:
            load.wait(layer)

    def finish(self) -> list[int]:
        """Verified blocks of each row (waits for the copies; see `LayerLoad.finish`)."""
        return [load.finish() for load in self.loads]


def _finish_all(loads: list[LayerLoad]) -> None:
    for load in loads:
        load.finish()


class PromptLayer(DynamicLayer):
    """A full-attention cache layer over one layer of a `PromptKV`: the loaded columns first, the prompt's in place.

    `before_prompt` runs once, at the prompt's update, before anything reads the buffer (it
    orders the current stream after the layer's load). Later updates (decode steps) grow the
    layer as `DynamicLayer` does.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int, before_prompt: Callable[[], None]) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self._buffer = (keys, values)
        self.keys, self.values = keys[:, :, :start], values[:, :, :start]
        self._start = start
        self._before_prompt: Callable[[], None] | None = before_prompt

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        before, self._before_prompt = self._before_prompt, None
        if before is None:
            return super().update(key_states, value_states, *args, **kwargs)
        before()
        keys, values = self._buffer
        if self._start + key_states.shape[-2] != keys.shape[-2]:  # not the prompt (the cache refuses that first)
            return super().update(key_states, value_states, *args, **kwargs)
        keys[:, :, self._start :].copy_(key_states)
        values[:, :, self._start :].copy_(value_states)
        self.keys, self.values = keys, values
        return keys, values


class BackgroundSave:
    """`store.save_from` of prompt rows, on a thread when the buffer is on a GPU (so the first token need not wait).

    The thread first waits (without the interpreter lock) for an event recorded on the caller's
    stream when the save is started, so it reads the prompt as the forward pass wrote it, and
    the lock is free for the caller's next steps meanwhile: a thread that synchronised inside
    the save's own checksum read-back would hold it until the GPU had caught up. `join()` waits
    and re-raises what the save raised; a `CapacityError` is a warning (nothing of that row stored).
    """

    def __init__(self, store: BlockStore, jobs: list[tuple[RowBinding, np.ndarray, int]], tenant: str | None,
                 on_gpu: bool) -> None:
        self.stored = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._store, self._jobs, self._tenant = store, jobs, tenant
        self._written: torch.cuda.Event | None = None
        if on_gpu and jobs:
            self._written = torch.cuda.Event()
            self._written.record()
            self._thread = threading.Thread(target=self._run, name="tierkv-hf-save", daemon=True)
            self._thread.start()
        else:
            self._run()

    def _run(self) -> None:
        try:
            if self._written is not None:
                self._written.synchronize()
            for i, (row, tokens, first) in enumerate(self._jobs):
                try:
                    self.stored += self._store.save_from(row.engine, row.table, tokens, first_block=first,
                                                         tenant=self._tenant)
                except CapacityError as e:
                    warnings.warn(f"tierkv stored no KV for row {i}: {e}", RuntimeWarning, stacklevel=2)
        except BaseException as e:  # noqa: BLE001 - kept for join(), which re-raises it in the caller's thread
            self._error = e
            if self._thread is not None:
                warnings.warn(f"tierkv could not store the prompt's blocks: {type(e).__name__}: {e}", RuntimeWarning,
                              stacklevel=2)
        finally:
            self._jobs = []  # the prompt buffer is the cache's to free from here on

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
