"""`BlockStore`: the public put / match / get / lease API over the tier hierarchy.

The store owns the lock, the index and the tiers, and is the only place that moves bytes
between tiers. Every move is batched: one gather from the source tier and one scatter into the
destination per batch of blocks, never one copy per block.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .config import StoreConfig
from .errors import CapacityError, ConfigError, LayoutMismatchError, TierKVError
from .index import ABSENT, PENDING, Block, Index
from .integrity import checksum_rows
from .keys import Tokens, as_token_array, block_chunks, iter_chain
from .layout import KVLayout
from .namespace import Namespace
from .tiers.disk.recovery import DiskPersistence, Recovery
from .tiers.elastic.shrink import ElasticShrink
from .stats import StoreCounters, to_prometheus
from .tiers import MemoryTier, Tier
from .tiers.elastic import ElasticTier, elastic_device_tier

_MAX_GET_ATTEMPTS = 4  # a get retries after dropping corrupt copies; each retry sees fewer
_PUBLISH_S = 0.1  # least interval between two refreshes of this store's row in a GPU budget


def _resolve_device(config: StoreConfig) -> torch.device:
    if config.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {config.device!r} was asked for but CUDA is not available here; use 'cpu' or leave it unset")
    return torch.device(config.device)


def _group_by(items: Sequence[int], keys: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for item, key in zip(items, keys):
        groups[key].append(item)
    return groups


class Lease:
    """Blocks that may not be evicted or moved until `release()`; also a context manager."""

    def __init__(self, store: BlockStore, blocks: list[Block], owner: str | None) -> None:
        self._store = store
        self._blocks: list[Block] | None = blocks
        self.owner = owner
        self.num_blocks = len(blocks)
        self.num_tokens = len(blocks) * store.layout.block_tokens

    @property
    def active(self) -> bool:
        return self._blocks is not None

    def release(self) -> None:
        """Idempotent: releasing twice is harmless, so `finally` blocks may always call it."""
        self._store._release_lease(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BlockStore(ElasticShrink):
    """Content-addressed KV blocks in a device tier and a host tier.

    `tokens` anywhere may be a list of ints, a 1-D integer numpy array or a 1-D integer tensor.
    Only full blocks of `layout.block_tokens` tokens are stored; a trailing partial block is
    ignored. `tenant` salts the key chain for requests that must not share KV with others.
    """

    def __init__(self, layout: KVLayout, namespace: Namespace, config: StoreConfig | None = None) -> None:
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, got {type(layout).__name__}")
        if not isinstance(namespace, Namespace):
            raise TypeError(f"namespace must be a Namespace, got {type(namespace).__name__}")
        config = StoreConfig() if config is None else config
        if not isinstance(config, StoreConfig):
            raise TypeError(f"config must be a StoreConfig, got {type(config).__name__}")
        self.layout = layout
        self.namespace = namespace
        self.config = config
        device = _resolve_device(config)
        pin = torch.cuda.is_available() if config.pin_host is None else config.pin_host
        if pin and not torch.cuda.is_available():
            raise ConfigError("pin_host: pinned memory needs CUDA, which is not available here; set pin_host to false")
        bb = layout.block_bytes
        self.tiers: list[Tier] = [
            elastic_device_tier(config, bb, device, namespace.model) if config.device_elastic
            else MemoryTier("device", config.device_bytes // bb, bb, device),
            MemoryTier("host", config.host_bytes // bb, bb, torch.device("cpu"), pin=pin),
        ]
        self._disk: DiskPersistence | None = None
        self.recovery = Recovery()
        if config.disk_path is not None:
            self._disk = DiskPersistence(config, layout, namespace)
            self.tiers.append(self._disk.tier)
        self._disk_tier = len(self.tiers) - 1 if self._disk else None
        # Where hits are promoted: the first tier with slots (no device tier behind an engine).
        self._top = next((t for t, tier in enumerate(self.tiers) if tier.num_slots > 0), 0)
        self._names = [t.name for t in self.tiers]
        self.index = Index(len(self.tiers), persistent_tier=self._disk_tier)
        self._lock = threading.RLock()
        self._seeds: dict[str, bytes] = {namespace.tenant: namespace.digest(layout)}
        self._leases: dict[str, list[Lease]] = defaultdict(list)
        self._counters = StoreCounters.for_tiers(self._names)
        self._closed = False
        if self._disk is not None:
            self.recovery = self._disk.recover(self.index, self._disk_tier)
        self._shrinks = 0  # shrink requests acted on, and the bytes they demoted to host
        self._shrink_demoted = 0
        self._published = 0.0
        self._budget = self.tiers[0].budget if isinstance(self.tiers[0], ElasticTier) else None
        if self._budget is not None:
            self._watch_budget()

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Release memory; with a disk tier, first write down what lives only above it."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._disk is not None:
                    if self.config.flush_on_close:
                        self._flush_to_disk()
                    self._disk.tier.drain()
                    self._commit()
                    self._disk.save_recency(self.index, self._disk_tier)
            finally:
                self._closed = True
                if self._disk is not None:
                    self._disk.close()
                for tier in self.tiers[:2]:
                    tier.close()

    def _flush_to_disk(self) -> None:
        """Copy blocks with no disk copy into free disk slots, parents first."""
        d = self._disk_tier
        depth: dict[int, int] = {}

        def depth_of(b: Block) -> int:
            chain = []
            while b is not None and id(b) not in depth:
                chain.append(b)
                b = b.parent
            base = depth[id(b)] if b is not None else -1
            for i, c in enumerate(reversed(chain)):
                depth[id(c)] = base + 1 + i
            return depth[id(chain[0])] if chain else base

        todo = [b for b in self.index.blocks.values() if b.slots[d] == ABSENT]
        todo.sort(key=depth_of)
        todo = todo[: self.tiers[d].free_slots]
        for src, picks in _group_by(range(len(todo)), [b.fastest for b in todo]).items():
            blocks = [todo[i] for i in picks]
            rows = self.tiers[src].read([b.slots[src] for b in blocks])
            slots = self.tiers[d].allocate(len(blocks))
            self._write(d, slots, rows, blocks)
            for b, slot in zip(blocks, slots):
                self.index.set_slot(b, d, slot)
            self._counters.moved_bytes(self._names[src], self._names[d], rows.numel())
        self._commit()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TierKVError("this BlockStore is closed; open a new one")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store lock for one public operation; commit disk changes at its end.

        With a shared GPU budget, a pending request to shrink is acted on first, and the
        store's row in the budget is refreshed at the end (at most every `_PUBLISH_S`).
        """
        with self._lock:
            self._check_open()
            if self._budget is not None and self._budget.pending_target() is not None:
                self._honour_shrink(blocking=True)
            try:
                yield
            finally:
                self._commit()
                if self._budget is not None and time.monotonic() - self._published >= _PUBLISH_S:
                    self._publish_budget()

    def _commit(self) -> None:
        if self._disk is not None:
            for block in self._disk.commit(self.index, self._disk_tier):
                self._discard_copy(block, self._disk_tier)  # its write-back failed

    @property
    def device(self) -> torch.device:
        """Where `get` returns blocks by default: the device tier's memory."""
        return self.tiers[0].device

    # -- keys ----------------------------------------------------------------------

    def _seed(self, tenant: str | None) -> bytes:
        if tenant is None:
            tenant = self.namespace.tenant
        seed = self._seeds.get(tenant)
        if seed is None:
            if not isinstance(tenant, str):
                raise TypeError(f"tenant must be a string, got {tenant!r}")
            seed = self._seeds[tenant] = self.namespace.with_tenant(tenant).digest(self.layout)
        return seed

    def _chunks(self, tokens: Tokens) -> list[bytes]:
        return block_chunks(as_token_array(tokens), self.layout.block_tokens)


    # -- public API ----------------------------------------------------------------

    def match(self, tokens: Tokens, tenant: str | None = None) -> int:
        """How many leading tokens are covered by stored blocks, in any tier. Changes nothing."""
        chunks = self._chunks(tokens)
        seed = self._seed(tenant)
        with self._locked():
            return len(self.index.lookup(seed, chunks)) * self.layout.block_tokens

    def put(self, tokens: Tokens, kv: torch.Tensor, tenant: str | None = None, first_block: int = 0) -> int:
        """Store every full block of `tokens`; `kv` is `[num_full_blocks - first_block, *layout.block_shape]`.

        `first_block` lets a caller that knows blocks `0..first_block-1` are stored pass only
        the KV of the rest (an engine after a prefix hit); if fewer are stored by then, nothing
        is stored, since the chain would have a gap. Blocks already stored are only touched.
        New blocks go to the fastest tier with room after evicting least-recently-used leaves;
        if they cannot all be placed, nothing is written and `CapacityError` says why.
        Returns the number of blocks newly stored.
        """
        arr = as_token_array(tokens)
        bt = self.layout.block_tokens
        n = len(arr) // bt
        if isinstance(first_block, bool) or not isinstance(first_block, int) or not 0 <= first_block <= n:
            raise ValueError(f"first_block must be an int from 0 to {n} (the full blocks of tokens), got {first_block!r}")
        if isinstance(kv, torch.Tensor) and kv.dim() >= 1 and kv.shape[0] != n - first_block:
            raise ValueError(
                f"kv holds {kv.shape[0]} blocks but tokens hold {n} full blocks of {bt} ({len(arr)} tokens)"
                + (f" from block {first_block} on" if first_block else "")
                + "; pass one block of KV per full block of tokens"
            )
        self.layout.check_blocks(kv, n - first_block)
        chunks = block_chunks(arr, bt)
        seed = self._seed(tenant)
        with self._locked():
            existing = self.index.lookup(seed, chunks)
            k = len(existing)
            self.index.touch(existing)
            self._counters.puts += 1
            if k == n or k < first_block:
                return 0
            # A key already taken by other tokens (a hash collision) ends the chain we can store.
            chain = []
            for key, ident in iter_chain(existing[-1].key if existing else seed, chunks[k:]):
                if key in self.index.blocks:
                    break
                chain.append((key, ident))
            if not chain:
                return 0
            m = len(chain)
            self.index.acquire(existing)  # their children are about to arrive: keep them here
            try:
                movable = sum(t.num_slots for t in self.tiers) - self.index.leased_copies
                if m > movable:  # refuse before evicting anything
                    raise CapacityError(self._capacity_message(m, max(movable, 0)))
                tiers_of, slots_of = self._place(m)
                tick = self.index.tick()
                parent = existing[-1] if existing else None
                added: list[Block] = []
                for i, (key, ident) in enumerate(chain):
                    parent = self.index.add(key, ident, parent, tiers_of[i], slots_of[i], tick)
                    added.append(parent)
                new_kv = kv[k - first_block : k - first_block + m]
                rows = new_kv.contiguous().view(torch.uint8).reshape(m, self.layout.block_bytes)
                try:
                    for t, positions in _group_by(range(m), tiers_of).items():
                        span = slice(positions[0], positions[-1] + 1)  # positions are consecutive
                        self._write(t, slots_of[span], rows[span], added[span])
                        self._counters.moved_bytes("put", self._names[t], len(positions) * self.layout.block_bytes)
                except BaseException:
                    for b in reversed(added):  # children first: nothing is ever stranded
                        for t in range(len(self.tiers)):
                            if b.slots[t] != ABSENT:
                                self.tiers[t].free([self.index.clear_slot(b, t)])
                    raise
            finally:
                self.index.release(existing)
            return m

    def get(self, tokens: Tokens, device: torch.device | str | None = None, tenant: str | None = None) -> torch.Tensor:
        """Blocks of the longest stored prefix, bit-exact, as `[n, *layout.block_shape]` on `device`.

        Blocks found in a slower tier are promoted to the device tier on the way (their slower
        copy stays valid). `get(t).shape[0] * block_tokens == match(t)`.
        """
        out_device = torch.device(device) if device is not None else self.device
        chunks = self._chunks(tokens)
        seed = self._seed(tenant)
        with self._locked():
            self._counters.gets += 1
            for attempt in range(_MAX_GET_ATTEMPTS):
                blocks = self.index.lookup(seed, chunks)
                if attempt == 0:
                    self._count_lookups(blocks, len(chunks))
                if not blocks:
                    break
                self.index.touch(blocks)
                self.index.acquire(blocks)
                try:
                    corrupt = self._promote(blocks)
                    if not corrupt:
                        rows, corrupt = self._gather(blocks, out_device)
                finally:
                    self.index.release(blocks)
                if not corrupt:
                    return rows.view(self.layout.dtype).reshape(len(blocks), *self.layout.block_shape)
                for block, t in corrupt:
                    self._discard_copy(block, t)
            return torch.empty((0, *self.layout.block_shape), dtype=self.layout.dtype, device=out_device)

    def lease(self, tokens: Tokens, owner: str | None = None, tenant: str | None = None) -> Lease:
        """Pin the stored prefix of `tokens` until the lease is released.

        Use as a context manager, or keep it and call `release()`; leases taken with an
        `owner` are all released by `release_owner(owner)` (e.g. when a request ends).
        """
        chunks = self._chunks(tokens)
        seed = self._seed(tenant)
        with self._locked():
            blocks = self.index.lookup(seed, chunks)
            self.index.touch(blocks)
            self.index.acquire(blocks)
            lease = Lease(self, blocks, owner)
            if owner is not None:
                self._leases[owner].append(lease)
            return lease

    def release_owner(self, owner: str) -> int:
        """Release every lease taken with `owner`; returns how many there were."""
        with self._lock:
            leases = self._leases.pop(owner, [])
            for lease in leases:
                lease.release()
            return len(leases)

    def _release_lease(self, lease: Lease) -> None:
        with self._lock:
            blocks, lease._blocks = lease._blocks, None
            if blocks is None:
                return
            self.index.release(blocks)
            if lease.owner is not None:
                owned = self._leases.get(lease.owner)
                if owned is not None and lease in owned:
                    owned.remove(lease)
                    if not owned:
                        del self._leases[lease.owner]

    def stats(self) -> dict[str, Any]:
        """Capacity, occupancy and traffic per tier, bytes moved per direction, block counts."""
        with self._lock:
            tiers = {}
            for t, tier in enumerate(self.tiers):
                c = self._counters.tiers[tier.name]
                used = self.index.resident_count(t)
                tiers[tier.name] = {
                    "device": str(tier.device),
                    "slots": tier.num_slots,
                    "used_slots": used,
                    "capacity_bytes": tier.capacity_bytes,
                    "used_bytes": used * tier.slot_bytes,
                    "hits": c.hits,
                    "misses": c.misses,
                    "evictions": c.evictions,
                    "corrupt": c.corrupt,
                    "bytes_in": c.bytes_in,
                    "bytes_out": c.bytes_out,
                }
            return {
                "tiers": tiers,
                "blocks": len(self.index),
                "block_bytes": self.layout.block_bytes,
                "bytes_moved": dict(self._counters.moved),
                "dropped": self._counters.dropped,
                "puts": self._counters.puts,
                "gets": self._counters.gets,
                "leased_owners": len(self._leases),
                "elastic": None if not isinstance(self.tiers[0], ElasticTier) else {
                    **self.tiers[0].describe(), "shrinks": self._shrinks, "demoted_bytes": self._shrink_demoted,
                },
                "disk": None if self._disk is None else {
                    "path": str(self._disk.directory),
                    "io": self._disk.tier.io_path,
                    "durability": self.config.durability,
                    "recovered_blocks": self.recovery.blocks,
                    "recovery_dropped": self.recovery.dropped,
                },
            }

    def prometheus(self) -> str:
        """`stats()` in Prometheus text format, for a /metrics endpoint."""
        return to_prometheus(self.stats())

    # -- placement and eviction ----------------------------------------------------

    def _place(self, n: int) -> tuple[list[int], list[int]]:
        """Reserve slots for `n` new chain blocks: the tail in the fastest tier with room.

        Returns the tier and slot of each block. On failure every reserved slot goes back.
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
                        slots = self._reserve(t, remaining, drop_stuck)
                        reserved.append((t, slots))
                        remaining -= len(slots)
                    if remaining == before or not drop_stuck:
                        break
            if remaining:
                raise CapacityError(self._capacity_message(n, n - remaining))
        except BaseException:
            for t, slots in reserved:
                self.tiers[t].free(slots)
            raise
        by_tier: dict[int, list[int]] = defaultdict(list)
        for t, slots in reserved:
            by_tier[t] += slots
        tiers_of: list[int] = []
        slots_of: list[int] = []
        for t in sorted(by_tier, reverse=True):  # slowest tier first: it takes the head of the chain
            tiers_of += [t] * len(by_tier[t])
            slots_of += by_tier[t]
        return tiers_of, slots_of

    def _capacity_message(self, need: int, room: int) -> str:
        sizes = ", ".join(f"{t.name} {t.num_slots}" for t in self.tiers)
        return (
            f"cannot store {need} new blocks of {self.layout.block_bytes} bytes: only {room} fit "
            f"(slots per tier: {sizes}; {self.index.leased_copies} slots hold leased blocks that cannot move). "
            "Release leases, store a shorter prefix, or raise device_bytes / host_bytes."
        )

    def _reserve(self, t: int, n: int, drop_stuck: bool = False) -> list[int]:
        """Up to `n` free slots of tier `t`, evicting its least-recently-used leaves as needed.

        A victim that has a copy in a slower tier just leaves; one that has not is demoted to
        the next tier (which may evict in turn); the last tier deletes. A victim that cannot
        be demoted for lack of room below stays, and fewer slots are returned — unless
        `drop_stuck`: then a stuck victim that no resident block depends on is deleted, and if
        leaves alone cannot make room, whole cold branches are (see `Index.cold_branches`).
        """
        index, tier = self.index, self.tiers[t]
        slots = tier.allocate(n)
        last = t == len(self.tiers) - 1
        moving: list[tuple[Block, int]] = []
        while len(slots) + len(moving) < n:
            victim = index.pop_victim(t)
            if victim is None:
                break
            self._counters.tiers[tier.name].evictions += 1
            below = any(s >= 0 for s in victim.slots[t + 1 :])
            if last or below:
                slots.append(index.clear_slot(victim, t))
                self._counters.dropped += int(last)
            else:
                index.set_slot(victim, t + 1, PENDING)  # so its parent sees it stay resident
                moving.append((victim, index.clear_slot(victim, t)))
        if drop_stuck and len(slots) + len(moving) < n:
            self._drop_cold_branches(t, n - len(moving), slots)
        if not moving:
            return slots
        dst = self._reserve(t + 1, len(moving))
        if dst:
            src = [old for _, old in moving[: len(dst)]]
            self._move_down(t, src, dst, [victim for victim, _ in moving[: len(dst)]])
            self._counters.moved_bytes(tier.name, self._names[t + 1], len(dst) * tier.slot_bytes)
            for (victim, old), new in zip(moving, dst):
                index.set_slot(victim, t + 1, new)
                slots.append(old)
        for victim, old in moving[len(dst) :]:
            if victim.has_resident_children() or not drop_stuck:
                index.set_slot(victim, t, old)
                index.clear_slot(victim, t + 1)
                self._counters.tiers[tier.name].evictions -= 1
            else:
                index.clear_slot(victim, t + 1)
                slots.append(old)
                self._counters.dropped += 1
        return slots

    def _drop_branch(self, branch: list[Block], keep_tier: int | None = None) -> list[int]:
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

    def _drop_cold_branches(self, t: int, want: int, slots: list[int]) -> None:
        """Delete cold unleased branches rooted in tier `t` until `slots` holds `want` of its slots."""
        for branch in self.index.cold_branches(t):
            if len(slots) >= want:
                break
            self._counters.tiers[self._names[t]].evictions += 1
            self._counters.dropped += len(branch)
            slots += self._drop_branch(branch, keep_tier=t)
        if len(slots) > want:
            self.tiers[t].free(slots[want:])
            del slots[want:]

    def _promote(self, blocks: list[Block]) -> list[tuple[Block, int]]:
        """Copy leased `blocks` that live only in slower tiers up to the fastest tier, as room allows.

        The fastest tier is the first with any slots: a store with no device tier (an engine's
        own pages are the GPU tier) promotes disk hits to host. Returns the (block, tier)
        copies that failed verification; they were not promoted.
        """
        top = self._top
        slow = [b for b in blocks if b.fastest > top]
        if not slow:
            return []
        dst = self._reserve(top, len(slow))
        lifted = slow[: len(dst)]
        corrupt: list[tuple[Block, int]] = []
        for src_tier, picks in _group_by(range(len(lifted)), [b.fastest for b in lifted]).items():
            group = [lifted[i] for i in picks]
            slots = [dst[i] for i in picks]
            src = self.tiers[src_tier]
            in_memory = isinstance(src, MemoryTier) and isinstance(self.tiers[top], MemoryTier)
            # Memory to memory: checksums over the source slots in place, then one slot-to-slot
            # copy (a DMA on a GPU). From disk the bytes must come through a buffer anyway.
            rows, bad = (None, self._verify(src_tier, group)) if in_memory else self._read(src_tier, group)
            if bad:
                self.tiers[top].free([slots[i] for i in bad])
                corrupt += [(group[i], src_tier) for i in bad]
                good = [i for i in range(len(group)) if i not in set(bad)]
                group, slots = [group[i] for i in good], [slots[i] for i in good]
                rows = rows[good] if rows is not None else None
            if rows is None:
                src.copy_to([b.slots[src_tier] for b in group], self.tiers[top], slots)
            else:
                self._write(top, slots, rows, group)
            for block, slot in zip(group, slots):
                self.index.set_slot(block, top, slot)
            self._counters.moved_bytes(self._names[src_tier], self._names[top], len(group) * self.layout.block_bytes)
        return corrupt

    def _gather(self, blocks: list[Block], device: torch.device) -> tuple[torch.Tensor, list[tuple[Block, int]]]:
        """One `[n, block_bytes]` uint8 tensor on `device`, each block read from its fastest tier."""
        groups = _group_by(range(len(blocks)), [b.fastest for b in blocks])
        corrupt: list[tuple[Block, int]] = []
        out: torch.Tensor | None = None
        for t, picks in groups.items():
            part, bad = self._read(t, [blocks[i] for i in picks])
            corrupt += [(blocks[picks[i]], t) for i in bad]
            part = part.to(device)
            self._counters.moved_bytes(self._names[t], "get", part.numel())
            if len(groups) == 1:
                out = part
            else:
                if out is None:
                    out = torch.empty((len(blocks), self.layout.block_bytes), dtype=torch.uint8, device=device)
                out.index_copy_(0, torch.as_tensor(picks, device=device), part)
        assert out is not None
        return out, corrupt

    def _read(self, t: int, blocks: list[Block]) -> tuple[torch.Tensor, list[int]]:
        """Rows of `blocks` from tier `t`, and the positions whose checksum did not match."""
        rows = self.tiers[t].read([b.slots[t] for b in blocks])
        return rows, self._verify(t, blocks, rows)

    def _verify(self, t: int, blocks: list[Block], rows: torch.Tensor | None = None) -> list[int]:
        """Positions of `blocks` whose bytes in tier `t` (or in `rows` read from it) fail their checksum.

        Without `rows`, a memory tier hashes its slots in place: no copy just to check them.
        """
        if t == 0 or not self.config.verify_reads:
            return []
        slots = [b.slots[t] for b in blocks]
        tier = self.tiers[t]
        sums = checksum_rows(rows) if rows is not None else tier.checksums(slots)  # type: ignore[attr-defined]
        bad = [i for i, (b, s) in enumerate(zip(blocks, sums)) if b.checksum is not None and b.checksum != s]
        self._counters.tiers[self._names[t]].corrupt += len(bad)
        return bad

    def _write(self, t: int, slots: list[int], rows: torch.Tensor, blocks: list[Block]) -> None:
        """Write rows into tier `t`; bytes entering host or disk get their checksum here."""
        tier = self.tiers[t]
        if t != self._disk_tier:
            tier.write(slots, rows)  # GPU rows into pinned host: an async DMA, waited for below
            self._note_checksums(t, slots, blocks)
            return
        rows = rows.to("cpu")
        self._note_checksums(t, slots, blocks, rows)
        if self.config.durability == "every":
            for i, (slot, block) in enumerate(zip(slots, blocks)):
                tier.write([slot], rows[i : i + 1])
                self._disk.commit_written(block, slot)
        else:
            self._disk.write_behind(slots, rows, blocks)

    def _move_down(self, t: int, src_slots: list[int], dst_slots: list[int], blocks: list[Block]) -> None:
        """Demote: copy slots of tier `t` into tier `t + 1`, memory to memory without temporaries.

        Not verified here: a corrupt copy keeps its original checksum below and is caught when
        it is next read to be served.
        """
        src, dst = self.tiers[t], self.tiers[t + 1]
        if isinstance(src, MemoryTier) and isinstance(dst, MemoryTier):
            src.copy_to(src_slots, dst, dst_slots)
            self._note_checksums(t + 1, dst_slots, blocks)
        else:
            self._write(t + 1, dst_slots, src.read(src_slots), blocks)

    def _note_checksums(self, t: int, slots: list[int], blocks: list[Block], rows: torch.Tensor | None = None) -> None:
        """Give blocks arriving in host or disk for the first time the checksum of their bytes."""
        if t == 0 or all(b.checksum is not None for b in blocks):
            return
        sums = checksum_rows(rows if rows is not None else self.tiers[t].view(slots))
        for b, s in zip(blocks, sums):
            if b.checksum is None:
                b.checksum = s

    def _discard_copy(self, block: Block, t: int) -> None:
        """Forget a copy that failed verification; without another copy, its subtree goes too."""
        if self.index.blocks.get(block.key) is not block or block.slots[t] < 0:
            return
        if any(s >= 0 for u, s in enumerate(block.slots) if u != t):
            self.tiers[t].free([self.index.clear_slot(block, t)])
            return
        self._drop_branch(self.index.subtree(block))

    def _count_lookups(self, blocks: list[Block], requested: int) -> None:
        """A block is a hit in its fastest tier and a miss in each faster one; unfound blocks miss everywhere."""
        found = Counter(b.fastest for b in blocks)
        covered = 0
        for t, name in enumerate(self._names):
            c = self._counters.tiers[name]
            covered += found[t]
            c.hits += found[t]
            c.misses += requested - covered
