"""The disk tier through kvikio on a GPU machine: host and device buffers, and a store restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tierkv import BlockStore, KVLayout, Namespace, StoreConfig
from tierkv.tiers.disk import DiskTier, kvikio_status, slot_stride

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not kvikio_status()[0], reason="needs kvikio and a CUDA driver"),
]


def layout_of(block_bytes: int) -> KVLayout:
    """A layout whose blocks are exactly `block_bytes` (a multiple of 4): one token, one head, K and V in fp16."""
    return KVLayout(num_layers=1, kv_factor=2, num_kv_heads=1, head_dim=block_bytes // 4, dtype=torch.float16, block_tokens=1)


@pytest.mark.parametrize("block_bytes", [4096, 65536, 5000])
def test_kvikio_host_and_device_round_trip(tmp_path: Path, block_bytes: int) -> None:
    layout = layout_of(block_bytes)
    config = StoreConfig(disk_path=str(tmp_path), disk_bytes=64 * slot_stride(block_bytes), disk_io="kvikio")
    tier = DiskTier(config, layout, Namespace(model="gpu-disk-tier"))
    try:
        assert "kvikio" in tier.io_path
        assert (tier.num_slots, tier.slot_bytes) == (64, block_bytes)
        slots = [5, 6, 7, 40, 2, 63]
        host_rows = torch.randint(0, 256, (len(slots), block_bytes), dtype=torch.uint8)
        tier.write_now(slots, host_rows)
        tier.sync()
        assert torch.equal(tier.read(slots), host_rows)
        dev_rows = torch.randint(0, 256, (len(slots), block_bytes), dtype=torch.uint8, device="cuda")
        tier.write_from_device(slots[::-1], dev_rows)
        tier.sync()
        back = tier.read_to_device(slots[::-1], torch.device("cuda"))
        assert back.is_cuda and torch.equal(back, dev_rows)
        assert torch.equal(tier.read(slots[::-1]), dev_rows.cpu())
    finally:
        tier.close()


@pytest.mark.parametrize("block_bytes", [65536, 5000])
def test_reads_bound_for_the_gpu_go_straight_to_device_memory(tmp_path: Path, block_bytes: int) -> None:
    """`read_to(cuda)` on kvikio: rows in GPU memory, bit-exact, slots in any order, padded slots cut to the block."""
    layout = layout_of(block_bytes)
    config = StoreConfig(disk_path=str(tmp_path), disk_bytes=64 * slot_stride(block_bytes), disk_io="kvikio")
    tier = DiskTier(config, layout, Namespace(model="gpu-disk-read-to"))
    try:
        slots = [9, 3, 60, 4]
        rows = torch.randint(0, 256, (len(slots), block_bytes), dtype=torch.uint8)
        tier.write_now(slots, rows)
        tier.sync()
        got = tier.read_to(slots, torch.device("cuda"))
        assert got.rows.is_cuda and not got.unreadable and torch.equal(got.rows.cpu(), rows)
        assert tier.read_to([], torch.device("cuda")).rows.shape == (0, block_bytes)
    finally:
        tier.close()


def test_store_restart_through_kvikio(tmp_path: Path) -> None:
    layout = KVLayout(num_layers=4, kv_factor=2, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_tokens=16)
    bb = layout.block_bytes
    config = StoreConfig(device_bytes=4 * bb, host_bytes=4 * bb, disk_path=str(tmp_path), disk_bytes=64 * bb,
                         disk_io="kvikio")
    tokens = torch.arange(16 * 20, dtype=torch.int64)
    kv = torch.randn((20, *layout.block_shape), device="cuda").to(layout.dtype)
    with BlockStore(layout, Namespace(model="gpu-disk"), config) as store:
        assert store.put(tokens, kv) == 20
        assert "kvikio" in store.stats()["disk"]["io"]
    with BlockStore(layout, Namespace(model="gpu-disk"), config) as store:
        assert store.recovery.blocks == 20
        got = store.get(tokens)
        assert got.is_cuda and torch.equal(got, kv)
