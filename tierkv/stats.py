"""Counters the store keeps, and their renderings: a dict here, Prometheus families in `metrics.py`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .index import Index
    from .tiers.base import Tier


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    corrupt: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class StoreCounters:
    """Mutable totals; the store updates them under its lock."""

    tiers: dict[str, TierCounters]
    moved: Counter[str] = field(default_factory=Counter)  # "src->dst" -> bytes
    dropped: int = 0
    puts: int = 0
    gets: int = 0

    @classmethod
    def for_tiers(cls, names: list[str]) -> StoreCounters:
        return cls(tiers={n: TierCounters() for n in names})

    def moved_bytes(self, src: str, dst: str, nbytes: int) -> None:
        self.moved[f"{src}->{dst}"] += nbytes
        if src in self.tiers:
            self.tiers[src].bytes_out += nbytes
        if dst in self.tiers:
            self.tiers[dst].bytes_in += nbytes


def store_stats(tiers: Sequence[Tier], index: Index, counters: StoreCounters, block_bytes: int, leased_owners: int,
                sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`BlockStore.stats()`: per tier capacity, occupancy and traffic, then store-wide totals and tier sections."""
    per_tier = {}
    for t, tier in enumerate(tiers):
        c = counters.tiers[tier.name]
        used = index.resident_count(t)
        per_tier[tier.name] = {
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
        "tiers": per_tier,
        "blocks": len(index),
        "block_bytes": block_bytes,
        "bytes_moved": dict(counters.moved),
        "dropped": counters.dropped,
        "puts": counters.puts,
        "gets": counters.gets,
        "leased_owners": leased_owners,
        **sections,
    }


def to_prometheus(stats: dict[str, Any], prefix: str = "tierkv") -> str:
    """Prometheus text exposition of `BlockStore.stats()`, rendered by prometheus_client (`tierkv.metrics`)."""
    from .metrics import render, store_families

    return render(store_families(stats, prefix=prefix))
