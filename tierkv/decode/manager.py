"""`PageManager`: the decode-time residency of sequences' KV pages, per layer, under a GPU page budget.

Every page has a home row in a host pool (pinned when CUDA is there), written once the page is
full, so evicting a page from the device never loses or copies anything: the host copy is exact.
The device pool of each layer holds the pages the latest step selected, up to each sequence's
budget; the page being written (the tail) is always resident and is written back when it fills.

A step (`append` + `attend`) is device-resident and does not synchronise: what depends on the
data (scores, which pages are resident, which slots give way) lives in device tensors
(`residency.Residency`) and is computed with fixed-shape ops; the host keeps only what it knows
without looking: token counts, budgets, the host pool's free rows, context lengths. So:

- `select` scores pages on the device and picks them with one `topk` (`selection.choose_pages`);
- `attend` pairs the selected pages that are not resident with victim slots (`Residency.place`)
  and fetches them with one `copy_rows` launch over fixed-length index lists in which entries
  with nothing to copy are -1 (`tierkv.ops.transfer.copy_rows_where`): the host never learns
  how many pages came up;
- a step in which no page opens copies nothing host -> device (the attention's context
  lengths are computed on the device); one in which pages open uploads their host rows
  (small, pinned, non_blocking).

Each of `append` and `attend` is a host half (checks, token counts, budgets, the step's padded
shape `_Shape`) and a device half (`_write_token`, `_attend_layer`) that reads nothing from the
host but that shape. With `cuda_graphs=True` the device halves are replayed from CUDA graphs
(`graphs.StepGraphs`), one per layer, batch and shape: the step's few hundred small kernels
then cost their GPU time, not their Python launch time.

With `DecodeBudget.select_every` n > 1 only every n-th step of a layer and batch selects (and
fetches); the steps between (`_attend_layer`, `reuse.KeptSelections`) attend to the kept
selection's pages that are still resident plus the current sinks and window: a handful of
kernels and no copy. `plan_step` does a whole step's host half for every layer up front, so
the device halves (`append_planned`, `attend_planned`) can be captured as one graph.

`add` and `remove` are rare and may synchronise (`add` counts the slots that can be freed
before it changes anything, so a prompt that does not fit raises `CapacityError` with nothing changed).

Layers are independent: each has its own pools, digests and selection, since a layer's query is
known only when the model reaches it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from ..errors import CapacityError
from ..layout import KVLayout
from ..ops.staging import upload
from ..ops.transfer import copy_rows_where
from .attention import attend_pages
from .budget import DecodeBudget, share
from .graphs import StepGraphs
from .residency import LRU, NEVER, SCORE, Residency
from .reuse import Kept, KeptSelections
from .selection import choose_pages, page_scores
from .summaries import KeySummaries

NDArrayOrTensor = TypeVar("NDArrayOrTensor", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class StepStats:
    """What the latest `attend` call did for the whole batch. `fetched`/`evicted` read device counters
    (they synchronise; the next `attend` overwrites them)."""

    selected: int
    fetched_count: torch.Tensor  # 0-dim, on the device
    evicted_count: torch.Tensor

    @property
    def fetched(self) -> int:
        return int(self.fetched_count)

    @property
    def evicted(self) -> int:
        return int(self.evicted_count)


@dataclass
class _Layer:
    dev: torch.Tensor  # [device_pages, 1, 2, bt, H, D]
    host: torch.Tensor  # [host_pages, 1, 2, bt, H, D]
    digest: KeySummaries
    res: Residency  # device slot of each page, page of each slot, last use, score: on the device
    host_slot: np.ndarray  # [max_seqs, max_pages] host row of each page, -1 none (host decision)
    host_slot_dev: torch.Tensor  # [max_seqs * max_pages] its device mirror
    free_host: list[int]
    tokens: np.ndarray  # [max_seqs] tokens written for each sequence in this layer
    tokens_dev: torch.Tensor  # its device mirror, advanced on the device by append
    exact: bool  # one of the budget's dense layers: every page resident, no selection
    step_dev: torch.Tensor  # 0-dim: this layer's attention steps, on the device (the residency's clock)
    budgets_dev: torch.Tensor  # [max_seqs] each sequence's share of the pool, updated in place (graphs read it)
    kept: KeptSelections  # selections kept for the steps between selections (`select_every`)
    open_stage: torch.Tensor  # a page open's host decisions for its device half, staged in place (graphs read it)
    budget_pages: np.ndarray | None = None  # the page counts `budgets` was computed for
    budgets: np.ndarray | None = None  # [max_seqs] each sequence's share of the pool

    @property
    def dev_slot(self) -> torch.Tensor:
        """`[max_seqs, max_pages]` device slot of each page, -1 not resident (a device tensor)."""
        return self.res.table


@dataclass(frozen=True)
class StepPlan:
    """One decode step of a batch with every layer's host half done (`PageManager.plan_step`).

    `key` names the device work the step's `append_planned`/`attend_planned` calls launch:
    plans with equal keys launch the same kernels, with the same shapes, on the same buffers.
    So an engine can capture its whole decode step, model and page manager together, as one
    CUDA graph per key and replay it for every later plan with that key.
    """

    seqs: tuple[int, ...]
    key: Hashable
    serial: int  # which plan of the manager this is: only the latest may run
    batch: _Batch = field(repr=False)
    appends: tuple[_Append, ...] = field(repr=False)  # per layer: whether a page fills, the pages that open
    layers: tuple[_LayerStep, ...] = field(repr=False)


@dataclass(frozen=True)
class _Opening:
    """Pages that open in one layer's step: the shapes of the placement its device half runs.

    The host half decides the new pages' host rows and protected pages and stages them in
    `_Layer.open_stage`; the device half places them (`Residency.place`), so a captured step
    holds that work instead of the host launching it. `width` is padded like the other shapes.
    """

    rows: int  # rows of the batch whose page opens
    width: int  # their largest page count after the open, padded (`_padded`)


@dataclass(frozen=True)
class _Append:
    """The host half of a layer's append, for its device half: whether a page fills, the pages that open."""

    fills: bool
    opening: _Opening | None


