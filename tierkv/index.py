"""The single source of truth for which block lives where, and which one leaves a tier next.

Each block records the slot it holds in every tier (inclusive hierarchy: a block promoted to a
faster tier keeps its slower copy), its parent, and how many of its children are resident,
counted by the fastest tier each child lives in. That count is what makes eviction
prefix-aware: a block is a *leaf of tier t* when no child is resident in t or any faster tier,
and only leaves leave a tier. So a prefix is never cut in the middle, and the last tier, which
deletes, only deletes blocks with no resident child anywhere: nothing is stranded.

Least-recently-used order is a lazy min-heap per tier of `(last_use, seq, block)`: touching a
block only stamps `last_use`; a popped entry whose stamp is stale is pushed back with the new
one. Each block has at most one entry per heap, so every operation is O(log n), and nothing
ever scans the whole index.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from typing import Protocol

from .keys import iter_chain, longest_stored_prefix

ABSENT = -1
PENDING = -2  # reserved for a block on its way into a tier: resident for leaf counts, no slot yet


class Block:
    """Index entry for one stored block."""

    __slots__ = ("key", "ident", "parent", "slots", "fastest", "copies", "child_fast", "leases", "last_use", "in_heap",
                 "checksum")

    def __init__(self, key: bytes, ident: bytes, parent: Block | None, num_tiers: int) -> None:
        self.key = key
        self.ident = ident  # parent key || token bytes: compared on every hit
        self.parent = parent
        self.slots = [ABSENT] * num_tiers
        # Kept by the index with `slots` (only the index changes them): read on every hit, so not recomputed.
        self.fastest = ABSENT  # the fastest tier holding the block, or ABSENT when it is nowhere
        self.copies = 0  # tiers holding it (a pending slot counts)
        self.child_fast = [0] * num_tiers  # children counted by the fastest tier they live in
        self.leases = 0
        self.last_use = 0
        self.in_heap = 0  # bit t set: this block has an entry in tier t's heap
        # TREE_CHECKSUM of the payload (integrity.py), set when the block first reaches a tier
        # that verifies reads (hashed on the GPU when it comes from GPU memory); every later read
        # from host, disk or a remote store is checked against it.
        self.checksum: int | None = None

    def is_leaf(self, tier: int) -> bool:
        """No child lives in `tier` or a faster one."""
        return not any(self.child_fast[: tier + 1])

    def has_resident_children(self) -> bool:
        return any(self.child_fast)


class Restored(Protocol):
    """What a persistent tier knows of a block it kept (a manifest record)."""

    @property
    def key(self) -> bytes: ...
    @property
    def ident(self) -> bytes: ...
    @property
    def is_root(self) -> bool: ...
    @property
    def slot(self) -> int: ...
    @property
    def last_use(self) -> int: ...
    @property
    def checksum(self) -> int: ...


class Index:
    """key -> Block, plus per-tier LRU-leaf heaps. Not thread-safe: the store holds the lock.

    `journaled` tiers (the persistent ones) get a journal of the blocks whose slot there changed,
    which the tier drains when it commits. `watch_changes` starts a journal of the keys whose
    fastest tier changed (or that appeared or went), for engines that mirror the store elsewhere.
    """

    def __init__(self, num_tiers: int, journaled: Collection[int] = ()) -> None:
        self.num_tiers = num_tiers
        self._journals: dict[int, dict[bytes, Block]] = {t: {} for t in journaled}
        self.changes: set[bytes] | None = None
        self.blocks: dict[bytes, Block] = {}
        self._heaps: list[list[tuple[int, int, Block]]] = [[] for _ in range(num_tiers)]
        self._seq = itertools.count()
        self._resident = [0] * num_tiers  # blocks with a real or pending slot, per tier
        self.leased_copies = 0  # slots, over all tiers, held by leased blocks: capacity that cannot move
        self._tick = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def tick(self) -> int:
        self._tick += 1
        return self._tick

    def advance_tick(self, at_least: int) -> None:
        """Continue the recency clock after the stamps of recovered blocks."""
        self._tick = max(self._tick, at_least)

    # -- lookups -----------------------------------------------------------------

    def lookup(self, seed: bytes, chunks: Sequence[bytes]) -> list[Block]:
        """Blocks of the longest stored prefix of the per-block token bytes `chunks`."""
        return longest_stored_prefix(seed, chunks, self.blocks)

    def unknown_links(self, start: bytes, chunks: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
        """(key, ident) of each of `chunks` chained on from key `start`, up to the first key already indexed.

        Called past the stored prefix: a key found there names other tokens (a hash collision),
        which ends the chain that can be stored or adopted.
        """
        links = []
        for key, ident in iter_chain(start, chunks):
            if key in self.blocks:
                break
            links.append((key, ident))
        return links

    def touch(self, blocks: Sequence[Block]) -> None:
        tick = self.tick()
        for b in blocks:
            b.last_use = tick

    # -- residency ---------------------------------------------------------------

    def add(self, key: bytes, ident: bytes, parent: Block | None, tier: int, slot: int, tick: int) -> Block:
        """Insert a new block resident in `tier`. Its parent, if any, must be resident."""
        return self.add_chain([(key, ident)], parent, [tier], [slot], tick)[0]

    def add_chain(self, links: Sequence[tuple[bytes, bytes]], parent: Block | None, tiers: Sequence[int],
                  slots: Sequence[int], tick: int) -> list[Block]:
        """Insert new blocks `links` ((key, ident) each), each the parent of the next, below `parent`.

        Block i lives in `tiers[i]` at `slots[i]` (a real slot). The same as `add` for each link in
        turn, at a fraction of the host time a long put spends here: each block is counted into
        its parent once, and heap entries are made only for blocks that are leaves once the whole
        chain is in (in a chain that is its last block), not pushed and left stale one by one.
        """
        blocks, n, m = self.blocks, self.num_tiers, len(links)
        if len(tiers) != m or len(slots) != m:
            raise ValueError(f"{m} links need as many tiers and slots, got {len(tiers)} and {len(slots)}")
        keys = [key for key, _ in links]
        if len(set(keys)) < m or not blocks.keys().isdisjoint(keys):
            raise KeyError("block already indexed (or named twice in the chain)")  # checked before anything changes
        added: list[Block] = []
        for (key, ident), tier, slot in zip(links, tiers, slots):
            block = Block(key, ident, parent, n)
            block.last_use = tick
            block.slots[tier] = slot
            block.fastest = tier
            block.copies = 1
            if parent is not None:
                parent.child_fast[tier] += 1
            added.append(block)
            parent = block
        if not added:
            return added
        blocks.update(zip(keys, added))
        for tier, count in Counter(tiers).items():
            self._resident[tier] += count
            journal = self._journals.get(tier)
            if journal is not None:
                journal.update((b.key, b) for b, t in zip(added, tiers) if t == tier)
        if self.changes is not None:
            self.changes.update(keys)
        first = added[0].parent
        if first is not None:  # it may have stopped being a leaf of some tier, or still be one of a faster tier
            self._push_where_resident(first)
        # Block i is a leaf of its tier only if its child (block i + 1) lives in a slower one.
        for i in [i for i, (t, child) in enumerate(zip(tiers, tiers[1:])) if child > t] + [m - 1]:
            self._maybe_push(added[i], tiers[i])
        return added

    def journal(self, tier: int) -> dict[bytes, Block]:
        """Blocks whose slot in journaled tier `tier` changed since the tier last drained this."""
        return self._journals[tier]

    def watch_changes(self) -> None:
        """Start journaling keys whose fastest tier changes (`changes`); idempotent."""
        if self.changes is None:
            self.changes = set()

    def restore(self, tier: int, entries: Sequence[Restored]) -> list[Block]:
        """Bulk-insert blocks recovered by a persistent tier, parents before their children.

        A non-root's parent key is `ident[:16]`. One pass and one heapify instead of an
        insertion per block: this is what makes a warm restart of 100k blocks fast.
        """
        bit = 1 << tier
        added = []
        blocks = self.blocks
        for e in entries:
            parent = None if e.is_root else blocks[e.ident[:16]]
            b = Block(e.key, e.ident, parent, self.num_tiers)
            b.slots[tier] = e.slot
            b.fastest, b.copies = tier, 1
            b.last_use = e.last_use
            b.checksum = e.checksum
            blocks[e.key] = b
            if parent is not None:
                parent.child_fast[tier] += 1
            added.append(b)
        self._resident[tier] += len(added)
        heap = self._heaps[tier]
        for b in added:
            if b.is_leaf(tier):
                b.in_heap |= bit
                heap.append((b.last_use, next(self._seq), b))
        heapq.heapify(heap)
        self.advance_tick(max((b.last_use for b in added), default=0))
        return added

    def set_slot(self, block: Block, tier: int, slot: int) -> None:
        """Record that `block` lives in `tier` at `slot` (or PENDING)."""
        was = block.fastest
        if block.slots[tier] == ABSENT:
            self._resident[tier] += 1
            block.copies += 1
            if block.leases:
                self.leased_copies += 1
            if was == ABSENT or tier < was:
                block.fastest = tier
        block.slots[tier] = slot
        if slot != PENDING:
            self._maybe_push(block, tier)
            journal = self._journals.get(tier)
            if journal is not None:
                journal[block.key] = block
        self._fastest_changed(block, was)

    def clear_slot(self, block: Block, tier: int) -> int:
        """Forget `block`'s copy in `tier`; drop it from the index when no copy is left.

        Returns the slot it held. Refuses to orphan resident children: that would be a bug.
        """
        slot = block.slots[tier]
        if slot == ABSENT:
            raise KeyError(f"block is not resident in tier {tier}")
        was = block.fastest
        block.slots[tier] = ABSENT
        block.copies -= 1
        if was == tier:
            block.fastest = next((t for t, s in enumerate(block.slots) if s != ABSENT), ABSENT)
        self._resident[tier] -= 1
        if block.leases:
            self.leased_copies -= 1
        journal = self._journals.get(tier)
        if journal is not None:
            journal[block.key] = block
        if block.fastest == ABSENT:
            if block.has_resident_children():
                raise AssertionError("dropping a block whose children are resident would strand them")
            del self.blocks[block.key]
        self._fastest_changed(block, was)
        return slot

    def _children(self) -> dict[int, list[Block]]:
        children: dict[int, list[Block]] = {}
        for b in self.blocks.values():
            if b.parent is not None:
                children.setdefault(id(b.parent), []).append(b)
        return children

    @staticmethod
    def _descend(root: Block, children: dict[int, list[Block]]) -> list[Block]:
        order = [root]
        for b in order:
            order.extend(children.get(id(b), ()))
        return order

    def subtree(self, root: Block) -> list[Block]:
        """`root` and every indexed descendant, children after their parents.

        O(number of blocks): used only when a corrupt block must be removed together with
        everything that depends on it, which is rare by construction.
        """
        return self._descend(root, self._children())

    def branches(self, roots: Sequence[Block]) -> Iterator[list[Block]]:
        """The subtree of each root still indexed, parents first, in one O(number of blocks) pass.

        Roots inside an earlier root's subtree are skipped: they went with it.
        """
        children = self._children()
        taken: set[int] = set()
        for root in roots:
            if id(root) in taken or self.blocks.get(root.key) is not root:
                continue
            branch = self._descend(root, children)
            taken.update(id(b) for b in branch)
            yield branch

    def cold_branches(self, tier: int) -> Iterator[list[Block]]:
        """Subtrees rooted in `tier`, coldest root first, with no leased or in-flight block.

        The last resort of eviction, when no leaf of a tier can leave (every block there is the
        parent of something resident above it): deleting a whole cold branch frees room without
        stranding anything. O(number of blocks) per call, so only that rare path uses it.
        """
        children = self._children()
        roots = sorted((b for b in self.blocks.values() if b.slots[tier] >= 0), key=lambda b: b.last_use)
        for root in roots:
            if self.blocks.get(root.key) is not root or root.slots[tier] < 0:
                continue  # went with an earlier branch
            branch = self._descend(root, children)
            if all(b.leases == 0 and PENDING not in b.slots for b in branch):
                yield branch

    def resident_count(self, tier: int) -> int:
        return self._resident[tier]

    def _fastest_changed(self, block: Block, was: int) -> None:
        now = block.fastest
        if now == was:
            return
        if self.changes is not None:
            self.changes.add(block.key)
        parent = block.parent
        if parent is None:
            return
        if was != ABSENT:
            parent.child_fast[was] -= 1
        if now != ABSENT:
            parent.child_fast[now] += 1
        self._push_where_resident(parent)  # it may have become a leaf in some tier

    # -- leases ------------------------------------------------------------------

    def acquire(self, blocks: Sequence[Block]) -> None:
        taken = 0
        for b in blocks:
            if not b.leases:
                taken += b.copies
            b.leases += 1
        self.leased_copies += taken

    def release(self, blocks: Sequence[Block]) -> None:
        for b in blocks:
            held = b.leases
            if held <= 0:
                raise AssertionError("lease released more often than taken")
            b.leases = held - 1
            if held == 1:
                self.leased_copies -= b.copies
                self._push_where_resident(b)

    # -- eviction order ----------------------------------------------------------

    def _push_where_resident(self, block: Block) -> None:
        """A heap entry for `block` in every tier with a real slot of it where it is now an unleased leaf."""
        below = block.child_fast
        for t, slot in enumerate(block.slots):
            if below[t]:
                return  # a child lives in tier t: the block is no leaf of t or of any slower tier
            if slot >= 0:
                self._maybe_push(block, t)

    def _maybe_push(self, block: Block, tier: int) -> None:
        bit = 1 << tier
        if block.in_heap & bit or block.leases or not block.is_leaf(tier):
            return
        block.in_heap |= bit
        heap = self._heaps[tier]
        heapq.heappush(heap, (block.last_use, next(self._seq), block))
        if len(heap) > 2 * self._resident[tier] + 64:
            self._compact(tier)

    def _compact(self, tier: int) -> None:
        bit = 1 << tier
        keep = []
        for entry in self._heaps[tier]:
            b = entry[2]
            if b.slots[tier] >= 0 and self.blocks.get(b.key) is b:
                keep.append(entry)
            else:
                b.in_heap &= ~bit
        heapq.heapify(keep)
        self._heaps[tier] = keep

    def pop_victim(self, tier: int) -> Block | None:
        """Least-recently-used unleased leaf with a real slot in `tier`, taken off the heap.

        The caller must then move it out of the tier.
        """
        heap = self._heaps[tier]
        bit = 1 << tier
        while heap:
            stamp, _, block = heap[0]
            if block.slots[tier] < 0 or block.leases or not block.is_leaf(tier):
                heapq.heappop(heap)  # re-pushed when it becomes a candidate again
                block.in_heap &= ~bit
                continue
            if stamp != block.last_use:
                heapq.heapreplace(heap, (block.last_use, next(self._seq), block))
                continue
            heapq.heappop(heap)
            block.in_heap &= ~bit
            return block
        return None
