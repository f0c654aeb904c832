"""Which tier holds each block right now, for engines that mirror the store's contents elsewhere.

A vLLM scheduler decides hits in one process while the store lives in the worker processes;
the worker reports what changed after each step (see `connectors/vllm_worker.py`). Those
reports need the fastest tier of a set of keys, and the counters that say whether anything
left a tier without being asked (eviction, a dropped corrupt copy), read under the store lock
so a concurrent `get` or `put` is never seen half done.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .index import ABSENT
from .store import BlockStore

GONE = ABSENT  # the tier reported for a key the store no longer holds


@dataclass(frozen=True)
class Churn:
    """Counters that only move when blocks leave a tier on the store's own initiative."""

    evictions: int
    dropped: int
    corrupt: int


def fastest_tiers(store: BlockStore, keys: Iterable[bytes]) -> dict[bytes, int]:
    """key -> index into `store.tiers` of its fastest copy, or `GONE`."""
    with store._lock:
        blocks = store.index.blocks
        out = {}
        for key in keys:
            block = blocks.get(key)
            out[key] = GONE if block is None else block.fastest
        return out


def snapshot(store: BlockStore) -> dict[bytes, int]:
    """Every stored key with its fastest tier: what a fresh mirror starts from."""
    with store._lock:
        return {key: block.fastest for key, block in store.index.blocks.items()}


def churn(store: BlockStore) -> Churn:
    """Evictions, drops and corrupt reads so far; a mirror that saw no change needs no rescan."""
    with store._lock:
        tiers = store._counters.tiers.values()
        return Churn(
            evictions=sum(c.evictions for c in tiers),
            dropped=store._counters.dropped,
            corrupt=sum(c.corrupt for c in tiers),
        )