@dataclass(frozen=True)
class _LayerStep:
    """What the host half of a layer's `attend` decided for its device half: shape, mode, the kept selection."""

    shape: _Shape
    mode: str  # "select", "merge" or "same" (`reuse.KeptSelections.plan`)
    kept: Kept | None


@dataclass(frozen=True)
class _Batch:
    """A list of sequences as the step needs it on both sides; cached, so a steady step uploads nothing."""

    rows: np.ndarray
    rows_dev: torch.Tensor
    classes: torch.Tensor  # [max_seqs] LRU for the batch's sequences, SCORE for the others
    run: int | None  # first row when the rows are consecutive (digests are then read as views)
    key: tuple[int, ...]  # the sequence list it was made for (its cache key, and its graphs')


@dataclass(frozen=True)
class _Shape:
    """What fixes a step's device work besides the batch: padded selection and page widths (`_padded`)."""

    k: int  # selected pages per row, padded
    width: int  # pages scored per row, padded
    exact: bool  # every row takes all its pages: no scores
    roomy: bool  # the batch is every sequence held, within budgets that fit the pool (`Residency.place`)


def _padded(n: int, cap: int) -> int:
    """`n` rounded up to one of a few sizes per octave (at most 1/8 more, at most `cap`): shapes stay
    the same for many steps, so a captured step is replayed, not captured again, as sequences grow."""
    grain = max(16, 1 << max(0, n.bit_length() - 4))
    return min(cap, -(-n // grain) * grain)


def _pinned(shape: tuple[int, ...], dtype: torch.dtype, want: bool) -> torch.Tensor:
    if want and torch.cuda.is_available():
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    return torch.zeros(shape, dtype=dtype)


class PageManager:
    """KV pages of up to `max_seqs` sequences of up to `max_pages` pages each, for every layer of `layout`.

    `device_pages` is the device pool of each layer (shared by all sequences); `host_pages` the
    host pool of each layer, the home of every page. `layout.block_tokens` is the page size.
    `cuda_graphs` (CUDA only): replay each layer's steady `append` and `attend` from CUDA graphs
    (`graphs.StepGraphs`), which takes the Python launch cost out of the step; results are the
    same as without.
    """

    def __init__(self, layout: KVLayout, budget: DecodeBudget, *, device_pages: int, host_pages: int, max_seqs: int,
                 max_pages: int, device: torch.device | str = "cpu", cuda_graphs: bool = False) -> None:
        if layout.kv_factor != 2:
            raise ValueError("decode paging needs separate K and V (kv_factor 2)")
        for name, value in (("device_pages", device_pages), ("host_pages", host_pages), ("max_seqs", max_seqs),
                            ("max_pages", max_pages)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PageManager {name} must be a positive int, got {value!r}")
        if device_pages < budget.sink_pages + budget.window_pages:
            raise ValueError(
                f"device_pages={device_pages} cannot hold one sequence's sinks + window "
                f"({budget.sink_pages} + {budget.window_pages} pages)"
            )
        self.layout = layout
        self.budget = budget
        self.device = torch.device(device)
        self.page_layout = KVLayout(1, 2, layout.num_kv_heads, layout.head_dim, layout.dtype, layout.block_tokens)
        self.device_pages, self.host_pages = device_pages, host_pages
        self.max_seqs, self.max_pages = max_seqs, max_pages
        shape = self.page_layout.block_shape
        # The budget's first `dense_layers` layers keep every page resident: a pool the size of the host's.
        pools = [host_pages if i < budget.dense_layers else device_pages for i in range(layout.num_layers)]
        self.layers = [
            _Layer(
                dev=torch.zeros((pool, *shape), dtype=layout.dtype, device=self.device),
                host=_pinned((host_pages, *shape), layout.dtype, self.device.type == "cuda"),
                digest=KeySummaries(max_seqs, max_pages, layout.num_kv_heads, layout.head_dim, self.device),
                res=Residency(max_seqs, max_pages, pool, self.device),
                host_slot=np.full((max_seqs, max_pages), -1, np.int64),
                host_slot_dev=torch.full((max_seqs * max_pages,), -1, dtype=torch.int64, device=self.device),
                free_host=list(range(host_pages - 1, -1, -1)),
                tokens=np.zeros(max_seqs, np.int64),
                tokens_dev=torch.zeros(max_seqs, dtype=torch.int64, device=self.device),
                exact=i < budget.dense_layers,
                step_dev=torch.zeros((), dtype=torch.int64, device=self.device),
                kept=KeptSelections(budget.select_every, budget.window_pages, self.device),
                budgets_dev=torch.zeros(max_seqs, dtype=torch.int64, device=self.device),
                open_stage=torch.zeros(max_seqs * (4 + 2 * (budget.sink_pages + budget.window_pages)),
                                       dtype=torch.int64, device=self.device),
            )
            for i, pool in enumerate(pools)
        ]
        self.active = np.zeros(max_seqs, bool)
        self.step = 0  # attention steps so far, all layers (each layer counts its own on the device: `step_dev`)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, the page manager is on {self.device}")
        self.graphs = StepGraphs(self.device) if cuda_graphs else None
        self._fetched = torch.zeros((), dtype=torch.int64, device=self.device)
        self._evicted = torch.zeros((), dtype=torch.int64, device=self.device)
        self._last_fetched = torch.zeros((), dtype=torch.int64, device=self.device)  # the latest attend's counts
        self._last_evicted = torch.zeros((), dtype=torch.int64, device=self.device)
        self._batches: dict[tuple[int, ...], _Batch] = {}
        self._plans = 0  # plans made (`plan_step`)
        self._generation = 0  # bumped when buffers a plan's key stands for are replaced
        self.last_step: StepStats | None = None

    # -- sizes and counters (reading them may synchronise) -------------------------------

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one layer (K and V)."""
        return self.page_layout.block_bytes

    @property
    def fetched_pages(self) -> int:
        """Pages copied host -> device by `attend` so far (a device counter: reading it synchronises)."""
        return int(self._fetched)

    @property
    def evicted_pages(self) -> int:
        """Pages that gave up their device slot so far (synchronises when read)."""
        return int(self._evicted)

    def device_bytes(self) -> int:
        """Bytes of the device pools (every layer): the GPU memory the KV of all sequences takes."""
        return sum(layer.dev.shape[0] for layer in self.layers) * self.page_bytes

    def resident_pages(self, layer: int, seq: int) -> int:
        return int((self.layers[layer].dev_slot[seq] >= 0).sum())

    def num_tokens(self, seq: int, layer: int = 0) -> int:
        return int(self.layers[layer].tokens[seq])

    def _num_pages(self, tokens: NDArrayOrTensor) -> NDArrayOrTensor:
        """Page counts of token counts: numpy on the host, tensors on the device, the same formula."""
        return (tokens + self.layout.block_tokens - 1) // self.layout.block_tokens

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        """A small host array on the device: through pinned memory, non_blocking, on CUDA; a copy on CPU."""
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if self.device.type == "cuda":
            return upload(t, torch.cuda.current_stream(self.device))
        return t.clone().to(self.device)

    def _minimum(self, pages: np.ndarray) -> np.ndarray:
        return np.minimum(pages, self.budget.sink_pages + self.budget.window_pages)

    def _budgets(self, layer: _Layer, tokens: np.ndarray | None = None) -> np.ndarray:
        """Each active sequence's share of the layer's device pool (0 for inactive slots), for `tokens` (default: now).

        Budgets depend on page counts only, so they are recomputed (and uploaded) only when a
        page opens or a sequence comes or goes: a steady step neither loops over the batch nor uploads.
        """
        pages = np.where(self.active, self._num_pages(layer.tokens if tokens is None else tokens), 0)
        if layer.budgets is not None and layer.budget_pages is not None and np.array_equal(pages, layer.budget_pages):
            return layer.budgets
        seqs = np.flatnonzero(self.active)
        out = np.zeros(self.max_seqs, np.int64)
        if layer.exact:
            out[seqs] = pages[seqs]
        else:
            wanted = [self.budget.wanted(int(n)) for n in pages[seqs]]
            try:
                out[seqs] = share(wanted, self._minimum(pages[seqs]).tolist(), self.device_pages)
            except ValueError as e:
                raise CapacityError(f"the device pool cannot hold every sequence's sinks and window: {e}") from e
        layer.budget_pages, layer.budgets = pages, out
        layer.budgets_dev.copy_(self._to_device(out), non_blocking=True)
        return out

    def _batch(self, seqs: list[int]) -> _Batch:
        key = tuple(seqs)
        b = self._batches.get(key)
        if b is None:
            rows = np.asarray(seqs, np.int64).reshape(-1)
            if len(rows) == 0:
                raise ValueError("a decode step needs at least one sequence")
            if len(np.unique(rows)) != len(rows):
                raise ValueError(f"sequences {seqs} name one sequence twice")
            classes = np.full(self.max_seqs, SCORE, np.int64)
            classes[rows[(rows >= 0) & (rows < self.max_seqs)]] = LRU
            run = int(rows[0]) if np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))) else None
            both = self._to_device(np.concatenate([np.clip(rows, 0, self.max_seqs - 1), classes]))
            b = _Batch(rows, both[: len(rows)], both[len(rows):], run, key)
            if len(self._batches) > 16:
                self._batches.clear()
                self._generation += 1
            self._batches[key] = b
        bad = (b.rows < 0) | (b.rows >= self.max_seqs)
        if bad.any() or not self.active[b.rows].all():
            seq = int(b.rows[bad][0]) if bad.any() else int(b.rows[~self.active[b.rows]][0])
            raise KeyError(f"sequence {seq} is not held by this page manager")
        return b

    def _protected(self, num_pages: int) -> np.ndarray:
        """Pages of a sequence of `num_pages` that never leave the device: sinks and the recent window."""
        b = self.budget
        keep = np.zeros(num_pages, bool)
        keep[: b.sink_pages] = True
        keep[max(0, num_pages - b.window_pages):] = True
        return keep

    def _all_pages_dev(self, layer: _Layer) -> torch.Tensor:
        return self._num_pages(layer.tokens_dev)

    # -- sequences -----------------------------------------------------------------------

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> int:
        """A new sequence from its prompt's K and V, one `[tokens, kv_heads, head_dim]` per layer; its id.

        Every page goes to the host pool; its sinks and window also to the device, demoting
        running sequences' unprotected pages, lowest score first, if the pool is short. Nothing
        changes on `CapacityError`. May synchronise (it is not part of a steady decode step).
        """
        if len(keys) != self.layout.num_layers or len(values) != self.layout.num_layers:
            raise ValueError(f"add needs K and V for each of {self.layout.num_layers} layers, got {len(keys)} and {len(values)}")
        free = np.flatnonzero(~self.active)
        if len(free) == 0:
            raise CapacityError(f"the page manager already holds its {self.max_seqs} sequences")
        tokens = keys[0].shape[0]
        for i, (k, v) in enumerate(zip(keys, values)):
            want = (tokens, self.layout.num_kv_heads, self.layout.head_dim)
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise ValueError(f"layer {i}: K {tuple(k.shape)} and V {tuple(v.shape)} must both be {want}")
            if k.dtype != self.layout.dtype or v.dtype != self.layout.dtype:
                raise ValueError(f"layer {i}: K/V are {k.dtype}/{v.dtype}, the layout is {self.layout.dtype}")
        if tokens == 0:
            raise ValueError("add needs a prompt of at least one token")
        pages = int(self._num_pages(np.array(tokens)))
        if pages > self.max_pages:
            raise CapacityError(
                f"a prompt of {tokens} tokens needs {pages} pages; the manager holds {self.max_pages} per sequence"
            )
        seq = int(free[0])
        keep = np.flatnonzero(self._protected(pages))
        b = self.budget
        classes = np.full(self.max_seqs, SCORE, np.int64)
        classes[seq] = NEVER
        classes_dev = self._to_device(classes)
        for layer in self.layers:  # every check before anything moves
            if len(layer.free_host) < pages:
                raise CapacityError(f"the host pool has {len(layer.free_host)} free pages, the prompt needs {pages}")
            room = layer.res.victims_available(classes_dev, self._all_pages_dev(layer), b.sink_pages, b.window_pages,
                                               layer.step_dev)
            if room < len(keep):
                raise CapacityError(
                    f"the device pool of {layer.res.slots} pages per layer has {room} free or that can be demoted; "
                    f"{len(keep)} are needed (every other page is a sink or in a recent window)"
                )
        mp = self.max_pages
        for layer, k, v in zip(self.layers, keys, values):
            blocks = self._blocks(k, v)
            hs = np.array(layer.free_host[-pages:][::-1], np.int64)
            del layer.free_host[-pages:]
            layer.host[torch.from_numpy(hs)] = blocks.to(layer.host.device)
            layer.host_slot[seq, :pages] = hs
            layer.host_slot_dev[seq * mp : seq * mp + pages] = self._to_device(hs)
            res = layer.res
            res.last_used[seq * mp : (seq + 1) * mp] = layer.step_dev
            res.score[seq * mp : (seq + 1) * mp] = 0.0
            rows = self._to_device(np.array([seq], np.int64))
            keep_dev = self._to_device(keep[None])
            mask = torch.ones(keep_dev.shape, dtype=torch.bool, device=self.device)
            budget = torch.full((1,), len(keep), dtype=torch.int64, device=self.device)
            slots, evicted = res.place(rows, keep_dev, mask, pages, budget, classes_dev, self._all_pages_dev(layer),
                                       b.sink_pages, b.window_pages, layer.step_dev)
            layer.dev[slots[0]] = blocks[keep_dev[0].to(blocks.device)].to(self.device)
            self._evicted += evicted
            layer.digest.reset(seq)
            layer.digest.write(seq, k.to(self.device), self.layout.block_tokens)
            layer.tokens[seq] = tokens
            layer.tokens_dev[seq] = tokens
            layer.kept.forget()
        self.active[seq] = True
        return seq

    def remove(self, seq: int) -> None:
        """Forget a sequence: its device and host pages are free again."""
        if not 0 <= seq < self.max_seqs or not self.active[seq]:
            raise KeyError(f"sequence {seq} is not held by this page manager")
        mp = self.max_pages
        for layer in self.layers:
            rows = layer.host_slot[seq][layer.host_slot[seq] >= 0]
            layer.free_host.extend(rows.tolist())
            layer.host_slot[seq] = -1
            layer.host_slot_dev[seq * mp : (seq + 1) * mp] = -1
            layer.res.free_seq(seq)
            layer.tokens[seq] = 0
            layer.tokens_dev[seq] = 0
            layer.kept.forget()
        self.active[seq] = False

    def _blocks(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`[pages, 1, 2, bt, H, D]` pages of K/V `[tokens, H, D]`, the last one zero-padded."""
        bt = self.layout.block_tokens
        n = k.shape[0]
        pages = -(-n // bt)
        kv = torch.zeros((pages * bt, 2, *k.shape[1:]), dtype=k.dtype, device=k.device)
        kv[:n, 0], kv[:n, 1] = k, v
        return kv.view(pages, bt, 2, *k.shape[1:]).transpose(1, 2).unsqueeze(1).contiguous()

    # -- decode --------------------------------------------------------------------------

    def append(self, layer_idx: int, seqs: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one new token per sequence into layer `layer_idx`: `keys`/`values` `[n, kv_heads, head_dim]`.

        A page that opens gets a host row (chosen here) and a device slot (`Residency.place`:
        the sequence's own least recently selected unprotected page gives its slot when the
        sequence is at its budget, else a free slot, else another sequence's lowest-scored
        unprotected page). A page that fills is copied to its host row, on the device's queue.
        """
        layer = self.layers[layer_idx]
        b = self._batch(seqs)
        keys, values = self._check_kv(layer, b, keys, values)
        step = self._append_host(layer, b)
        if self.graphs is None:
            self._write_token(layer, b, keys, values, step)
        else:
            self.graphs.run(("append", layer_idx, b.key, step), lambda k, v: self._write_token(layer, b, k, v, step),
                            (keys, values), keep=b)

    def _check_kv(self, layer: _Layer, b: _Batch, keys: torch.Tensor, values: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        want = (len(b.rows), self.layout.num_kv_heads, self.layout.head_dim)
        if tuple(keys.shape) != want or tuple(values.shape) != want:
            raise ValueError(f"append needs keys and values of shape {want}, got {tuple(keys.shape)} and {tuple(values.shape)}")
        return keys.to(self.device, layer.dev.dtype), values.to(self.device, layer.dev.dtype)

    def _append_host(self, layer: _Layer, b: _Batch) -> _Append:
        """The host half of `append`: pages that open get host rows and are staged for placement, counts advance."""
        bt, mp = self.layout.block_tokens, self.max_pages
        pos = layer.tokens[b.rows]
        page, off = pos // bt, pos % bt
        if (page >= mp).any():
            raise CapacityError(f"a sequence reached {mp} pages, the most this manager holds")
        opens = off == 0
        opening = self._open(layer, b, opens, page) if opens.any() else None
        layer.tokens[b.rows] += 1
        return _Append(bool((off == bt - 1).any()), opening)

    def _write_token(self, layer: _Layer, b: _Batch, keys: torch.Tensor, values: torch.Tensor, step: _Append) -> None:
        """The device half of `append`: pages that open are placed; the token's K/V into its page's slot, the count;
        full pages' digests and home copies.

        `step.fills`: whether some row's page fills with this token. Only then is there more to
        do: the pages that filled get their digest (from the page on the device: a page is
        scored only once it has left the window, when it is full) and are copied to their host rows.
        """
        if step.opening is not None:
            self._place_opened(layer, step.opening)
        fills = step.fills
        bt, mp = self.layout.block_tokens, self.max_pages
        pos_dev = layer.tokens_dev[b.rows_dev]
        page_dev, off_dev = pos_dev // bt, pos_dev % bt
        ids = b.rows_dev * mp + page_dev
        slots = layer.res.slot[ids]
        layer.dev[slots, 0, :, off_dev] = torch.stack([keys, values], dim=1)
        layer.tokens_dev[b.rows_dev] = pos_dev + 1
        if fills:  # pages that just filled go home: later evictions of them copy nothing
            full = off_dev == bt - 1
            layer.digest.write_pages(b.rows_dev, page_dev, layer.dev[slots, 0, 0], full)
            copy_rows_where(layer.dev, torch.where(full, slots, -1), layer.host, layer.host_slot_dev[ids])

    def _open(self, layer: _Layer, b: _Batch, opens: np.ndarray, page: np.ndarray) -> _Opening:
        """New tail pages for the rows where `opens`: a host row each (here), then a device slot each (staged for the
        device half, `_place_opened`)."""
        rows, pages = b.rows[opens], page[opens]
        n = len(rows)
        layer.kept.placed()
        if len(layer.free_host) < n:
            raise CapacityError(f"the host pool of {self.host_pages} pages per layer is full")
        after = layer.tokens.copy()
        after[b.rows] += 1
        budgets = self._budgets(layer, after)
        counts = self._num_pages(after)
        others = self.active.copy()
        others[rows] = False
        if budgets[rows].sum() + self._minimum(counts[others]).sum() > layer.res.slots:
            raise CapacityError(
                f"the device pool of {layer.res.slots} pages cannot hold new pages for {n} sequences within their budgets"
            )
        hs = np.array(layer.free_host[-n:][::-1], np.int64)
        del layer.free_host[-n:]
        layer.host_slot[rows, pages] = hs
        # The rows' protected pages after the new one: sinks, then the window ending at it (all but it resident).
        s, w = self.budget.sink_pages, self.budget.window_pages
        k = s + w
        num = pages + 1
        cols = np.arange(k)[None, :]
        want = np.where(cols < s, cols, num[:, None] - k + cols)
        mask = ((cols < s) & (cols < num[:, None])) | ((cols >= s) & (want >= s) & (want < num[:, None]))
        want = np.clip(want, 0, (num - 1)[:, None])
        classes = np.full(self.max_seqs, SCORE, np.int64)
        classes[rows] = NEVER  # their own pages leave only through their budget
        mp = self.max_pages
        packed = np.concatenate([rows * mp + pages, hs, rows, classes, want.reshape(-1), mask.reshape(-1).astype(np.int64)])
        layer.open_stage[: packed.size].copy_(self._to_device(packed))
        return _Opening(n, _padded(int(num.max()), self.max_pages))

    def _place_opened(self, layer: _Layer, op: _Opening) -> None:
        """The device half of a page open: the staged pages get their host rows on the device and a device slot each."""
        n, s, w = op.rows, self.budget.sink_pages, self.budget.window_pages
        k, packed = s + w, layer.open_stage
        fid, host_rows, rows_dev = packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n]
        classes_dev = packed[3 * n : 3 * n + self.max_seqs]
        rest = packed[3 * n + self.max_seqs : 3 * n + self.max_seqs + 2 * n * k]
        want_dev, mask_dev = rest[: n * k].view(n, k), rest[n * k :].view(n, k).bool()
        layer.host_slot_dev[fid] = host_rows
        _, evicted = layer.res.place(rows_dev, want_dev, mask_dev, op.width, layer.budgets_dev[rows_dev],
                                     classes_dev, self._all_pages_dev(layer), s, w, layer.step_dev)
        layer.res.last_used[fid] = layer.step_dev
        layer.res.score.index_fill_(0, fid, 1.0)
        self._evicted += evicted

    def select(self, layer_idx: int, seqs: list[int], q: torch.Tensor, scale: float) -> torch.Tensor:
        """The pages each sequence's query `q` `[n, q_heads, head_dim]` attends to in layer `layer_idx`.

        A device tensor `[n, k]`: row i's page indices ascending, then -1 up to k (k is the
        largest selection of the batch, padded). Scores are kept for eviction under pressure.
        """
        layer, b = self.layers[layer_idx], self._batch(seqs)
        pages_dev = self._num_pages(layer.tokens_dev[b.rows_dev])
        pages, mask = self._choose(layer, b, q.to(self.device), scale, self._shape(layer, b)[0], pages_dev)
        return torch.where(mask, pages, -1)

    def _shape(self, layer: _Layer, b: _Batch) -> tuple[_Shape, np.ndarray]:
        """The step's padded shape and each row's selected page count (host values: budgets, token counts)."""
        pages = self._num_pages(layer.tokens[b.rows])
        budgets = self._budgets(layer)[b.rows]
        counts = np.minimum(budgets, pages)
        width = _padded(int(pages.max()), self.max_pages)
        roomy = int(self.active.sum()) == len(b.rows) and int(budgets.sum()) <= layer.res.slots
        return _Shape(min(width, _padded(int(counts.max()), self.max_pages)), width, bool((counts == pages).all()),
                      roomy), counts

    def _choose(self, layer: _Layer, b: _Batch, q: torch.Tensor, scale: float, shape: _Shape, pages_dev: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pages `[n, k]`, mask `[n, k]`) on the device: see `selection.choose_pages`. Records the scores.

        pages_dev: `[n]` each row's page count (a device tensor)."""
        counts_dev = torch.minimum(layer.budgets_dev[b.rows_dev], pages_dev)
        if shape.exact:  # every row takes all its pages: no scores needed
            return choose_pages(None, pages_dev, counts_dev, shape.k, 0, 0)
        width, n = shape.width, len(b.rows)
        if self.budget.policy == "quest":
            kmin, kmax = layer.digest.pages(b.rows_dev, b.run, width)
            top = shape.k if self.budget.aggregate == "rank" else None
            scores = page_scores(q, kmin, kmax, pages_dev, scale, self.budget.aggregate, top, self.budget.box_scale)
            cols = torch.arange(width, device=self.device)
            ids = layer.res.ids(b.rows_dev, cols.expand(n, width))
            layer.res.score[layer.res.masked(ids, cols < pages_dev[:, None])] = scores.float()
        else:  # "recent": the most recent pages first
            scores = torch.arange(width, device=self.device, dtype=torch.float32).expand(n, width)
        return choose_pages(scores, pages_dev, counts_dev, shape.k, self.budget.sink_pages, self.budget.window_pages)

    def attend(self, layer_idx: int, seqs: list[int], q: torch.Tensor, scale: float) -> torch.Tensor:
        """One decode step of layer `layer_idx`: select, fetch what is missing, attend. `[n, q_heads, head_dim]`.

        The sequences' newest tokens must already be appended (a token attends to itself).
        """
        b = self._batch(seqs)
        q = self._check_q(b, q)
        layer = self.layers[layer_idx]
        plan = self._attend_host(layer, b)
        if self.graphs is None:
            return self._attend_layer(layer, b, q, scale, plan)
        key = ("attend", layer_idx, b.key, plan.shape, plan.mode, float(scale), q.dtype, tuple(q.shape))
        out = self.graphs.run(key, lambda qq: self._attend_layer(layer, b, qq, scale, plan), (q,), keep=(b, plan.kept))
        assert out is not None
        return out

    def plan_step(self, seqs: list[int]) -> StepPlan:
        """The host half of one decode step of every layer for `seqs` (what `append` and `attend` do on the host).

        Then, for each layer in order, `append_planned` and `attend_planned` run the device
        halves: they launch device work only (no host decision, no synchronisation, nothing
        uploaded), so an engine can capture the whole step, its model included, as one CUDA
        graph per `StepPlan.key` (`append`/`attend` capture each layer's halves separately,
        with `cuda_graphs=True`). The results are those of `append` + `attend` layer by layer.
        """
        b = self._batch(seqs)
        appends, layers = [], []
        for layer in self.layers:
            appends.append(self._append_host(layer, b))
            layers.append(self._attend_host(layer, b))
        self._plans += 1
        key = (b.key, self._generation, tuple((a, ls.shape, ls.mode) for a, ls in zip(appends, layers)))
        return StepPlan(b.key, key, self._plans, b, tuple(appends), tuple(layers))

    def _current(self, plan: StepPlan) -> _Batch:
        if plan.serial != self._plans:
            raise ValueError(f"step plan {plan.serial} is not the latest ({self._plans}): plan each step, then run it once")
        return plan.batch

    def append_planned(self, plan: StepPlan, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The device half of `append` for layer `layer_idx` of a planned step (see `plan_step`)."""
        b, layer = self._current(plan), self.layers[layer_idx]
        keys, values = self._check_kv(layer, b, keys, values)
        self._write_token(layer, b, keys, values, plan.appends[layer_idx])

    def attend_planned(self, plan: StepPlan, layer_idx: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """The device half of `attend` for layer `layer_idx` of a planned step (see `plan_step`)."""
        b = self._current(plan)
        return self._attend_layer(self.layers[layer_idx], b, self._check_q(b, q), scale, plan.layers[layer_idx])

    def _check_q(self, b: _Batch, q: torch.Tensor) -> torch.Tensor:
        if q.dim() != 3 or q.shape[0] != len(b.rows):
            raise ValueError(f"q must be [{len(b.rows)} sequences, q_heads, head_dim], got {tuple(q.shape)}")
        return q.to(self.device)

    def _attend_host(self, layer: _Layer, b: _Batch) -> _LayerStep:
        """The host half of `attend`: the capacity check, the step's shape, and whether it selects."""
        shape, counts = self._shape(layer, b)
        others = self.active.copy()
        others[b.rows] = False
        if counts.sum() + self._minimum(self._num_pages(layer.tokens[others])).sum() > layer.res.slots:
            raise CapacityError(
                f"the device pool of {layer.res.slots} pages cannot hold this step's {int(counts.sum())} selected "
                "pages beside the other sequences' sinks and windows"
            )
        self.step += 1
        kept, mode, dropped = layer.kept.plan(b.key, shape.k, self._num_pages(layer.tokens[b.rows]))
        if dropped:  # captured steps may hold the dropped buffers
            self._generation += 1
            if self.graphs is not None:
                self.graphs.clear()
        self.last_step = StepStats(int(counts.sum()), self._last_fetched, self._last_evicted)
        return _LayerStep(shape, mode, kept)

    def _attend_layer(self, layer: _Layer, b: _Batch, q: torch.Tensor, scale: float, plan: _LayerStep) -> torch.Tensor:
        """The device half of `attend` (no host values but `plan`'s): what a captured step replays.

        The block table comes from a selection (`_select_pages`: scores, placement, fetch) or,
        between selections, from `plan.kept`: merged again from the kept pages and the current
        window after a placement may have moved a page ("merge"), else as it is ("same"); those
        steps score nothing, place nothing and copy nothing.
        """
        bt = self.layout.block_tokens
        layer.step_dev += 1
        tokens = layer.tokens_dev[b.rows_dev]
        num_pages = self._num_pages(tokens)
        if plan.mode == "select":
            table, count = self._select_pages(layer, b, q, scale, plan.shape, num_pages, plan.kept)
        else:
            assert plan.kept is not None
            if plan.mode == "merge":
                layer.kept.merge_table(plan.kept, layer.res, b.rows_dev, num_pages)
            self._last_fetched.zero_()
            self._last_evicted.zero_()
            table, count = plan.kept.table, plan.kept.count
        # Every page in the table is full but the last, the tail, which holds the tokens past the full pages.
        lens = count * bt - (num_pages * bt - tokens)
        return attend_pages(q, layer.dev, self.page_layout, table, lens, scale)

    def _select_pages(self, layer: _Layer, b: _Batch, q: torch.Tensor, scale: float, shape: _Shape,
                      num_pages: torch.Tensor, kept: Kept | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(block table `[n, k]`, selected pages per row `[n]`): select, make room, fetch what is missing.

        `kept`: where to keep the selection for the steps that reuse it (`select_every`)."""
        pages, mask = self._choose(layer, b, q, scale, shape, num_pages)
        res = layer.res
        ids = res.ids(b.rows_dev, pages)
        res.last_used[res.masked(ids, mask).reshape(-1)] = layer.step_dev
        placed, evicted = res.place(b.rows_dev, pages, mask, shape.width, layer.budgets_dev[b.rows_dev], b.classes,
                                    self._all_pages_dev(layer), self.budget.sink_pages, self.budget.window_pages,
                                    layer.step_dev, shape.roomy)
        # One launch for the whole batch: entries with nothing to fetch have source row -1.
        src = torch.where(placed >= 0, layer.host_slot_dev[ids], -1)
        copy_rows_where(layer.host, src, layer.dev, placed.clamp(min=0))
        fetched = (placed >= 0).sum()
        self._fetched += fetched
        self._evicted += evicted
        self._last_fetched.copy_(fetched)
        self._last_evicted.copy_(evicted)
        table = res.slot[ids]
        count = mask.sum(1)
        if kept is not None:  # the selection and table the steps until the next selection reuse
            KeptSelections.keep(kept, pages, mask, table, count)
        return table, count
