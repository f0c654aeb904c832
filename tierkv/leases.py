"""Leases: blocks an engine is reading or writing, which eviction and shrinking must leave in place.

A lease pins a prefix's blocks in whatever tiers they are; leases taken with an owner (a request)
are all released at once when the owner is done, so a finished or failed request never leaves
blocks pinned.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from .index import Block, Index


class Lease:
    """Blocks that may not be evicted or moved until `release()`; also a context manager."""

    def __init__(self, book: LeaseBook, blocks: list[Block], owner: str | None) -> None:
        self._book = book
        self._blocks: list[Block] | None = blocks
        self.owner = owner
        self.num_blocks = len(blocks)
        self.num_tokens = len(blocks) * book.block_tokens

    @property
    def active(self) -> bool:
        return self._blocks is not None

    def release(self) -> None:
        """Idempotent: releasing twice is harmless, so `finally` blocks may always call it."""
        self._book.release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LeaseBook:
    """The live leases of one store, by owner; every change under the store's lock."""

    def __init__(self, index: Index, lock: threading.RLock, block_tokens: int) -> None:
        self._index = index
        self._lock = lock
        self.block_tokens = block_tokens
        self._by_owner: dict[str, list[Lease]] = defaultdict(list)

    @property
    def owners(self) -> int:
        return len(self._by_owner)

    def take(self, blocks: list[Block], owner: str | None) -> Lease:
        """Pin `blocks` (the caller holds the lock)."""
        self._index.acquire(blocks)
        lease = Lease(self, blocks, owner)
        if owner is not None:
            self._by_owner[owner].append(lease)
        return lease

    def release_owner(self, owner: str) -> int:
        with self._lock:
            leases = self._by_owner.pop(owner, [])
            for lease in leases:
                lease.release()
            return len(leases)

    def release(self, lease: Lease) -> None:
        with self._lock:
            blocks, lease._blocks = lease._blocks, None
            if blocks is None:
                return
            self._index.release(blocks)
            if lease.owner is not None:
                owned = self._by_owner.get(lease.owner)
                if owned is not None and lease in owned:
                    owned.remove(lease)
                    if not owned:
                        del self._by_owner[lease.owner]
