"""Write-behind of the disk tier: queued blocks are served, bounded, and never land on a reused slot."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from conftest import kv_for, prompt, same_bits, tiny_layout
from test_disk import open_store
from tierkv import KVLayout, Namespace, StoreConfig
from tierkv.tiers.disk import DiskTier


# Blocks of exactly 4096 bytes (2 layers x K, V x 4 tokens x 2 heads x 64 channels x 2 bytes): one slot a block.
LAYOUT_4K = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_tokens=4)


def gated_tier(tmp_path: Path, slots: int = 16, limit: int = 1 << 20) -> tuple[DiskTier, threading.Event]:
    """A real disk tier whose write-back thread waits for `gate` before each batch."""
    config = StoreConfig(device="cpu", disk_path=str(tmp_path), disk_bytes=slots * LAYOUT_4K.block_bytes,
                         disk_io="posix", writeback_bytes=limit)
    tier = DiskTier(config, LAYOUT_4K, Namespace(model="writeback"))
    assert (tier.num_slots, tier.slot_bytes) == (slots, 4096)
    gate = threading.Event()
    real = tier.queue.write

    def held_write(slots, buf):  # the real write, only later
        gate.wait(10)
        real(slots, buf)

    tier.queue.write = held_write
    return tier, gate


def rows(n: int, value: int, block_bytes: int = 4096) -> torch.Tensor:
    return torch.full((n, block_bytes), value, dtype=torch.uint8)


def test_queued_rows_are_served_before_they_reach_disk(tmp_path: Path) -> None:
    tier, gate = gated_tier(tmp_path)
    try:
        tier.write_behind([3, 4], rows(2, 9))
        assert tier.queue.is_pending(3)
        assert torch.equal(tier.read([4, 3]), rows(2, 9))
        gate.set()
        tier.queue.drain()
        completed, failed = tier.queue.take_results()
        assert sorted(s for s, _ in completed) == [3, 4] and not failed
        assert not tier.queue.is_pending(3)
        assert torch.equal(tier.read([3, 4]), rows(2, 9))  # now from the file
    finally:
        gate.set()
        tier.close()


def test_freed_queued_slot_is_quarantined_until_its_write_is_done(tmp_path: Path) -> None:
    tier, gate = gated_tier(tmp_path, slots=2)
    try:
        a, b = tier.allocate(2)
        tier.write_behind([a], rows(1, 1))
        tier.free([a])  # evicted while its write is still queued
        assert tier.allocate(1) == [], "a slot with a write still aimed at it was handed out again"
        gate.set()
        tier.queue.drain()
        completed, _ = tier.queue.take_results()
        assert completed == [], "a cancelled write was reported as a stored block"
        assert tier.allocate(1) == [a]  # released once the late write is over
        tier.write_now([a], rows(1, 2))
        assert torch.equal(tier.read([a]), rows(1, 2))
    finally:
        gate.set()
        tier.close()


def test_full_queue_applies_backpressure(tmp_path: Path) -> None:
    tier, gate = gated_tier(tmp_path, limit=2 * 4096)
    done = threading.Event()
    try:
        tier.write_behind([0, 1], rows(2, 5))

        def second() -> None:
            tier.write_behind([2, 3], rows(2, 6))
            done.set()

        t = threading.Thread(target=second)
        t.start()
        assert not done.wait(0.3), "the queue grew past its bound instead of making the caller wait"
        gate.set()
        assert done.wait(10)
        t.join()
        tier.queue.drain()
        assert torch.equal(tier.read([0, 1, 2, 3]), torch.cat([rows(2, 5), rows(2, 6)]))
    finally:
        gate.set()
        tier.close()


def test_failed_write_back_drops_the_disk_copy_and_serves_no_garbage(tmp_path: Path) -> None:
    layout = tiny_layout()
    store = open_store(tmp_path, device=2, host=2)
    disk = store.tiers[store.tier_names.index("disk")]

    def broken(slots, buf):
        raise OSError(5, "Input/output error")

    disk.queue.write = broken
    tokens = prompt(0, 8)
    store.put(tokens, kv_for(layout, tokens))  # 4 blocks go to disk and their writes fail
    disk.queue.drain()
    got = store.get(tokens)  # the commit at the end of this call sees the failures
    assert same_bits(got, kv_for(layout, tokens)[: got.shape[0]])
    got = store.get(tokens)
    assert same_bits(got, kv_for(layout, tokens)[: got.shape[0]])
    assert store.stats()["tiers"]["disk"]["used_slots"] == 0
    disk.queue.write = lambda slots, buf: None
    store.close()


def test_store_demotes_through_the_queue_and_restarts_warm(tmp_path: Path) -> None:
    layout = tiny_layout()
    prompts = [prompt(1000 * i, 6) for i in range(6)]
    with open_store(tmp_path, device=2, host=3) as store:
        for tokens in prompts:
            store.put(tokens, kv_for(layout, tokens))
        for tokens in prompts:  # some of these are served while still queued
            got = store.get(tokens)
            assert same_bits(got, kv_for(layout, tokens)[: got.shape[0]])
    with open_store(tmp_path, device=2, host=3) as store:
        for tokens in prompts:
            assert store.match(tokens) == 24
            assert same_bits(store.get(tokens), kv_for(layout, tokens))


def test_writeback_bytes_is_validated() -> None:
    with pytest.raises(ValueError, match="writeback_bytes"):
        StoreConfig(writeback_bytes="lots")
