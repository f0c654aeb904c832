"""Continuing a key chain in the tiers that other stores write (a remote tier shared by a fleet).

The index knows only what this store placed, so where it stops short on a chain, the chain is
asked of each shared tier in one batched probe; the blocks found can join the index with slots
of that tier, to be read, verified and promoted like any other (`Placement.adopt`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .index import Block, Index
from .placement import Placement
from .tiers.base import Tier


class SharedTiers:
    """The shared tiers of one store, fastest first, and how far a chain goes in them."""

    def __init__(self, tiers: Sequence[Tier], index: Index, placement: Placement) -> None:
        self.tiers = list(tiers)
        self.index = index
        self.placement = placement
        self.positions = [t for t, tier in enumerate(self.tiers) if tier.shared]

    def continue_chain(self, seed: bytes, chunks: list[bytes], found: list[Block], adopt: bool) -> int:
        """The blocks past `found` (the index's prefix of `chunks`) that a shared tier holds.

        With `adopt` they join the index and `found`; without, nothing changes (a `match`).
        The store lock is held.
        """
        if not self.positions or len(found) == len(chunks):
            return 0
        chain = self.index.unknown_links(found[-1].key if found else seed, chunks[len(found):])
        for t in self.positions:
            sums = self.tiers[t].probe([key for key, _ in chain], [ident for _, ident in chain]) if chain else []
            if sums:
                if not adopt:
                    return len(sums)
                added = self.placement.adopt(t, found[-1] if found else None, chain[: len(sums)], sums)
                found.extend(added)
                return len(added)
        return 0
