"""The elastic device tier on real CUDA virtual memory: map/unmap, copies across page boundaries,
stores that grow and shrink, two processes sharing one budget, and no memory left behind.

Run on the GPU machine: `python -m pytest -m gpu tests/gpu/test_vmm_gpu.py -q`. Run as
`python test_vmm_gpu.py child NAME` this file is the second process of the two-process test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, also when run as the child script
from conftest import ask, spawn  # noqa: E402

from tierkv import BlockStore, ConfigError, Namespace, StoreConfig  # noqa: E402
from tierkv.tiers.elastic.budget import budget_path, read_budget
from tierkv.keys import chain_keys
from tierkv.ops.transfer import copy_slots
from tierkv.tiers.elastic import ElasticTier
from tierkv.tiers.elastic.vmm import CudaPages, cuda_granularity
from tierkv.cli.workload import SYNTHETIC_LAYOUT, holds_synthetic_kv, synthetic_kv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MiB = 1 << 20
LAYOUT = SYNTHETIC_LAYOUT  # 64 KiB blocks of 16 tokens: 32 a 2 MiB page
HERE = Path(__file__).resolve()
SLACK = 4 * MiB  # what the driver may keep for itself between two readings of free memory


def free_bytes() -> int:
    """Free GPU memory as the driver counts it (cudaMemGetInfo), torch's cache emptied first."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    """Create torch's context and load every kernel the tests use before any memory is counted:
    CUDA loads kernels lazily, and a first use takes device memory for the code."""
    t = torch.zeros((4, 64 * 1024), dtype=torch.uint8, device="cuda")
    t.fill_(7)
    t.index_fill_(0, torch.tensor([1], device="cuda"), 0xA5)
    assert not bool(t.eq(7).all()) and torch.equal(t.flip(0).flip(0), t)
    pages = CudaPages(4 * cuda_granularity(0), torch.device("cuda"))
    tier = ElasticTier("device", 4, 64 * 1024, pages)
    slots = tier.allocate(4)
    rows = torch.zeros((4, 64 * 1024), dtype=torch.uint8).pin_memory()
    for path in ("kernel", "dma", "staged"):
        copy_slots(rows, range(4), tier.storage, slots, path=path)
        copy_slots(tier.storage, slots, rows, range(4), path=path)
    tier.close()
    free_bytes()


def prompts(first: int, count: int, blocks: int) -> list[np.ndarray]:
    return [np.arange(first + i * 100_000, first + i * 100_000 + blocks * LAYOUT.block_tokens, dtype=np.int32)
            for i in range(count)]


def put_all(store: BlockStore, ps: list[np.ndarray]) -> None:
    seed = store.namespace.digest(LAYOUT)
    for p in ps:
        store.put(p, synthetic_kv(chain_keys(seed, p, LAYOUT.block_tokens), LAYOUT, "cuda"))


def all_served(store: BlockStore, ps: list[np.ndarray]) -> bool:
    """Every prompt comes back whole and bit-exact."""
    seed = store.namespace.digest(LAYOUT)
    return all(holds_synthetic_kv(store.get(p), chain_keys(seed, p, LAYOUT.block_tokens)) for p in ps)


def elastic(name: str | None, max_bytes: int, host_bytes: int, min_bytes: int = 0, total: int | None = None) -> StoreConfig:
    return StoreConfig(device="cuda", device_bytes=max_bytes, host_bytes=host_bytes, device_elastic=True,
                       device_min_bytes=min_bytes, gpu_budget_name=name, gpu_budget_bytes=total if name else None)


# -- pages ---------------------------------------------------------------------------------------


def test_vmm_pages_map_and_unmap_physical_memory() -> None:
    gran = cuda_granularity(0)
    base = free_bytes()
    pages = CudaPages(64 * gran, torch.device("cuda"))
    assert pages.page_bytes == gran and pages.num_pages == 64
    assert abs(free_bytes() - base) <= SLACK  # a reservation costs no memory
    t = pages.tensor
    assert t.is_cuda and t.data_ptr() == pages.address and t.numel() == 64 * gran
    assert pages.map(list(range(32))) == 32
    mapped = free_bytes()
    assert 32 * gran - SLACK <= base - mapped <= 32 * gran + SLACK
    pages.unmap(list(range(16)))
    assert 16 * gran - SLACK <= free_bytes() - mapped <= 16 * gran + SLACK
    t[16 * gran : 32 * gran].fill_(7)  # one kernel writing across 16 separately mapped pages
    assert bool(t[16 * gran : 32 * gran].eq(7).all())
    assert pages.map([3]) == 1
    t[3 * gran : 4 * gran].fill_(1)
    assert bool(t[3 * gran : 4 * gran].eq(1).all())
    pages.close()
    assert abs(free_bytes() - base) <= SLACK


def test_vmm_page_size_must_be_a_multiple_of_the_granularity() -> None:
    gran = cuda_granularity(0)
    with pytest.raises(ConfigError, match="granularity"):
        CudaPages(4 * gran, torch.device("cuda"), page_bytes=gran + 4096)


@pytest.mark.parametrize("slot_bytes", [96 * 1024, 3 * MiB // 2 + 64, 5 * MiB + 4096])
def test_copies_into_slots_spanning_page_boundaries(slot_bytes: int) -> None:
    n = 24  # enough slots for every size to cross a page boundary
    base = free_bytes()
    tier = ElasticTier("device", n, slot_bytes, CudaPages(n * slot_bytes, torch.device("cuda")))
    slots = tier.allocate(n)
    assert any(s * slot_bytes // tier.page_bytes != ((s + 1) * slot_bytes - 1) // tier.page_bytes for s in slots)
    order = slots[::-1]  # scattered on purpose
    host = torch.randint(0, 256, (n, slot_bytes), dtype=torch.uint8).pin_memory()
    for path in ("torch", "kernel", "dma", "staged"):
        tier.storage.index_fill_(0, torch.tensor(slots, device="cuda"), 0xA5)
        copy_slots(host, range(n), tier.storage, order, path=path)
        back = torch.zeros_like(host).pin_memory()
        copy_slots(tier.storage, order, back, range(n), path=path)
        torch.cuda.synchronize()
        assert torch.equal(back, host), path
    # Device to device (the read path of the tier) and the tier's own write path.
    assert torch.equal(tier.read(order).cpu(), host)
    tier.write(slots, host.flip(0).contiguous(), [])
    assert torch.equal(tier.read(slots).cpu(), host.flip(0))
    tier.close()
    assert abs(free_bytes() - base) <= SLACK


# -- stores --------------------------------------------------------------------------------------


def test_store_on_vmm_grows_shrinks_by_demotion_and_leaves_nothing_behind() -> None:
    base = free_bytes()
    with BlockStore(LAYOUT, Namespace(model="vmm"), elastic(None, 64 * MiB, 64 * MiB)) as store:
        assert store.stats()["elastic"]["backend"] == "cuda-vmm" and store.tiers[0].mapped_bytes == 0
        ps = prompts(0, 6, 100)  # 600 blocks of 64 KiB, 37.5 MiB
        put_all(store, ps)
        assert store.tiers[0].mapped_bytes == 38 * MiB
        assert all_served(store, ps)
        assert store.shrink_device(8 * MiB) >= 30 * MiB and store.tiers[0].mapped_bytes <= 8 * MiB
        assert store.stats()["elastic"]["demoted_bytes"] >= 30 * MiB
        assert all_served(store, ps)  # from pinned host, promoted back as room allows
    assert abs(free_bytes() - base) <= SLACK


def test_two_processes_share_one_gpu_budget(name: str) -> None:
    base = free_bytes()
    proc = spawn(HERE, "child", name, stdin=True)

    try:
        assert ask(proc, "fill")["mapped"] == 48 * MiB
        with BlockStore(LAYOUT, Namespace(model="parent"), elastic(name, 64 * MiB, 64 * MiB, 8 * MiB, 64 * MiB)) as store:
            ps = prompts(7_000_000, 6, 100)
            put_all(store, ps)  # 38 MiB with 16 free: the child, idle, must give back at least 22 MiB
            child = ask(proc, "stats")
            mine = store.tiers[0].mapped_bytes
            assert mine == 38 * MiB and child["shrinks"] >= 1 and child["mapped"] <= 64 * MiB - mine
            assert read_budget(name).held_bytes == mine + child["mapped"] <= 64 * MiB
            # The driver's view across two processes is not checked here: with torch's memory in
            # both processes set apart, 68 MiB of the reading stayed unexplained on the H100 (see
            # docs/elastic.md). The single-process test above checks the driver to 4 MiB.
            assert ask(proc, "verify")["ok"]
            assert all_served(store, ps)
        assert ask(proc, "exit")["bye"]
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert not budget_path(name).exists()
    assert abs(free_bytes() - base) <= SLACK  # both processes gave everything back


def _child(name: str) -> None:
    store = BlockStore(LAYOUT, Namespace(model="child"), elastic(name, 64 * MiB, 64 * MiB, 16 * MiB, 64 * MiB))
    ps = prompts(0, 8, 96)  # 768 blocks, 48 MiB
    for line in sys.stdin:
        command = line.strip()
        if command == "fill":
            put_all(store, ps)
            reply = {"mapped": store.tiers[0].mapped_bytes}
        elif command == "stats":
            e = store.stats()["elastic"]
            reply = {"mapped": e["mapped_bytes"], "shrinks": e["shrinks"], "demoted": e["demoted_bytes"]}
        elif command == "verify":
            reply = {"ok": all_served(store, ps)}
        else:
            store.close()
            print(json.dumps({"bye": True}), flush=True)
            return
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    _child(sys.argv[2])
