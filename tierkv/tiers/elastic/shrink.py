"""The part of `BlockStore` that serves a shared GPU budget: shrink the elastic device tier by demotion.

Kept apart from the store's main file because it is one policy with one job: when this store
must give pages back (asked by the budget for another store, or by `shrink_device`), move its
coldest device blocks to host, whole pages at a time, and tell the budget. It is a mixin: it
works on the store's own index, tiers, lock and counters, declared below.
"""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from ...errors import TierKVError
from ...index import ABSENT, PENDING, Block, Index
from .tier import ElasticTier

if TYPE_CHECKING:
    from .budget import BudgetMember
    from ...layout import KVLayout
    from ...stats import StoreCounters
    from ..base import Tier


class ElasticShrink:
    """Shrink-by-demotion of `BlockStore`'s elastic device tier and its dealings with the budget."""

    # What the store provides (see `BlockStore.__init__`).
    index: Index
    tiers: list[Tier]
    layout: KVLayout
    _lock: threading.RLock
    _closed: bool
    _counters: StoreCounters
    _names: list[str]
    _budget: BudgetMember | None
    _shrinks: int
    _shrink_demoted: int
    _published: float

    if TYPE_CHECKING:
        def _locked(self) -> AbstractContextManager[None]: ...
        def _reserve(self, t: int, n: int, drop_stuck: bool = False) -> list[int]: ...
        def _move_down(self, t: int, src_slots: list[int], dst_slots: list[int], blocks: list[Block]) -> None: ...
        def _drop_branch(self, branch: list[Block], keep_tier: int | None = None) -> list[int]: ...

    def shrink_device(self, target_bytes: int) -> int:
        """Demote device blocks to host until the elastic device tier maps at most `target_bytes`.

        Whole pages are emptied, coldest first (`ElasticTier.plan_shrink`); any unleased block may
        be demoted, since its copy stays resident below. What host has no room for is dropped
        leaves first (see `_vacate_device`). Returns the bytes of pages given back, which is
        less than asked when leased blocks hold the rest.
        """
        if not isinstance(self.tiers[0], ElasticTier):
            raise TierKVError("shrink_device needs an elastic device tier (StoreConfig(device_elastic=True))")
        if isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or target_bytes < 0:
            raise ValueError(f"target_bytes must be an int >= 0, got {target_bytes!r}")
        with self._locked():
            return self._shrink_device(target_bytes)

    def _shrink_device(self, target_bytes: int) -> int:
        tier = self.tiers[0]
        assert isinstance(tier, ElasticTier)
        before = tier.mapped_bytes
        if before <= target_bytes:
            return 0
        # A block is as hot as its hottest descendant on the device, so that cold pages hold
        # whole cold subtrees and leaves leave before their parents. The index dict is in
        # insertion order, parents before children: walked backwards, children come first, and
        # that position breaks ties of recency (a child colder than its parent).
        heat: dict[int, int] = {}
        resident: list[Block] = []
        for b in reversed(self.index.blocks.values()):
            if b.slots[0] >= 0:
                h = heat[id(b)] = max(b.last_use, heat.get(id(b), 0))
                if b.parent is not None and b.parent.slots[0] >= 0 and heat.get(id(b.parent), 0) < h:
                    heat[id(b.parent)] = h
                resident.append(b)
        # Never below the store's promised minimum by overshooting (a slot straddling pages can
        # empty two at once), unless asked explicitly for less than that.
        keep = min(target_bytes, tier.budget.min_bytes if tier.budget is not None else 0)
        n = len(resident)
        picks = tier.plan_shrink([b.slots[0] for b in resident], [heat[id(b)] * n + i for i, b in enumerate(resident)],
                                 [b.leases > 0 or PENDING in b.slots for b in resident], before - target_bytes, keep)
        self._vacate_device([resident[i] for i in sorted(picks)])  # children first, as `resident` is
        return before - tier.mapped_bytes

    def _vacate_device(self, victims: list[Block]) -> None:
        """Move `victims` (children before parents) out of the device tier, then free their slots and pages.

        Blocks with a copy below just leave. The others are demoted parents first, so that when
        host is short of room the heads of prefixes are the ones kept; what host cannot take is
        dropped children first when nothing depends on it. That turns heads whose children all
        went into leaves of host, which the next round may evict to make room for blocks that
        must stay resident (parents of blocks kept on the device): rounds go on while they help.
        When host holds nothing but parents of device blocks, the blocks still stuck go with
        their descendants (unless one is leased): the memory must go back to the budget.
        """
        index, dev = self.index, self.tiers[0]
        freed = [index.clear_slot(v, 0) for v in victims if any(s != ABSENT for s in v.slots[1:])]
        alone = [v for v in reversed(victims) if all(s == ABSENT for s in v.slots[1:])]
        progress = True
        while alone and progress:
            progress = False
            while alone:
                dst = self._reserve(1, len(alone))
                if not dst:
                    break
                progress = True
                moved, alone = alone[: len(dst)], alone[len(dst) :]
                self._move_down(0, [v.slots[0] for v in moved], dst, moved)
                nbytes = len(moved) * dev.slot_bytes
                self._counters.moved_bytes(self._names[0], self._names[1], nbytes)
                self._shrink_demoted += nbytes
                for v, slot in zip(moved, dst):
                    index.set_slot(v, 1, slot)
                    freed.append(index.clear_slot(v, 0))
            stuck = []
            for v in reversed(alone):  # children first: a parent may go once its children have
                if v.has_resident_children():
                    stuck.append(v)
                else:
                    freed.append(index.clear_slot(v, 0))
                    self._counters.dropped += 1
                    progress = True
            alone = stuck[::-1]
        for branch in self.index.branches(alone):  # a stuck child goes with its parent's branch
            # Leases cover whole prefixes: a leased descendant would mean a leased victim.
            assert not any(b.leases or PENDING in b.slots for b in branch), "a shrink victim's branch is leased"
            self._counters.dropped += len(branch)
            freed += self._drop_branch(branch, keep_tier=0)
        self._counters.tiers[self._names[0]].evictions += len(freed)
        dev.free(freed)

    def _honour_shrink(self, blocking: bool) -> bool:
        """Act on this store's pending shrink request; False if the lock was busy and `blocking` is off."""
        assert self._budget is not None
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            target = self._budget.pending_target()
            if target is not None and not self._closed:
                try:
                    self._shrink_device(target)
                    self._shrinks += 1
                finally:  # even after a failure: a request left pending would be retried by every operation
                    self._budget.settle(target)
                self._publish_budget()
            return True
        finally:
            self._lock.release()

    def _publish_budget(self) -> None:
        assert self._budget is not None
        c = self._counters.tiers[self._names[0]]
        resident = self.index.resident_count(0)
        self._budget.publish(resident * self.layout.block_bytes, c.hits, c.hits + c.misses, resident, self._shrink_demoted)
        self._published = time.monotonic()

    def _watch_budget(self) -> None:
        """Let the budget's watcher thread act for this store while it is idle, without keeping it alive."""
        ref = weakref.ref(self)

        def on_request(blocking: bool) -> bool:
            store = ref()
            return store is None or store._honour_shrink(blocking)

        def on_tick() -> bool:
            store = ref()
            if store is None:
                return False
            if store._lock.acquire(blocking=False):  # never wait here: close() joins this thread
                try:
                    if not store._closed:
                        store._publish_budget()
                finally:
                    store._lock.release()
            return True

        assert self._budget is not None
        self._budget.start_watcher(on_request, on_tick)

