"""The elastic tier's agent: shrink by demotion, and the dealings with a shared GPU budget.

When the store must give pages back (asked by the budget for another store, or by
`BlockStore.shrink_device`), the agent moves the coldest device blocks to the next tier down,
whole pages at a time, through the store's placement policy, and tells the budget. It acts
before each operation of the store (a pending request), after it (the store's row in the budget),
and from the budget's watcher thread while the store is idle.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from ...index import ABSENT, PENDING, Block
from ..base import StoreAccess, TierAgent
from .tier import ElasticTier

_PUBLISH_S = 0.1  # least interval between two refreshes of this store's row in a GPU budget


class ElasticShrink(TierAgent):
    """Shrink-by-demotion of one store's elastic device tier and its dealings with the budget."""

    def __init__(self, tier: ElasticTier, store: StoreAccess) -> None:
        self.tier = tier
        self.store = store
        self.placement = store.placement
        self.position = store.position
        self.budget = tier.budget
        self.shrinks = 0  # shrink requests acted on, and the bytes they demoted
        self.demoted_bytes = 0
        self._published = 0.0
        if self.budget is not None:
            self._watch_budget()

    # -- hooks of the store -------------------------------------------------------------------

    def before_operation(self) -> None:
        if self.budget is not None and self.budget.pending_target() is not None:
            self._honour_shrink(blocking=True)

    def after_operation(self) -> None:
        if self.budget is not None and time.monotonic() - self._published >= _PUBLISH_S:
            self._publish_budget()

    def describe(self) -> dict[str, Any]:
        return {"shrinks": self.shrinks, "demoted_bytes": self.demoted_bytes}

    def shrink(self, target_bytes: int) -> int:
        """Demote device blocks to host until the elastic device tier maps at most `target_bytes`.

        Whole pages are emptied, coldest first (`ElasticTier.plan_shrink`); any unleased block may
        be demoted, since its copy stays resident below. What host has no room for is dropped
        leaves first (see `_vacate_device`). Returns the bytes of pages given back, which is
        less than asked when leased blocks hold the rest.
        """
        if isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or target_bytes < 0:
            raise ValueError(f"target_bytes must be an int >= 0, got {target_bytes!r}")
        with self.store.locked():
            return self._shrink_device(target_bytes)

    def _shrink_device(self, target_bytes: int) -> int:
        tier, d = self.tier, self.position
        index = self.placement.index
        before = tier.mapped_bytes
        if before <= target_bytes:
            return 0
        # A block is as hot as its hottest descendant on the device, so that cold pages hold
        # whole cold subtrees and leaves leave before their parents. The index dict is in
        # insertion order, parents before children: walked backwards, children come first, and
        # that position breaks ties of recency (a child colder than its parent).
        heat: dict[int, int] = {}
        resident: list[Block] = []
        for b in reversed(index.blocks.values()):
            if b.slots[d] >= 0:
                h = heat[id(b)] = max(b.last_use, heat.get(id(b), 0))
                if b.parent is not None and b.parent.slots[d] >= 0 and heat.get(id(b.parent), 0) < h:
                    heat[id(b.parent)] = h
                resident.append(b)
        # Never below the store's promised minimum by overshooting (a slot straddling pages can
        # empty two at once), unless asked explicitly for less than that.
        keep = min(target_bytes, tier.budget.min_bytes if tier.budget is not None else 0)
        n = len(resident)
        picks = tier.plan_shrink([b.slots[d] for b in resident], [heat[id(b)] * n + i for i, b in enumerate(resident)],
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
        placement, d = self.placement, self.position
        index, dev, counters = placement.index, self.tier, placement.counters
        below = d + 1
        freed = [index.clear_slot(v, d) for v in victims if any(s != ABSENT for s in v.slots[below:])]
        alone = [v for v in reversed(victims) if all(s == ABSENT for s in v.slots[below:])]
        progress = True
        while alone and progress:
            progress = False
            while alone:
                dst = placement.reserve(below, len(alone)) if below < len(placement.tiers) else []
                if not dst:
                    break
                progress = True
                moved, alone = alone[: len(dst)], alone[len(dst) :]
                placement.copy(d, [v.slots[d] for v in moved], below, dst, moved)
                self.demoted_bytes += len(moved) * dev.slot_bytes
                for v, slot in zip(moved, dst):
                    index.set_slot(v, below, slot)
                    freed.append(index.clear_slot(v, d))
            stuck = []
            for v in reversed(alone):  # children first: a parent may go once its children have
                if v.has_resident_children():
                    stuck.append(v)
                else:
                    freed.append(index.clear_slot(v, d))
                    counters.dropped += 1
                    progress = True
            alone = stuck[::-1]
        for branch in index.branches(alone):  # a stuck child goes with its parent's branch
            # Leases cover whole prefixes: a leased descendant would mean a leased victim.
            assert not any(b.leases or PENDING in b.slots for b in branch), "a shrink victim's branch is leased"
            counters.dropped += len(branch)
            freed += placement.drop_branch(branch, keep_tier=d)
        counters.tiers[dev.name].evictions += len(freed)
        dev.free(freed)

    def _honour_shrink(self, blocking: bool) -> bool:
        """Act on this store's pending shrink request; False if the lock was busy and `blocking` is off."""
        assert self.budget is not None
        lock = self.store.lock
        if not lock.acquire(blocking=blocking):
            return False
        try:
            target = self.budget.pending_target()
            if target is not None and not self.store.is_closed():
                try:
                    self._shrink_device(target)
                    self.shrinks += 1
                finally:  # even after a failure: a request left pending would be retried by every operation
                    self.budget.settle(target)
                self._publish_budget()
            return True
        finally:
            lock.release()

    def _publish_budget(self) -> None:
        assert self.budget is not None
        c = self.placement.counters.tiers[self.tier.name]
        resident = self.placement.index.resident_count(self.position)
        self.budget.publish(resident * self.tier.slot_bytes, c.hits, c.hits + c.misses, resident, self.demoted_bytes)
        self._published = time.monotonic()

    def _watch_budget(self) -> None:
        """Let the budget's watcher thread act for this store while it is idle, without keeping it alive."""
        ref = weakref.ref(self)

        def on_request(blocking: bool) -> bool:
            agent = ref()
            return agent is None or agent._honour_shrink(blocking)

        def on_tick() -> bool:
            agent = ref()
            if agent is None:
                return False
            lock = agent.store.lock
            if lock.acquire(blocking=False):  # never wait here: close() joins this thread
                try:
                    if not agent.store.is_closed():
                        agent._publish_budget()
                finally:
                    lock.release()
            return True

        assert self.budget is not None
        self.budget.start_watcher(on_request, on_tick)

