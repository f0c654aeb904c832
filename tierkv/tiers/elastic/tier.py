"""The elastic device tier: slots packed in one reserved virtual range, pages mapped as slots are used.

Slot `s` holds bytes `[s * slot_bytes, (s + 1) * slot_bytes)` of the range, so a slot may span a
page boundary and a page may hold parts of several slots. A page is mapped when a slot on it is
first allocated and unmapped as soon as no allocated slot touches it; its budget goes back at
the same moment, so the bytes a store holds in the budget are always exactly its mapped pages.

Allocation takes free slots on mapped pages first ("ready" slots), and maps new pages only for
the rest, lowest addresses first so that memory stays dense. Mapping beyond the budget is
refused page by page: `allocate` then returns fewer slots and the store evicts, exactly as when
a fixed tier is full.

Shrinking is the store's job (it moves blocks); the tier only says which blocks to move:
`plan_shrink` picks whole pages, coldest first — a page is as hot as the hottest block touching
it — because memory only comes back when every slot on a page is free.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch

from ...config import StoreConfig
from ...errors import TierKVError
from ..base import StoreAccess, TierAgent
from ..memory import PoolTier
from .budget import BudgetMember
from .vmm import CudaPages, PageBackend, page_backend


class ElasticTier(PoolTier):
    """A device tier over a `PageBackend`, optionally drawing its pages from a shared budget."""

    section = "elastic"

    def __init__(
        self, name: str, num_slots: int, slot_bytes: int, backend: PageBackend, budget: BudgetMember | None = None
    ) -> None:
        super().__init__(name, num_slots, slot_bytes, backend.device, verify_reads=False)
        if slot_bytes <= 0:
            raise ValueError(f"{name} tier: slot_bytes must be > 0, got {slot_bytes}")
        if backend.nbytes < num_slots * slot_bytes:
            raise ValueError(f"{name} tier: {num_slots} slots of {slot_bytes} bytes do not fit a range of {backend.nbytes} bytes")
        self.backend = backend
        self.budget = budget
        self.page_bytes = backend.page_bytes
        self.storage = backend.tensor[: num_slots * slot_bytes].view(num_slots, slot_bytes)
        self._free: set[int] = set(range(num_slots))  # type: ignore[assignment]  # a set: frees come in any order
        self._ready: set[int] = set()  # free slots whose pages are all mapped
        self._in_use = np.zeros(num_slots, dtype=bool)
        self._page_use = np.zeros(backend.num_pages, dtype=np.int64)  # allocated slots touching each page
        self._mapped_pages = 0
        # A store dropped without close() still gives its memory back when it is collected.
        self._finalizer = weakref.finalize(self, backend.close)

    # -- geometry -----------------------------------------------------------------------------

    @property
    def mapped_bytes(self) -> int:
        return self._mapped_pages * self.page_bytes

    @property
    def max_bytes(self) -> int:
        return self.backend.nbytes

    def _pages_of(self, slot: int) -> range:
        return range(slot * self.slot_bytes // self.page_bytes, ((slot + 1) * self.slot_bytes - 1) // self.page_bytes + 1)

    def _slots_on(self, page: int) -> range:
        first = page * self.page_bytes // self.slot_bytes
        last = min(self.num_slots - 1, ((page + 1) * self.page_bytes - 1) // self.slot_bytes)
        return range(first, last + 1)

    def _page_spans(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(entry, page) pairs: for each position in `slots`, every page its slot touches."""
        firsts = slots * self.slot_bytes // self.page_bytes
        spans = ((slots + 1) * self.slot_bytes - 1) // self.page_bytes - firsts + 1
        entry = np.repeat(np.arange(len(slots)), spans)
        offset = np.arange(int(spans.sum())) - np.repeat(np.cumsum(spans) - spans, spans)
        return entry, np.repeat(firsts, spans) + offset

    # -- slots --------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Up to `n` free slots, on mapped pages first; fewer when the budget has no more pages."""
        n = min(n, len(self._free))
        if n <= 0:
            return []
        grown = self._grow(n - len(self._ready)) if len(self._ready) < n else []
        taken = sorted(self._ready.pop() for _ in range(min(n, len(self._ready))))
        arr = np.asarray(taken, dtype=np.int64)
        self._in_use[arr] = True
        self._free.difference_update(taken)
        np.add.at(self._page_use, self._page_spans(arr)[1], 1)
        idle = [p for p in grown if self._page_use[p] == 0]  # a partial grant can leave a page no slot fits on
        if idle:
            self._unmap(idle)
        return taken

    def free(self, slots: Sequence[int]) -> None:
        """Slots back to the pool; pages no allocated slot touches any more are unmapped at once."""
        if not len(slots):
            return
        arr = np.asarray(slots, dtype=np.int64)
        if not self._in_use[arr].all() or len(np.unique(arr)) != arr.size:
            raise TierKVError(f"{self.name} tier: freeing a slot that is not allocated (or twice): {sorted(slots)}")
        self._in_use[arr] = False
        self._free.update(int(s) for s in arr)
        self._ready.update(int(s) for s in arr)
        pages = self._page_spans(arr)[1]
        np.subtract.at(self._page_use, pages, 1)
        empty = [int(p) for p in np.unique(pages) if self._page_use[p] == 0]
        if empty:
            self._unmap(empty)

    def _grow(self, need: int) -> list[int]:
        """Map the fewest lowest unmapped pages that make `need` more slots ready, as the budget allows."""
        mapped = self.backend.mapped
        chosen: list[int] = []
        covered: set[int] = set()
        gained = 0
        for p in np.flatnonzero(~mapped).tolist():
            chosen.append(p)
            covered.add(p)
            # A slot touching p becomes ready now if p was the last of its pages left unmapped.
            gained += sum(1 for s in self._slots_on(p) if all(mapped[q] or q in covered for q in self._pages_of(s)))
            if gained >= need:
                break
        if not chosen:
            return []
        granted = len(chosen)
        if self.budget is not None:
            granted = self.budget.acquire(len(chosen) * self.page_bytes, self.page_bytes) // self.page_bytes
        done = self.backend.map(chosen[:granted])
        if self.budget is not None and done < granted:  # the device itself ran out of memory
            self.budget.release((granted - done) * self.page_bytes)
        new = chosen[:done]
        self._mapped_pages += done
        for p in new:
            for s in self._slots_on(p):
                if not self._in_use[s] and all(mapped[q] for q in self._pages_of(s)):
                    self._ready.add(s)
        return new

    def _unmap(self, pages: list[int]) -> None:
        self.backend.unmap(pages)  # waits for queued GPU work first
        self._held.clear()
        self._mapped_pages -= len(pages)
        for p in pages:
            self._ready.difference_update(self._slots_on(p))
        if self.budget is not None:
            self.budget.release(len(pages) * self.page_bytes)

    # -- shrinking ----------------------------------------------------------------------------

    def plan_shrink(self, slots: Sequence[int], last_use: Sequence[int], pinned: Sequence[bool], nbytes: int,
                    keep_bytes: int = 0) -> list[int]:
        """Which blocks to move out so that at least `nbytes` of pages become empty.

        Inputs describe every block resident here: its slot, its last use, and whether it may not
        move (leased or in flight). Whole pages are emptied coldest first; a page holding a
        pinned block is never chosen, nor one whose blocks would (through slots straddling into
        neighbours) empty so many pages that fewer than `keep_bytes` stay mapped. Returns
        positions into the inputs, coldest block first; fewer pages than asked when the rest
        are pinned.
        """
        want_pages = -(-nbytes // self.page_bytes)
        max_pages = self._mapped_pages - -(-keep_bytes // self.page_bytes)
        if want_pages <= 0 or max_pages <= 0 or not len(slots):
            return []
        slot_arr = np.asarray(slots, dtype=np.int64)
        use = np.asarray(last_use, dtype=np.int64)
        entry, page = self._page_spans(slot_arr)
        pages = self.backend.num_pages
        hot = np.full(pages, -1, dtype=np.int64)
        np.maximum.at(hot, page, use[entry])
        pinned_pages = np.bincount(page, weights=np.asarray(pinned, dtype=np.float64)[entry], minlength=pages) > 0
        known = np.bincount(page, minlength=pages)
        # Pages whose every allocated slot belongs to a movable block.
        candidates = np.flatnonzero((known > 0) & ~pinned_pages & (known == self._page_use))
        order = candidates[np.argsort(hot[candidates], kind="stable")]
        by_page = np.argsort(page, kind="stable")
        starts = np.searchsorted(page[by_page], np.arange(pages + 1))
        remaining = self._page_use.copy()
        chosen = np.zeros(len(slot_arr), dtype=bool)
        freed = 0
        for p in order.tolist():
            if remaining[p] == 0:
                continue
            new = [e for e in set(entry[by_page[starts[p] : starts[p + 1]]].tolist()) if not chosen[e]]
            leaving: dict[int, int] = {}
            for e in new:
                for q in self._pages_of(int(slot_arr[e])):
                    leaving[q] = leaving.get(q, 0) + 1
            emptied = sum(1 for q, k in leaving.items() if remaining[q] == k)
            if freed + emptied > max_pages:
                continue
            chosen[new] = True
            for q, k in leaving.items():
                remaining[q] -= k
            freed += emptied
            if freed >= want_pages:
                break
        picks = np.flatnonzero(chosen)
        return picks[np.argsort(use[picks], kind="stable")].tolist()

    # -- bytes --------------------------------------------------------------------------------

    def _check_access(self, slots: Sequence[int]) -> None:
        """Touching an unmapped page faults the process (CPU) or the context (GPU): refuse it here."""
        if not self._in_use[np.asarray(slots, dtype=np.int64)].all():
            raise TierKVError(f"{self.name} tier: access to a slot that is not allocated: {sorted(slots)}")

    def agent(self, store: StoreAccess) -> TierAgent:
        """Shrink by demotion, and the dealings with the shared budget (see `shrink.py`)."""
        from .shrink import ElasticShrink

        return ElasticShrink(self, store)

    def close(self) -> None:
        """Unmap every page, give the range back and leave the budget."""
        self.storage = self.storage[:0]
        self._held.clear()
        self._finalizer()
        if self.budget is not None:
            self.budget.leave()

    def describe(self) -> dict[str, object]:
        """What `stats()` reports about the tier's pages and budget."""
        return {
            "backend": "cuda-vmm" if isinstance(self.backend, CudaPages) else "host-mmap",
            "page_bytes": self.page_bytes,
            "mapped_bytes": self.mapped_bytes,
            "max_bytes": self.max_bytes,
            "min_bytes": self.budget.min_bytes if self.budget is not None else 0,
            "budget": self.budget.name if self.budget is not None else None,
            "budget_bytes": self.budget.total_bytes if self.budget is not None else None,
        }


def elastic_device_tier(config: StoreConfig, slot_bytes: int, device: torch.device, label: str) -> ElasticTier:
    """The device tier `config` asks for with `device_elastic`: range sized for `device_bytes`."""
    num_slots = config.device_bytes // slot_bytes
    backend = page_backend(num_slots * slot_bytes, device, config.device_page_bytes)
    try:
        budget = None
        if config.gpu_budget_name is not None:
            assert config.gpu_budget_bytes is not None  # StoreConfig requires it with a name
            budget = BudgetMember(config.gpu_budget_name, config.gpu_budget_bytes, label, config.device_min_bytes, backend.nbytes)
        return ElasticTier("device", num_slots, slot_bytes, backend, budget)
    except BaseException:
        backend.close()
        raise
