"""What a store shows of itself without changing it: residency, locations, the change journal, stats.

These are the read-only views that tools, tests and engines use (vLLM's scheduler mirrors the
store through `changes`); the store calls them with its lock held and `BlockStore` keeps only
the one-line public methods.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .index import Index
from .stats import StoreCounters, store_stats
from .tiers.base import Tier, TierAgent


class StoreViews:
    """Read-only views over one store's index and tiers (names fastest first)."""

    def __init__(self, tiers: Sequence[Tier], index: Index, counters: StoreCounters, block_bytes: int) -> None:
        self.tiers = list(tiers)
        self.names = tuple(t.name for t in self.tiers)
        self.index = index
        self.counters = counters
        self.block_bytes = block_bytes

    def residency(self, keys: Iterable[bytes] | None = None) -> dict[bytes, str | None]:
        """The fastest tier holding each key (None: not stored); without `keys`, every stored block."""
        names, blocks = self.names, self.index.blocks
        if keys is None:
            return {key: names[b.fastest] for key, b in blocks.items()}
        out: dict[bytes, str | None] = {}
        for key in keys:
            b = blocks.get(key)
            out[key] = None if b is None else names[b.fastest]
        return out

    def locate(self, keys: Iterable[bytes]) -> dict[bytes, dict[str, int]]:
        """Every tier holding each key and the slot it occupies there (empty: not stored), fastest first."""
        out: dict[bytes, dict[str, int]] = {}
        for key in keys:
            b = self.index.blocks.get(key)
            out[key] = {} if b is None else {name: s for name, s in zip(self.names, b.slots) if s >= 0}
        return out

    def changes(self) -> dict[bytes, str | None]:
        """Residency of what changed since the last call; the first call returns everything and starts the journal."""
        changed = self.index.changes
        if changed is None:
            self.index.watch_changes()
            return self.residency()
        self.index.changes = set()
        return self.residency(changed)

    def stats(self, agents: Mapping[int, TierAgent], leased_owners: int) -> dict[str, Any]:
        """`BlockStore.stats()`: the counters, and a section per tier that has more to say (with its agent's)."""
        sections = {}
        for t, tier in enumerate(self.tiers):
            if tier.section is not None:
                agent = agents.get(t)
                sections[tier.section] = {**tier.describe(), **(agent.describe() if agent else {})}
        return store_stats(self.tiers, self.index, self.counters, self.block_bytes, leased_owners, sections)
