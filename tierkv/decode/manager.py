"""`PageManager`: the decode-time residency of sequences' KV pages, per layer, under a GPU page budget.

Every page has a home row in a host pool (pinned when CUDA is there), written once the page is
full, so evicting a page from the device never loses or copies anything: the host copy is exact.
The device pool of each layer holds the pages the latest step selected, up to each sequence's
budget; the page being written (the tail) is always resident and is written back when it fills.

A step (`attend`) selects pages (`selection`), fetches the non-resident ones with one batched
host-to-device copy (`tierkv.ops.transfer.copy_slots`), evicting first the sequence's own
least recently selected pages beyond its budget, then, when the shared pool is short, the
lowest-scored unprotected pages of other sequences, and runs paged attention over the selection
(a block table of device slots). Layers are independent: each has its own pools, digests and
selection, since a layer's query is known only when the model reaches it.

Sequences sharing the device pool share it fairly (`budget.share`): when a new one arrives
(`add`) and the pool is short, running sequences' unprotected pages are demoted to the host by
score, never below their sinks + window; `CapacityError` when even that cannot make room.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CapacityError
from ..layout import KVLayout
from ..ops.transfer import copy_slots
from .attention import attend_pages
from .budget import DecodeBudget, share
from .selection import page_scores, select_pages
from .summaries import KeySummaries


@dataclass(frozen=True)
class StepStats:
    """What one `attend` call did: pages selected, fetched from the host, evicted, for the whole batch."""

    selected: int
    fetched: int
    evicted: int


@dataclass
class _Layer:
    dev: torch.Tensor  # [device_pages, 1, 2, bt, H, D]
    host: torch.Tensor  # [host_pages, 1, 2, bt, H, D]
    digest: KeySummaries
    host_slot: np.ndarray  # [max_seqs, max_pages] host row of each page, -1 none
    dev_slot: np.ndarray  # [max_seqs, max_pages] device slot of each page, -1 not resident
    last_used: np.ndarray  # [max_seqs, max_pages] step that last selected the page
    score: np.ndarray  # [max_seqs, max_pages] its score then
    free_dev: list[int]
    free_host: list[int]
    tokens: np.ndarray  # [max_seqs] tokens written for each sequence in this layer
    exact: bool  # one of the budget's dense layers: every page resident, no selection


def _pinned(shape: tuple[int, ...], dtype: torch.dtype, want: bool) -> torch.Tensor:
    if want and torch.cuda.is_available():
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    return torch.zeros(shape, dtype=dtype)


class PageManager:
    """KV pages of up to `max_seqs` sequences of up to `max_pages` pages each, for every layer of `layout`.

    `device_pages` is the device pool of each layer (shared by all sequences); `host_pages` the
    host pool of each layer, the home of every page. `layout.block_tokens` is the page size.
    """

    def __init__(self, layout: KVLayout, budget: DecodeBudget, *, device_pages: int, host_pages: int, max_seqs: int,
                 max_pages: int, device: torch.device | str = "cpu") -> None:
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
                host_slot=np.full((max_seqs, max_pages), -1, np.int64),
                dev_slot=np.full((max_seqs, max_pages), -1, np.int64),
                last_used=np.zeros((max_seqs, max_pages), np.int64),
                score=np.zeros((max_seqs, max_pages), np.float32),
                free_dev=list(range(pool - 1, -1, -1)),
                free_host=list(range(host_pages - 1, -1, -1)),
                tokens=np.zeros(max_seqs, np.int64),
                exact=i < budget.dense_layers,
            )
            for i, pool in enumerate(pools)
        ]
        self.active = np.zeros(max_seqs, bool)
        self.step = 0
        self.fetched_pages = 0
        self.evicted_pages = 0

    # -- sizes ---------------------------------------------------------------------------

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one layer (K and V)."""
        return self.page_layout.block_bytes

    def device_bytes(self) -> int:
        """Bytes of the device pools (every layer): the GPU memory the KV of all sequences takes."""
        return sum(layer.dev.shape[0] for layer in self.layers) * self.page_bytes

    def resident_pages(self, layer: int, seq: int) -> int:
        return int((self.layers[layer].dev_slot[seq] >= 0).sum())

    def num_tokens(self, seq: int, layer: int = 0) -> int:
        return int(self.layers[layer].tokens[seq])

    def _num_pages(self, tokens: np.ndarray) -> np.ndarray:
        return -(-tokens // self.layout.block_tokens)

    def _budgets(self, layer: _Layer) -> np.ndarray:
        """Each active sequence's share of the layer's device pool (0 for inactive slots)."""
        seqs = np.flatnonzero(self.active)
        pages = self._num_pages(layer.tokens[seqs])
        out = np.zeros(self.max_seqs, np.int64)
        if layer.exact:
            out[seqs] = pages
            return out
        wanted = [self.budget.wanted(int(n)) for n in pages]
        minimum = [self.budget.minimum(int(n)) for n in pages]
        out[seqs] = share(wanted, minimum, self.device_pages)
        return out

    def _protected(self, num_pages: int) -> np.ndarray:
        """Pages of a sequence of `num_pages` that never leave the device: sinks and the recent window."""
        b = self.budget
        keep = np.zeros(num_pages, bool)
        keep[: b.sink_pages] = True
        keep[max(0, num_pages - b.window_pages):] = True
        return keep

    # -- sequences -----------------------------------------------------------------------

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> int:
        """A new sequence from its prompt's K and V, one `[tokens, kv_heads, head_dim]` per layer; its id.

        Every page goes to the host pool; its sinks and window also to the device, demoting
        running sequences' pages by score if the pool is short. Nothing changes on `CapacityError`.
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
        keep = np.flatnonzero(self._protected(pages))
        for layer in self.layers:
            if len(layer.free_host) < pages:
                raise CapacityError(f"the host pool has {len(layer.free_host)} free pages, the prompt needs {pages}")
        plans = [self._room(layer, len(keep), exclude=-1) for layer in self.layers]  # checks before anything moves
        seq = int(free[0])
        for layer, plan, k, v in zip(self.layers, plans, keys, values):
            self._evict(layer, plan)
            blocks = self._blocks(k, v)
            hs = np.array([layer.free_host.pop() for _ in range(pages)], np.int64)
            layer.host[torch.from_numpy(hs)] = blocks.to(layer.host.device)
            layer.host_slot[seq, :pages] = hs
            ds = np.array([layer.free_dev.pop() for _ in keep], np.int64)
            layer.dev[torch.from_numpy(ds).to(self.device)] = blocks[torch.from_numpy(keep).to(blocks.device)].to(self.device)
            layer.dev_slot[seq, keep] = ds
            layer.last_used[seq, :pages] = self.step
            layer.score[seq, :pages] = 0.0
            layer.digest.reset(seq)
            layer.digest.write(seq, k.to(self.device), self.layout.block_tokens)
            layer.tokens[seq] = tokens
        self.active[seq] = True
        return seq

    def remove(self, seq: int) -> None:
        """Forget a sequence: its device and host pages are free again."""
        self._check_seq(seq)
        for layer in self.layers:
            for table, free in ((layer.dev_slot, layer.free_dev), (layer.host_slot, layer.free_host)):
                rows = table[seq][table[seq] >= 0]
                free.extend(rows.tolist())
                table[seq] = -1
            layer.tokens[seq] = 0
        self.active[seq] = False

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.max_seqs or not self.active[seq]:
            raise KeyError(f"sequence {seq} is not held by this page manager")

    def _blocks(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`[pages, 1, 2, bt, H, D]` pages of K/V `[tokens, H, D]`, the last one zero-padded."""
        bt = self.layout.block_tokens
        n = k.shape[0]
        pages = -(-n // bt)
        kv = torch.zeros((pages * bt, 2, *k.shape[1:]), dtype=k.dtype, device=k.device)
        kv[:n, 0], kv[:n, 1] = k, v
        return kv.view(pages, bt, 2, *k.shape[1:]).transpose(1, 2).unsqueeze(1).contiguous()

    # -- eviction ------------------------------------------------------------------------

    def _room(self, layer: _Layer, needed: int, exclude: int,
              pinned: dict[int, np.ndarray] | None = None) -> list[tuple[int, int]]:
        """Pages to demote so that `needed` device slots are free: other sequences' unprotected, lowest score first."""
        short = needed - len(layer.free_dev)
        if short <= 0:
            return []
        candidates: list[tuple[float, int, int, int]] = []
        for s in np.flatnonzero(self.active):
            if s == exclude:
                continue
            n = int(self._num_pages(np.array(layer.tokens[s])))
            movable = np.flatnonzero((layer.dev_slot[s, :n] >= 0) & ~self._protected(n))
            if pinned is not None and s in pinned:
                movable = np.setdiff1d(movable, pinned[s])
            candidates.extend((float(layer.score[s, p]), int(layer.last_used[s, p]), int(s), int(p)) for p in movable)
        if len(candidates) < short:
            raise CapacityError(
                f"the device pool of {self.device_pages} pages per layer has {len(layer.free_dev)} free and "
                f"{len(candidates)} that can be demoted; {needed} are needed (every other page is a sink, "
                "in a recent window, or selected by this step)"
            )
        candidates.sort()
        return [(s, p) for _, _, s, p in candidates[:short]]

    def _evict(self, layer: _Layer, pages: list[tuple[int, int]]) -> None:
        for s, p in pages:
            slot = int(layer.dev_slot[s, p])
            assert slot >= 0 and layer.host_slot[s, p] >= 0
            layer.free_dev.append(slot)
            layer.dev_slot[s, p] = -1
        self.evicted_pages += len(pages)

    # -- decode --------------------------------------------------------------------------

    def append(self, layer_idx: int, seqs: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one new token per sequence into layer `layer_idx`: `keys`/`values` `[n, kv_heads, head_dim]`."""
        layer = self.layers[layer_idx]
        for s in seqs:
            self._check_seq(s)
        bt = self.layout.block_tokens
        rows = np.asarray(seqs, np.int64)
        pos = layer.tokens[rows]
        page, off = pos // bt, pos % bt
        if (page >= self.max_pages).any():
            raise CapacityError(f"a sequence reached {self.max_pages} pages, the most this manager holds")
        for s, p, o in zip(rows.tolist(), page.tolist(), off.tolist()):
            if o:
                continue
            # A new page: a host row now, a device slot (the tail is always resident).
            if not layer.free_host:
                raise CapacityError(f"the host pool of {self.host_pages} pages per layer is full")
            layer.host_slot[s, p] = layer.free_host.pop()
            n = p + 1
            resident = np.flatnonzero(layer.dev_slot[s, :n] >= 0)
            budget = int(self._budgets_with(layer, s, n)[s])
            if len(resident) + 1 > budget:  # the sequence's own least recently selected unprotected pages
                keep = self._protected(n)
                own = [q for q in resident.tolist() if not keep[q]]
                own.sort(key=lambda q: (layer.last_used[s, q], layer.score[s, q]))
                self._evict(layer, [(s, q) for q in own[: len(resident) + 1 - budget]])
            self._evict(layer, self._room(layer, 1, exclude=s))
            layer.dev_slot[s, p] = layer.free_dev.pop()
            layer.last_used[s, p] = self.step
            layer.score[s, p] = 1.0
        slots = torch.from_numpy(layer.dev_slot[rows, page]).to(self.device)
        offs = torch.from_numpy(off).to(self.device)
        layer.dev[slots, 0, 0, offs] = keys.to(self.device, layer.dev.dtype)
        layer.dev[slots, 0, 1, offs] = values.to(self.device, layer.dev.dtype)
        sel = torch.from_numpy(rows).to(self.device)
        layer.digest.append(sel, torch.from_numpy(page).to(self.device), keys.to(self.device), torch.from_numpy(off == 0))
        layer.tokens[rows] += 1
        full = np.flatnonzero(off == bt - 1)
        if len(full):  # pages that just filled go home: later evictions of them copy nothing
            copy_slots(layer.dev, layer.dev_slot[rows[full], page[full]], layer.host, layer.host_slot[rows[full], page[full]])

    def _budgets_with(self, layer: _Layer, seq: int, pages: int) -> np.ndarray:
        saved = layer.tokens[seq]
        layer.tokens[seq] = max(int(saved), (pages - 1) * self.layout.block_tokens + 1)
        try:
            return self._budgets(layer)
        finally:
            layer.tokens[seq] = saved

    def select(self, layer_idx: int, seqs: list[int], q: torch.Tensor, scale: float) -> list[np.ndarray]:
        """The pages each sequence's query `q` `[n, q_heads, head_dim]` attends to in layer `layer_idx`."""
        layer = self.layers[layer_idx]
        rows = np.asarray(seqs, np.int64)
        pages = self._num_pages(layer.tokens[rows])
        budgets = self._budgets(layer)[rows]
        scores = None
        if self.budget.policy == "quest" and (budgets < pages).any():
            width = int(pages.max())
            first = int(rows[0])
            if np.array_equal(rows, np.arange(first, first + len(rows))):  # a run of slots: views, not copies
                kmin = layer.digest.kmin[first : first + len(rows), :width]
                kmax = layer.digest.kmax[first : first + len(rows), :width]
            else:
                idx = torch.from_numpy(rows).to(self.device)
                kmin, kmax = layer.digest.kmin[idx, :width], layer.digest.kmax[idx, :width]
            scores = page_scores(q.to(self.device), kmin, kmax, torch.from_numpy(pages), scale, self.budget.aggregate)
            host = scores.float().cpu().numpy()
            for i, (s, n) in enumerate(zip(rows.tolist(), pages.tolist())):
                layer.score[s, :n] = host[i, :n]
        return select_pages(scores, pages, budgets, self.budget.sink_pages, self.budget.window_pages, self.budget.policy)

    def attend(self, layer_idx: int, seqs: list[int], q: torch.Tensor, scale: float) -> torch.Tensor:
        """One decode step of layer `layer_idx`: select, fetch what is missing, attend. `[n, q_heads, head_dim]`.

        The sequences' newest tokens must already be appended (a token attends to itself).
        """
        for s in seqs:
            self._check_seq(s)
        if q.dim() != 3 or q.shape[0] != len(seqs):
            raise ValueError(f"q must be [{len(seqs)} sequences, q_heads, head_dim], got {tuple(q.shape)}")
        self.step += 1
        layer = self.layers[layer_idx]
        chosen = self.select(layer_idx, seqs, q, scale)
        pinned = {s: c for s, c in zip(seqs, chosen)}
        budgets = self._budgets(layer)
        src: list[int] = []
        dst: list[int] = []
        evicted_before = self.evicted_pages
        for s, sel in zip(seqs, chosen):
            missing = sel[layer.dev_slot[s, sel] < 0]
            if len(missing) == 0:
                continue
            resident = np.flatnonzero(layer.dev_slot[s] >= 0)
            over = len(resident) + len(missing) - int(budgets[s])
            if over > 0:  # the sequence's own least recently selected pages make room first
                own = np.setdiff1d(resident, sel)
                order = np.lexsort((layer.score[s, own], layer.last_used[s, own]))
                self._evict(layer, [(s, int(p)) for p in own[order][:over]])
            self._evict(layer, self._room(layer, len(missing), exclude=s, pinned=pinned))
            for p in missing.tolist():
                slot = layer.free_dev.pop()
                layer.dev_slot[s, p] = slot
                src.append(int(layer.host_slot[s, p]))
                dst.append(slot)
        if src:  # one batched host -> device copy for every sequence of the batch
            copy_slots(layer.host, src, layer.dev, dst)
            self.fetched_pages += len(src)
        self.last_step = StepStats(sum(len(c) for c in chosen), len(src), self.evicted_pages - evicted_before)
        bt = self.layout.block_tokens
        width = max(len(c) for c in chosen)
        table = np.zeros((len(seqs), width), np.int64)
        lens = np.zeros(len(seqs), np.int64)
        for i, (s, sel) in enumerate(zip(seqs, chosen)):
            table[i, : len(sel)] = layer.dev_slot[s, sel]
            layer.last_used[s, sel] = self.step
            tokens = int(layer.tokens[s])
            # Every selected page is full but the last, the tail, which holds the tokens past the full pages.
            lens[i] = (len(sel) - 1) * bt + tokens - (-(-tokens // bt) - 1) * bt
        return attend_pages(q, layer.dev, self.page_layout, torch.from_numpy(table).to(self.device),
                            torch.from_numpy(lens), scale)
