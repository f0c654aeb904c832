"""`BlockStore`: the public put / match / get / lease API over the tier hierarchy.

The store owns the lock, the index and the tiers, and is the only place that moves bytes
between tiers. Every move is batched: one gather from the source tier and one scatter into the
destination per batch of blocks, never one copy per block.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .config import StoreConfig
from .errors import CapacityError, ConfigError, LayoutMismatchError, TierKVError
from .index import ABSENT, PENDING, Block, Index
from .keys import Tokens, as_token_array, block_chunks, iter_chain
from .layout import KVLayout
from .namespace import Namespace
from .stats import StoreCounters, to_prometheus
from .tiers import MemoryTier, Tier


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


class BlockStore:
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
            MemoryTier("device", config.device_bytes // bb, bb, device),
            MemoryTier("host", config.host_bytes // bb, bb, torch.device("cpu"), pin=pin),
        ]
        self._names = [t.name for t in self.tiers]
        self.index = Index(len(self.tiers))
        self._lock = threading.RLock()
        self._seeds: dict[str, bytes] = {namespace.tenant: namespace.digest(layout)}
        self._leases: dict[str, list[Lease]] = defaultdict(list)
        self._counters = StoreCounters.for_tiers(self._names)
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for tier in self.tiers:
                tier.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TierKVError("this BlockStore is closed; open a new one")

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
        with self._lock:
            self._check_open()
            return len(self.index.lookup(seed, chunks)) * self.layout.block_tokens

    def put(self, tokens: Tokens, kv: torch.Tensor, tenant: str | None = None) -> int:
        """Store every full block of `tokens`; `kv` is `[num_full_blocks, *layout.block_shape]`.

        Blocks already stored are only touched. New blocks go to the fastest tier that has
        room after evicting least-recently-used leaves; if they cannot all be placed, nothing
        is written and `CapacityError` says why. Returns the number of blocks newly stored.
        """
        arr = as_token_array(tokens)
        bt = self.layout.block_tokens
        n = len(arr) // bt
        if isinstance(kv, torch.Tensor) and kv.dim() >= 1 and kv.shape[0] != n:
            raise ValueError(
                f"kv holds {kv.shape[0]} blocks but tokens hold {n} full blocks of {bt} "
                f"({len(arr)} tokens); pass one block of KV per full block of tokens"
            )
        self.layout.check_blocks(kv, n)
        chunks = block_chunks(arr, bt)
        seed = self._seed(tenant)
        with self._lock:
            self._check_open()
            existing = self.index.lookup(seed, chunks)
            k = len(existing)
            self.index.touch(existing)
            self._counters.puts += 1
            if k == n:
                return 0
            self.index.acquire(existing)  # their children are about to arrive: keep them here
            try:
                tiers_of, slots_of = self._place(n - k)
                rows = kv[k:].contiguous().view(torch.uint8).reshape(n - k, self.layout.block_bytes)
                for t, positions in _group_by(range(n - k), tiers_of).items():
                    slots = [slots_of[i] for i in positions]
                    src = rows[positions[0] : positions[-1] + 1]  # positions are consecutive
                    self.tiers[t].write(slots, src)
                    self._counters.moved_bytes("put", self._names[t], len(slots) * self.layout.block_bytes)
                tick = self.index.tick()
                parent = existing[-1] if existing else None
                chain = iter_chain(parent.key if parent else seed, chunks[k:])
                for i, (key, ident) in enumerate(chain):
                    parent = self.index.add(key, ident, parent, tiers_of[i], slots_of[i], tick)
            finally:
                self.index.release(existing)
            return n - k

    def get(self, tokens: Tokens, device: torch.device | str | None = None, tenant: str | None = None) -> torch.Tensor:
        """Blocks of the longest stored prefix, bit-exact, as `[n, *layout.block_shape]` on `device`.

        Blocks found in a slower tier are promoted to the device tier on the way (their slower
        copy stays valid). `get(t).shape[0] * block_tokens == match(t)`.
        """
        out_device = torch.device(device) if device is not None else self.device
        chunks = self._chunks(tokens)
        seed = self._seed(tenant)
        with self._lock:
            self._check_open()
            blocks = self.index.lookup(seed, chunks)
            self._count_lookups(blocks, len(chunks))
            self._counters.gets += 1
            n = len(blocks)
            if n == 0:
                return torch.empty((0, *self.layout.block_shape), dtype=self.layout.dtype, device=out_device)
            self.index.touch(blocks)
            self.index.acquire(blocks)
            try:
                self._promote(blocks)
                rows = self._gather(blocks, out_device)
            finally:
                self.index.release(blocks)
        return rows.view(self.layout.dtype).reshape(n, *self.layout.block_shape)

    def lease(self, tokens: Tokens, owner: str | None = None, tenant: str | None = None) -> Lease:
        """Pin the stored prefix of `tokens` until the lease is released.

        Use as a context manager, or keep it and call `release()`; leases taken with an
        `owner` are all released by `release_owner(owner)` (e.g. when a request ends).
        """
        chunks = self._chunks(tokens)
        seed = self._seed(tenant)
        with self._lock:
            self._check_open()
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
            for t in range(len(self.tiers)):
                slots = self._reserve(t, remaining)
                reserved.append((t, slots))
                remaining -= len(slots)
                if remaining == 0:
                    break
            if remaining:
                raise CapacityError(self._capacity_message(n, n - remaining))
        except BaseException:
            for t, slots in reserved:
                self.tiers[t].free(slots)
            raise
        tiers_of: list[int] = []
        slots_of: list[int] = []
        for t, slots in reversed(reserved):  # slowest tier first: it takes the head of the chain
            tiers_of += [t] * len(slots)
            slots_of += slots
        return tiers_of, slots_of

    def _capacity_message(self, need: int, room: int) -> str:
        leased = sum(1 for b in self.index.blocks.values() if b.leases)
        sizes = ", ".join(f"{t.name} {t.num_slots}" for t in self.tiers)
        return (
            f"cannot store {need} new blocks of {self.layout.block_bytes} bytes: only {room} fit "
            f"(slots per tier: {sizes}; {leased} stored blocks are leased and cannot move). "
            "Release leases, store a shorter prefix, or raise device_bytes / host_bytes."
        )

    def _reserve(self, t: int, n: int) -> list[int]:
        """Up to `n` free slots of tier `t`, evicting its least-recently-used leaves as needed.

        A victim that has a copy in a slower tier just leaves; one that has not is demoted to
        the next tier (which may evict in turn); the last tier deletes. A victim that cannot
        be demoted for lack of room below is deleted if no resident block depends on it, else
        it stays, and fewer slots are returned.
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
        if not moving:
            return slots
        dst = self._reserve(t + 1, len(moving))
        if dst:
            src = [old for _, old in moving[: len(dst)]]
            self.tiers[t + 1].write(dst, tier.read(src))
            self._counters.moved_bytes(tier.name, self._names[t + 1], len(dst) * tier.slot_bytes)
            for (victim, old), new in zip(moving, dst):
                index.set_slot(victim, t + 1, new)
                slots.append(old)
        for victim, old in moving[len(dst) :]:
            if victim.has_resident_children():
                index.set_slot(victim, t, old)
                index.clear_slot(victim, t + 1)
                self._counters.tiers[tier.name].evictions -= 1
            else:
                index.clear_slot(victim, t + 1)
                slots.append(old)
                self._counters.dropped += 1
        return slots

    def _promote(self, blocks: list[Block]) -> None:
        """Copy leased `blocks` that live only in slower tiers up to the device tier, as room allows."""
        slow = [b for b in blocks if b.slots[0] == ABSENT]
        if not slow:
            return
        dst = self._reserve(0, len(slow))
        lifted = slow[: len(dst)]
        for src_tier, picks in _group_by(range(len(lifted)), [b.fastest for b in lifted]).items():
            src_slots = [lifted[i].slots[src_tier] for i in picks]
            dst_slots = [dst[i] for i in picks]
            self.tiers[0].write(dst_slots, self.tiers[src_tier].read(src_slots))
            self._counters.moved_bytes(self._names[src_tier], self._names[0], len(picks) * self.layout.block_bytes)
        for block, slot in zip(lifted, dst):
            self.index.set_slot(block, 0, slot)

    def _gather(self, blocks: list[Block], device: torch.device) -> torch.Tensor:
        """One `[n, block_bytes]` uint8 tensor on `device` with each block read from its fastest tier."""
        fastest = [b.fastest for b in blocks]
        groups = _group_by(range(len(blocks)), fastest)
        if len(groups) == 1:
            (t,) = groups
            rows = self.tiers[t].read([b.slots[t] for b in blocks]).to(device)
            self._counters.moved_bytes(self._names[t], "get", rows.numel())
            return rows
        out = torch.empty((len(blocks), self.layout.block_bytes), dtype=torch.uint8, device=device)
        for t, picks in groups.items():
            part = self.tiers[t].read([blocks[i].slots[t] for i in picks]).to(device)
            out.index_copy_(0, torch.as_tensor(picks, device=device), part)
            self._counters.moved_bytes(self._names[t], "get", part.numel())
        return out

    def _count_lookups(self, blocks: list[Block], requested: int) -> None:
        for t, name in enumerate(self._names):
            c = self._counters.tiers[name]
            hits = sum(1 for b in blocks if b.fastest == t)
            faster_or_here = sum(1 for b in blocks if b.fastest <= t)
            c.hits += hits
            c.misses += requested - faster_or_here
