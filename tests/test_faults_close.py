"""A clean close keeps the most recently used blocks, also when the disk tier is full."""

from __future__ import annotations

from pathlib import Path

from _faults import open_fault_store, verify_served
from conftest import check_index_invariants, kv_for, prompt


def test_close_with_a_full_disk_tier_keeps_the_hottest_blocks(tmp_path: Path) -> None:
    """Before: close() wrote host-only blocks into free disk slots only, so with the disk tier full
    the blocks of the last requests were dropped and cold ones kept (3 of the 11 most recent survived)."""
    cold = [prompt(1000 * i, 3) for i in range(12)]  # 36 blocks: the disk tier (20) fills and evicts
    hot = [prompt(50_000 + 1000 * i, 3) for i in range(3)]  # 9 blocks: they fit above the disk tier
    with open_fault_store(tmp_path, device=3, host=6, disk=20) as store:
        for tokens in cold + hot:
            store.put(tokens, kv_for(store.layout, tokens))
        assert store.stats()["tiers"]["disk"]["used_slots"] == 20
        on_disk = {k for k, where in store.locate(store.index.blocks).items() if "disk" in where}
        assert not on_disk & set(k for t in hot for k in store.keys(t)), "the hot blocks reached disk before close"
        # The 20 most recent blocks: the last 6 prompts whole, and the head of the one before.
        newest = {k for t in (cold + hot)[-6:] for k in store.keys(t)} | set(store.keys(cold[-4])[:2])
    with open_fault_store(tmp_path, device=3, host=6, disk=20) as store:
        for tokens in hot:
            assert store.match(tokens) == len(tokens), "a block of the last requests was dropped at close"
        kept = set(store.index.blocks)
        assert len(kept) == 20
        assert kept == newest, "the disk tier kept older blocks than it dropped"
        assert verify_served(store, hot + cold).blocks == 20
        check_index_invariants(store)


def test_close_with_room_on_disk_keeps_everything(tmp_path: Path) -> None:
    prompts = [prompt(1000 * i, 3) for i in range(5)]
    with open_fault_store(tmp_path, device=3, host=6, disk=40) as store:
        for tokens in prompts:
            store.put(tokens, kv_for(store.layout, tokens))
    with open_fault_store(tmp_path, device=3, host=6, disk=40) as store:
        assert all(store.match(t) == len(t) for t in prompts)
        assert verify_served(store, prompts).blocks == 15
