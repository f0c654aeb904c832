"""Where blocks go: placement of new blocks, eviction by demotion, promotion on hit, verified reads.

The policy works on the index and on tiers through their interface only (`tiers/base.py`); it
never asks what kind a tier is. Tiers are ordered fastest first; a block evicted from tier `t`
moves to `t + 1` unless a copy is already there, and only the last tier deletes. The store holds
its lock around every call.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import CapacityError
from .index import ABSENT, PENDING, Block, Index
from .ops.checksum import QueuedChecksums, block_checksums, queue_block_checksums
from .ops.chunk_copy import CACHED_PIECE_BYTES
from .ops.streams import side_stream
from .stats import StoreCounters
from .tiers.base import Tier, TierRead, need_checksums, stamp_checksums
from .tiers.host_rows import empty_rows

if TYPE_CHECKING:
    from .layout import KVLayout
    from .ops.engine_layout import EngineKV
    from .ops.layer_copy import LayerCopy


PUT_PIECE_BYTES = 128 << 20  # a long put is placed and written this much at a time (`add_chain`)
LOAD_PIECE_BYTES = 128 << 20  # GPU rows a verified load into an engine's GPU pages stages at a time
READ_AHEAD = 2  # pieces of a verified load in flight: copied while earlier ones are verified and scattered

# How a chain's new blocks reach their tier: (tier position, slots, positions in the chain, blocks).
Writer = Callable[[int, list[int], slice, list[Block]], None]


def group_by(items: Iterable[int], keys: Iterable[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for item, key in zip(items, keys):
        groups[key].append(item)
    return groups


@dataclass(frozen=True)
class Spots:
    """Where a chain of new blocks goes: the tier and slot of each, slowest tier first (the head)."""

    tiers: list[int]
    slots: list[int]


@dataclass
class Verified:
    """Blocks that failed their checksum (with the tier they were read from), and those that passed in this call."""

    corrupt: list[tuple[Block, int]] = field(default_factory=list)
    checked: set[int] = field(default_factory=set)  # id() of blocks whose bytes were verified by this call


class ReadAhead:
    """Pieces of a tier's slots copied to a GPU ahead of their use, on a side stream.

    A verified load copies a piece into GPU rows, waits for its checksums, then scatters it.
    Were the copies queued on the caller's stream, each would start only once the previous
    piece was verified; here up to `READ_AHEAD` pieces are in flight on the side stream while
    the caller's stream verifies and scatters earlier ones. `next()` hands the pieces out in
    order, each ordered before what follows on the caller's stream.
    """

    def __init__(self, tier: Tier, pieces: list[list[int]], device: torch.device) -> None:
        self.tier, self.device = tier, device
        self.pieces = iter(pieces)
        self.queued: deque[tuple[TierRead, torch.cuda.Event | None]] = deque()
        self.side = side_stream(device, "read-ahead") if pieces and device.type == "cuda" else None
        if self.side is not None:
            self.side.wait_stream(torch.cuda.current_stream(device))  # rows reuse memory the caller's stream freed
        for _ in range(READ_AHEAD):
            self._queue()

    def _queue(self) -> None:
        slots = next(self.pieces, None)
        if slots is None:
            return
        if self.side is None:
            self.queued.append((self.tier.read_to(slots, self.device), None))
            return
        with torch.cuda.stream(self.side):
            read = self.tier.read_to(slots, self.device)
            done = torch.cuda.Event()
            done.record(self.side)
        self.queued.append((read, done))

    def next(self) -> TierRead:
        read, done = self.queued.popleft()
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            read.rows.record_stream(stream)  # allocated on the side stream, used and freed on this one
        self._queue()
        return read


class GpuChecksums:
    """Checksums of a put's GPU rows, hashed once on the GPU for all the new blocks of the put.

    A put is written in pieces (`add_chain`); hashing each piece as it is written would wait
    for the GPU once per piece, behind the previous piece's copy. Instead every row from the
    first new block on is hashed in one kernel pass, queued (`start`) as soon as the put knows
    which blocks are new, so the kernels run while the host evicts and indexes for the first
    piece; each piece stamps its blocks from that. Rows in host memory are left to the tiers,
    which hash them where they land.
    """

    def __init__(self, rows: torch.Tensor, first_block: int) -> None:
        self.rows, self.first_block = rows, first_block
        self.start_at = 0  # chain position of the first checksum queued
        self.queued: QueuedChecksums | None = None

    def start(self, position: int) -> None:
        """Queue the hash of the rows from chain position `position` on (the put's first new block)."""
        if self.rows.is_cuda and self.queued is None:
            self.start_at = position
            self.queued = queue_block_checksums(self.rows[position - self.first_block :])

    def stamp(self, blocks: Sequence[Block], span: slice) -> None:
        """Give `blocks` (chain positions `span`) their checksums, if the rows are on a GPU and they have none."""
        if not self.rows.is_cuda or not need_checksums(blocks):
            return
        if self.queued is None or span.start < self.start_at:
            self.queued = None
            self.start(span.start)
        assert self.queued is not None
        sums = self.queued.result()
        stamp_checksums(blocks, sums[span.start - self.start_at : span.stop - self.start_at])


class Placement:
    """The eviction, demotion and promotion policy of one store's tiers."""

    def __init__(self, tiers: Sequence[Tier], index: Index, counters: StoreCounters) -> None:
        self.tiers = list(tiers)
        self.index = index
        self.counters = counters
        self.names = [t.name for t in self.tiers]
        # Where hits are promoted: the first tier with slots (no device tier behind an engine).
        self.top = next((t for t, tier in enumerate(self.tiers) if tier.num_slots > 0), 0)
        # Where each tier's victims go: the next tier that takes writes; None: they are deleted.
        self.demotes_to = [next((u for u in range(t + 1, len(self.tiers)) if self.tiers[u].takes_writes), None)
                           for t in range(len(self.tiers))]
        self.through = [t for t, tier in enumerate(self.tiers) if tier.write_through and tier.takes_writes]

    # -- placing new blocks --------------------------------------------------------

    def place(self, n: int) -> Spots:
        """Reserve slots for `n` new chain blocks: the tail in the fastest tier with room.

        On failure every reserved slot goes back and `CapacityError` says why.
        """
        reserved: list[tuple[int, list[int]]] = []
        remaining = n
        try:
            # First without deleting anything that could still move down; then, if the chain
            # still does not fit, allow deleting blocks nothing depends on.
            for drop_stuck in (False, True):
                # Deleting in one tier can unblock another (a parent becomes a leaf once its
                # child is gone): with deletion allowed, go round until a round frees nothing.
                while remaining:
                    before = remaining
                    for t in range(len(self.tiers)):
                        if remaining == 0:
                            break
                        if not self.tiers[t].takes_writes:
                            continue
                        slots = self.reserve(t, remaining, drop_stuck)
                        reserved.append((t, slots))
                        remaining -= len(slots)
                    if remaining == before or not drop_stuck:
                        break
            if remaining:
                raise CapacityError(self.capacity_message(n, n - remaining))
        except BaseException:
            for t, slots in reserved:
                self.tiers[t].free(slots)
            raise
        by_tier: dict[int, list[int]] = defaultdict(list)
        for t, slots in reserved:
            by_tier[t] += slots
        spots = Spots([], [])
        for t in sorted(by_tier, reverse=True):  # slowest tier first: it takes the head of the chain
            spots.tiers.extend([t] * len(by_tier[t]))
            spots.slots.extend(by_tier[t])
        return spots

    def add_chain(self, parent: Block | None, chain: list[tuple[bytes, bytes]], start: int, write: Writer) -> list[Block]:
        """Index and write the new blocks `chain` ((key, ident) each) below `parent`, at chain positions `start..`.

        Refused with `CapacityError` before anything is evicted when leases leave too little
        room; if a write fails, every new block is taken out again (children first) and the
        error propagates. Long chains are placed, indexed and written `PUT_PIECE_BYTES` at a
        time, so the first piece's copy (asynchronous when it involves a GPU) runs while the
        next piece's eviction and bookkeeping are done on the host; earlier pieces are leased
        meanwhile, so making room for a later one never evicts them. (Pieces that start small
        and double did not start the first copy sooner: each piece has a fixed host cost of a
        few hundred microseconds, more than a small piece's copy.)
        """
        m = len(chain)
        movable = self.movable_slots()
        if m > movable:
            raise CapacityError(self.capacity_message(m, max(movable, 0)))
        per = max(1, PUT_PIECE_BYTES // max(self.tiers[0].slot_bytes, 1))
        added: list[Block] = []
        try:
            for a in range(0, m, per):
                piece = self._add_piece(parent, chain[a : a + per], start + a, write)
                self.index.acquire(piece)
                added += piece
                parent = piece[-1]
        except BaseException:
            self.index.release(added)
            self._take_out(added)
            raise
        self.index.release(added)
        self.write_through(added)
        return added

    def _add_piece(self, parent: Block | None, chain: list[tuple[bytes, bytes]], start: int,
                   write: Writer) -> list[Block]:
        """Place, index and write one piece of `add_chain`; on a failed write its blocks are taken out again."""
        m = len(chain)
        spots = self.place(m)
        added = self.index.add_chain(chain, parent, spots.tiers, spots.slots, self.index.tick())
        try:
            for t, positions in group_by(range(m), spots.tiers).items():
                span = slice(positions[0], positions[-1] + 1)  # positions are consecutive
                write(t, spots.slots[span], slice(start + span.start, start + span.stop), added[span])
        except BaseException:
            self._take_out(added)
            raise
        return added

    def _take_out(self, blocks: list[Block]) -> None:
        """Drop new blocks again, children first (nothing is ever stranded), freeing their slots."""
        for b in reversed(blocks):
            for t in range(len(self.tiers)):
                if b.slots[t] != ABSENT:
                    self.tiers[t].free([self.index.clear_slot(b, t)])

    def write_through(self, blocks: list[Block]) -> None:
        """Copy new blocks into each write-through tier as they are stored, so that its other readers see them at once."""
        for t in self.through:
            todo = [b for b in blocks if b.slots[t] == ABSENT]
            slots = self.reserve(t, len(todo)) if todo else []
            todo = todo[: len(slots)]
            for src, picks in group_by(range(len(todo)), [b.fastest for b in todo]).items():
                group, dst = [todo[i] for i in picks], [slots[i] for i in picks]
                self.copy(src, [b.slots[src] for b in group], t, dst, group)
                for b, slot in zip(group, dst):
                    self.index.set_slot(b, t, slot)

    def adopt(self, t: int, parent: Block | None, chain: list[tuple[bytes, bytes]], checksums: list[int]) -> list[Block]:
        """Index the blocks `chain` ((key, ident) each) that the shared tier `t` holds below `parent`.

        They get slots of `t` (as many as it can give: the rest stay unknown) and the checksums its
        probe read, against which their bytes are verified when they are read.
        """
        if parent is not None:
            self.index.acquire([parent])  # making room must not forget the block they hang from
        try:
            slots = self.reserve(t, len(checksums))
        finally:
            if parent is not None:
                self.index.release([parent])
        m = min(len(chain), len(slots))
        added = self.index.add_chain(chain[:m], parent, [t] * m, slots[:m], self.index.tick())
        for block, checksum in zip(added, checksums):
            block.checksum = checksum
        self.tiers[t].adopt(slots, added)
        return added

    def movable_slots(self) -> int:
        """Slots over all tiers that are not held by leased blocks: the most a put can ever take."""
        return sum(t.num_slots for t in self.tiers if t.takes_writes) - self.index.leased_copies

    def capacity_message(self, need: int, room: int) -> str:
        sizes = ", ".join(f"{t.name} {t.num_slots}" for t in self.tiers)
        return (
            f"cannot store {need} new blocks of {self.tiers[0].slot_bytes} bytes: only {room} fit "
            f"(slots per tier: {sizes}; {self.index.leased_copies} slots hold leased blocks that cannot move). "
            "Release leases, store a shorter prefix, or raise device_bytes / host_bytes."
        )

    # -- eviction ------------------------------------------------------------------

    def reserve(self, t: int, n: int, drop_stuck: bool = False) -> list[int]:
        """Up to `n` free slots of tier `t`, evicting its least-recently-used leaves as needed.

        A victim that has a copy in a slower tier just leaves; one that has not is demoted to
        the next tier (which may evict in turn); the last tier deletes. A victim that cannot
        be demoted for lack of room below stays, and fewer slots are returned — unless
        `drop_stuck`: then a stuck victim that no resident block depends on is deleted, and if
        leaves alone cannot make room, whole cold branches are (see `Index.cold_branches`).
        """
        index, tier = self.index, self.tiers[t]
        slots = tier.allocate(n)
        down = self.demotes_to[t]
        moving: list[tuple[Block, int]] = []
        while len(slots) + len(moving) < n:
            victim = index.pop_victim(t)
            if victim is None:
                break
            self.counters.tiers[tier.name].evictions += 1
            below = max(victim.slots[t + 1 :], default=ABSENT) >= 0  # a real copy below (PENDING and ABSENT are < 0)
            if down is None or below:
                slots.append(index.clear_slot(victim, t))
                self.counters.dropped += int(not below)
            else:
                index.set_slot(victim, down, PENDING)  # so its parent sees it stay resident
                moving.append((victim, index.clear_slot(victim, t)))
        if drop_stuck and len(slots) + len(moving) < n:
            self.drop_cold_branches(t, n - len(moving), slots)
        if down is None or not moving:
            return slots
        dst = self.reserve(down, len(moving))
        if dst:
            src = [old for _, old in moving[: len(dst)]]
            self.copy(t, src, down, dst, [victim for victim, _ in moving[: len(dst)]])
            for (victim, old), new in zip(moving, dst):
                index.set_slot(victim, down, new)
                slots.append(old)
        for victim, old in moving[len(dst) :]:
            if victim.has_resident_children() or not drop_stuck:
                index.set_slot(victim, t, old)
                index.clear_slot(victim, down)
                self.counters.tiers[tier.name].evictions -= 1
            else:
                index.clear_slot(victim, down)
                slots.append(old)
                self.counters.dropped += 1
        return slots

    def drop_branch(self, branch: list[Block], keep_tier: int | None = None) -> list[int]:
        """Delete `branch` (parents before children) from every tier, children first.

        Freed slots go back to their tiers, except those of `keep_tier`, which are returned to
        the caller that needs them.
        """
        kept = []
        for b in reversed(branch):  # children first: nothing is ever stranded
            for u, s in enumerate(b.slots):
                if s >= 0:
                    slot = self.index.clear_slot(b, u)
                    if u == keep_tier:
                        kept.append(slot)
                    else:
                        self.tiers[u].free([slot])
        return kept

    def drop_cold_branches(self, t: int, want: int, slots: list[int]) -> None:
        """Delete cold unleased branches rooted in tier `t` until `slots` holds `want` of its slots."""
        for branch in self.index.cold_branches(t):
            if len(slots) >= want:
                break
            self.counters.tiers[self.names[t]].evictions += 1
            self.counters.dropped += len(branch)
            slots += self.drop_branch(branch, keep_tier=t)
        if len(slots) > want:
            self.tiers[t].free(slots[want:])
            del slots[want:]

    def discard_copy(self, block: Block, t: int) -> None:
        """Forget a copy that failed verification (or was lost); without another copy, its subtree goes too."""
        if self.index.blocks.get(block.key) is not block or block.slots[t] < 0:
            return
        if any(s >= 0 for u, s in enumerate(block.slots) if u != t):
            self.tiers[t].free([self.index.clear_slot(block, t)])
            return
        self.drop_branch(self.index.subtree(block))

    # -- moving bytes --------------------------------------------------------------

    def copy(self, src: int, src_slots: list[int], dst: int, dst_slots: list[int], blocks: list[Block]) -> None:
        """Copy slots between two tiers, slot to slot where the tiers allow it, else through rows.

        Not verified here: a corrupt copy keeps its original checksum below and is caught when
        it is next read to be served.
        """
        if not self.tiers[src].copy_to(src_slots, self.tiers[dst], dst_slots, blocks):
            self.tiers[dst].write(dst_slots, self.tiers[src].read(src_slots), blocks)
        self.counters.moved_bytes(self.names[src], self.names[dst], len(dst_slots) * self.tiers[dst].slot_bytes)

    def write(self, t: int, slots: list[int], rows: torch.Tensor, blocks: list[Block], source: str) -> None:
        self.tiers[t].write(slots, rows, blocks)
        self.counters.moved_bytes(source, self.names[t], rows.numel())

    def verify(self, t: int, blocks: list[Block], rows: torch.Tensor | None = None, unreadable: Sequence[int] = ()) -> list[int]:
        """Positions of `blocks` whose bytes in tier `t` (or in `rows` read from it) fail their checksum.

        Without `rows`, the tier hashes its slots where they lie when it can: no copy just to check them.
        Rows on a GPU are hashed there (`TREE_CHECKSUM` either way). Positions the read reported
        `unreadable` fail whatever their rows hold.
        """
        tier = self.tiers[t]
        if not blocks or not (tier.verify_reads or unreadable):
            return []
        sums = None
        if tier.verify_reads:
            sums = block_checksums(rows) if rows is not None else tier.checksums([b.slots[t] for b in blocks])
        return self.mismatches(t, blocks, sums, unreadable)

    def mismatches(self, t: int, blocks: list[Block], sums: list[int] | None, unreadable: Sequence[int] = ()) -> list[int]:
        """Positions of `blocks` whose `sums` (None: not hashed) differ from their checksums, or that were unreadable; counted."""
        lost = set(unreadable)
        if sums is None:
            bad = sorted(lost)
        else:
            bad = [i for i, (b, s) in enumerate(zip(blocks, sums)) if i in lost or (b.checksum is not None and b.checksum != s)]
        self.count_corrupt(t, len(bad))
        return bad

    def count_corrupt(self, t: int, n: int) -> None:
        """`n` copies read from tier `t` failed their checksums (or could not be read)."""
        self.counters.tiers[self.names[t]].corrupt += n

    def promote(self, blocks: list[Block], verified: Verified) -> None:
        """Copy leased `blocks` that live only in slower tiers up to the top tier, as room allows.

        Every promoted block is verified on its way up (and noted in `verified.checked`, so it is
        not hashed again when served); those that fail are noted in `verified.corrupt` and not promoted.
        """
        top = self.top
        slow = [b for b in blocks if b.fastest > top]
        if not slow:
            return
        dst = self.reserve(top, len(slow))
        lifted = slow[: len(dst)]
        for src_tier, picks in group_by(range(len(lifted)), [b.fastest for b in lifted]).items():
            group = [lifted[i] for i in picks]
            slots = [dst[i] for i in picks]
            src = self.tiers[src_tier]
            if src.hashes_in_place and src.verify_reads and self.tiers[top].device.type == "cuda":
                self._promote_to_gpu(src_tier, group, slots, verified)
                continue
            direct = src.hashes_in_place
            # Memory to memory: checksums over the source slots in place, then one slot-to-slot
            # copy (a DMA on a GPU). From disk the bytes come through rows that are hashed once.
            read = None if direct else src.read_some([b.slots[src_tier] for b in group])
            rows = None if read is None else read.rows
            bad = self.verify(src_tier, group, rows, () if read is None else read.unreadable)
            if bad:
                bad_set = set(bad)
                self.tiers[top].free([slots[i] for i in bad])
                verified.corrupt += [(group[i], src_tier) for i in bad]
                good = [i for i in range(len(group)) if i not in bad_set]
                group, slots = [group[i] for i in good], [slots[i] for i in good]
                rows = rows[good] if rows is not None else None
            if rows is None:
                self.copy(src_tier, [b.slots[src_tier] for b in group], top, slots, group)
            else:
                self.write(top, slots, rows, group, self.names[src_tier])
            for block, slot in zip(group, slots):
                self.index.set_slot(block, top, slot)
            if src.verify_reads:
                verified.checked.update(id(b) for b in group)

    def _promote_to_gpu(self, src_tier: int, group: list[Block], slots: list[int], verified: Verified) -> None:
        """Host slots -> GPU slots of the top tier in one copy, then verified on the GPU where they landed.

        A block that fails leaves the top tier again (its slot is freed) and is noted corrupt in
        `src_tier`, as if it had failed before the copy: nothing unverified is ever served.
        """
        top = self.top
        self.copy(src_tier, [b.slots[src_tier] for b in group], top, slots, group)
        bad = set(self.mismatches(src_tier, group, self.tiers[top].checksums(slots)))
        for i, (block, slot) in enumerate(zip(group, slots)):
            if i in bad:
                self.tiers[top].free([slot])
                verified.corrupt.append((block, src_tier))
            else:
                self.index.set_slot(block, top, slot)
                verified.checked.add(id(block))

    def _check_group(self, t: int, group: list[Block], read: TierRead | None, verified: Verified) -> bool:
        """Verify the blocks of `group` (read from tier `t`, as `read` if given) not yet verified by this call."""
        lost = set(read.unreadable) if read is not None else set()
        unchecked = [i for i, b in enumerate(group) if id(b) not in verified.checked or i in lost]
        if not unchecked:
            return True
        rows = None if read is None else read.rows
        part = None if rows is None else rows if len(unchecked) == len(group) else rows[unchecked]
        bad = self.verify(t, [group[i] for i in unchecked], part, [j for j, i in enumerate(unchecked) if i in lost])
        verified.corrupt += [(group[unchecked[i]], t) for i in bad]
        return not bad

    def _read_for(self, t: int, slots: list[int], device: torch.device) -> TierRead:
        """Rows of tier `t`'s `slots` bound for `device`: moved there in one copy first when that is a GPU
        the tier is not on, so that they are verified where they will be used."""
        tier = self.tiers[t]
        if device.type == "cuda" and tier.device.type != "cuda":
            return tier.read_to(slots, device)
        return tier.read_some(slots)

    def gather(self, blocks: list[Block], device: torch.device, verified: Verified) -> torch.Tensor:
        """One `[n, block_bytes]` uint8 tensor on `device`, each block read from its fastest tier and verified."""
        groups = group_by(range(len(blocks)), [b.fastest for b in blocks])
        out: torch.Tensor | None = None
        for t, picks in groups.items():
            group = [blocks[i] for i in picks]
            read = self._read_for(t, [b.slots[t] for b in group], device)
            self._check_group(t, group, read, verified)
            part = read.rows.to(device)
            self.counters.moved_bytes(self.names[t], "get", part.numel())
            if len(groups) == 1:
                out = part
            else:
                if out is None:
                    out = empty_rows(len(blocks), self.tiers[t].slot_bytes, device)
                out.index_copy_(0, torch.as_tensor(picks, device=device), part)
        assert out is not None
        return out

    def load_into_engine(self, blocks: list[Block], engine: EngineKV, engine_slots: torch.Tensor, layout: KVLayout,
                         verified: Verified) -> None:
        """Copy each block from its fastest tier into the engine tokens `engine_slots[i]`, verified first.

        Bound for GPU pages from host or disk, a block is copied once into GPU rows, verified there
        and scattered from them (in pieces of `LOAD_PIECE_BYTES`; the load stops at the first piece
        that fails). Otherwise a tier that hashes in place is verified where the bytes lie and copies
        slot to page (for CPU pages `CACHED_PIECE_BYTES` at a time), and others (disk) are read once
        into rows that are verified and then scattered.
        """
        for t, picks in group_by(range(len(blocks)), [b.fastest for b in blocks]).items():
            tier = self.tiers[t]
            staged = engine.device.type == "cuda" and tier.device.type != "cuda" and tier.verify_reads
            cached = engine.device.type == "cpu" and tier.device.type == "cpu" and tier.hashes_in_place
            piece = LOAD_PIECE_BYTES if staged else CACHED_PIECE_BYTES if cached else 0  # CPU: hash, then copy while cached
            step = max(1, piece // max(layout.block_bytes, 1)) if piece else max(len(picks), 1)
            parts = [picks[a : a + step] for a in range(0, len(picks), step)]
            groups = [[blocks[i] for i in part] for part in parts]
            fresh = [staged and any(id(b) not in verified.checked for b in group) for group in groups]
            ahead = ReadAhead(tier, [[b.slots[t] for b in g] for g, f in zip(groups, fresh) if f], engine.device)
            for part, group, read_first in zip(parts, groups, fresh):
                slots = [b.slots[t] for b in group]
                if read_first:
                    read: TierRead | None = ahead.next()
                else:
                    read = tier.read_some(slots) if tier.verify_reads and not tier.hashes_in_place else None
                if not self._check_group(t, group, read, verified):
                    return  # never scattered: the engine recomputes from the first block that failed
                tier.load_into_engine(slots, engine, engine_slots[torch.as_tensor(part)], layout,
                                      None if read is None else read.rows)
                self.counters.moved_bytes(tier.name, "engine", len(group) * layout.block_bytes)

    def start_layer_load(self, blocks: list[Block], engine: EngineKV, engine_slots: torch.Tensor, layout: KVLayout,
                         verified: Verified, path: str) -> tuple[int, LayerCopy] | None:
        """Queue `blocks` into the engine's pages layer by layer, if their one fastest tier can; (tier, copy) or None.

        Blocks this call has verified already (promoted on the way) are not hashed again.
        """
        tiers = {b.fastest for b in blocks}
        if len(tiers) != 1:
            return None
        t = tiers.pop()
        tier = self.tiers[t]
        expected = [b.checksum if tier.verify_reads and id(b) not in verified.checked else None for b in blocks]
        copy = tier.load_layers_into_engine([b.slots[t] for b in blocks], engine, engine_slots, layout, expected, path)
        if copy is None:
            return None
        self.counters.moved_bytes(tier.name, "engine", len(blocks) * layout.block_bytes)
        return t, copy

    def flush_into(self, d: int) -> None:
        """Before a clean close: leave tier `d` holding the most recently used blocks it can, parents first.

        What lives only in faster tiers is about to be lost, so `d` should keep the hottest set of
        blocks it can hold, not the old blocks it happens to hold plus what fits in its free slots
        (a full disk tier would then drop every block of the last requests). A block's heat is the
        latest use in its subtree (each descendant needs it); taken by heat, parents first on a
        tie, the first `num_slots` blocks are closed under parents. Blocks of `d` outside that set
        leave it (children first, with their faster copies: the store is closing); the rest are
        copied in.
        """
        tier = self.tiers[d]
        tier.flush(self.index, d)  # queued writes done: the slots freed below are free at once
        candidates = [b for b in self.index.blocks.values() if b.slots[d] >= 0 or (b.slots[d] == ABSENT and b.fastest < d)]
        depth: dict[int, int] = {}
        for b in candidates:
            chain = []
            cur: Block | None = b
            while cur is not None and id(cur) not in depth:
                chain.append(cur)
                cur = cur.parent
            base = depth[id(cur)] if cur is not None else -1
            for i, c in enumerate(reversed(chain)):
                depth[id(c)] = base + 1 + i
        heat = {id(b): b.last_use for b in candidates}
        for b in sorted(candidates, key=lambda b: -depth[id(b)]):  # children first: heat flows up
            if b.parent is not None and id(b.parent) in heat:
                heat[id(b.parent)] = max(heat[id(b.parent)], heat[id(b)])
        order = sorted(candidates, key=lambda b: (-heat[id(b)], depth[id(b)]))
        keep, leaving = order[: tier.num_slots], order[tier.num_slots :]
        for b in sorted(leaving, key=lambda b: -depth[id(b)]):
            below = any(s >= 0 for s in b.slots[d + 1 :])
            if not below and b.has_resident_children():
                continue  # a child lives only below d (no store built from TIER_FACTORIES has one)
            if b.slots[d] >= 0:
                self.counters.tiers[tier.name].evictions += 1
                self.counters.dropped += int(not below)
            for u in range(d + 1):
                if b.slots[u] >= 0:
                    self.tiers[u].free([self.index.clear_slot(b, u)])
        todo = [b for b in keep if b.slots[d] == ABSENT]
        todo = todo[: tier.free_slots]
        for src, picks in group_by(range(len(todo)), [b.fastest for b in todo]).items():
            blocks = [todo[i] for i in picks]
            slots = tier.allocate(len(blocks))
            blocks = blocks[: len(slots)]
            self.copy(src, [b.slots[src] for b in blocks], d, slots, blocks)
            for b, slot in zip(blocks, slots):
                self.index.set_slot(b, d, slot)

    # -- accounting ----------------------------------------------------------------

    def count_lookups(self, blocks: list[Block], requested: int) -> None:
        """A block is a hit in its fastest tier and a miss in each faster one; unfound blocks miss everywhere."""
        found = Counter(b.fastest for b in blocks)
        covered = 0
        for t, name in enumerate(self.names):
            c = self.counters.tiers[name]
            covered += found[t]
            c.hits += found[t]
            c.misses += requested - covered

