"""Read, write and sync errors of the data files, injected at the disk tier's I/O calls (`tierkv.tiers.disk.faults`).

No real device here fails on demand (this sandbox has no device-mapper for dm-error / dm-flakey),
so the faults come from the seam in the tier's own positional I/O: the tier's code runs as it
would on a failing disk, only the syscall's answer is made up. Each test asks the fault suite's
questions: no wrong byte, no exception out of put/get, nothing promised lost, the store usable.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from _faults import FAMILY, open_fault_store, settled, still_usable, verify_served
from conftest import check_index_invariants, kv_for, prompt, same_bits

from tierkv.tiers.disk import faults


@pytest.fixture(autouse=True)
def no_faults() -> Iterator[None]:
    yield
    faults.install(None)


def slot_range(store, tokens: list[int], block: int) -> tuple[int, int, int]:
    """(data file, first byte, end byte) of the disk slot holding block `block` of `tokens`."""
    disk = store.tiers[store.tier_names.index("disk")]
    slot = store.locate([store.keys(tokens)[block]])[store.keys(tokens)[block]]["disk"]
    f, s = divmod(slot, disk.slots_per_file)
    return f, s * disk.stride, (s + 1) * disk.stride


def test_a_read_error_on_one_extent_drops_that_block_and_serves_the_prefix(tmp_path: Path) -> None:
    """Before: every get of that prefix raised OSError, forever, and the block was never dropped."""
    tokens = FAMILY[0]
    with open_fault_store(tmp_path) as store:
        store.put(tokens, kv_for(store.layout, tokens))
    with open_fault_store(tmp_path) as store:  # every block on disk only
        f, start, stop = slot_range(store, tokens, 5)
        plan = faults.FaultPlan([faults.Rule(op="read", file=f, start=start, stop=stop, heals_on_write=True)])
        faults.install(plan)
        got = store.get(tokens)
        assert got.shape[0] == 5, "the unreadable block and the blocks after it must not be served"
        assert same_bits(got, kv_for(store.layout, tokens)[:5])
        disk = store.stats()["disk"]
        assert disk["read_errors"] == 1  # the batch failed, then the slot alone (the plan fired for both)
        fired = plan.fired
        assert store.keys(tokens)[5] not in store.index.blocks, "the unreadable copy was kept"
        assert store.get(tokens).shape[0] == 5 and plan.fired == fired, "the lost block was read again"
        check_index_invariants(store)
        store.put(tokens, kv_for(store.layout, tokens))  # recomputed KV heals the prefix
        assert same_bits(store.get(tokens), kv_for(store.layout, tokens))
        still_usable(store, 1)


def test_read_errors_everywhere_are_misses_not_exceptions(tmp_path: Path) -> None:
    with open_fault_store(tmp_path) as store:
        for tokens in FAMILY[:6]:
            store.put(tokens, kv_for(store.layout, tokens))
    with open_fault_store(tmp_path) as store:
        faults.install(faults.FaultPlan([faults.Rule(op="read")]))
        assert verify_served(store, FAMILY[:6]).blocks == 0
        assert store.stats()["disk"]["read_errors"] > 0
        faults.install(None)
        still_usable(store, 2)


@pytest.mark.parametrize("durability", ["none", "batch", "every"])
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
def test_failed_writes_lose_only_those_blocks(tmp_path: Path, durability: str, code: int) -> None:
    """Every data write fails for a while: puts go on, nothing wrong is served, the rest survives a restart."""
    with open_fault_store(tmp_path, durability=durability) as store:
        for tokens in FAMILY[:3]:
            store.put(tokens, kv_for(store.layout, tokens))
        faults.install(faults.FaultPlan([faults.Rule(op="write", errno=code, times=20)]))
        for tokens in FAMILY[3:9]:
            store.put(tokens, kv_for(store.layout, tokens))  # demotions to disk fail
            verify_served(store, [tokens])
        settled(store)  # the write-behind thread meets the failing writes before they stop failing
        faults.install(None)
        assert settled(store).stats()["disk"]["write_errors"] > 0
        verify_served(store)
        check_index_invariants(store)
        kept = {k for k, where in store.locate(list(store.index.blocks)).items() if "disk" in where}
    with open_fault_store(tmp_path) as store:
        verify_served(store)
        assert kept <= set(store.index.blocks) | set(), "a block the disk tier kept was lost at the restart"
        still_usable(store, 3)


@pytest.mark.parametrize("durability", ["batch", "every"])
def test_a_failed_fsync_loses_that_batch_not_the_store(tmp_path: Path, durability: str) -> None:
    with open_fault_store(tmp_path, durability=durability) as store:
        faults.install(faults.FaultPlan([faults.Rule(op="sync", times=3)]))
        for tokens in FAMILY[:6]:
            store.put(tokens, kv_for(store.layout, tokens))
        settled(store)  # with durability="batch" the syncs run behind: let them meet the fault first
        faults.install(None)
        verify_served(store)
        disk = settled(store).stats()["disk"]
        assert disk["write_errors"] + disk["commit_failures"] > 0
    with open_fault_store(tmp_path) as store:
        verify_served(store)
        still_usable(store, 4)


def test_a_write_error_in_every_mode_keeps_the_index_sound(tmp_path: Path) -> None:
    """durability='every' writes on the caller's thread: its error must not leave a demotion half done."""
    with open_fault_store(tmp_path, durability="every", device=2, host=2) as store:
        faults.install(faults.FaultPlan([faults.Rule(op="write", after=2, times=3)]))
        for i in range(6):
            tokens = prompt(1000 * i, 3)
            store.put(tokens, kv_for(store.layout, tokens))
            check_index_invariants(store)
        faults.install(None)
        for i in range(6):
            tokens = prompt(1000 * i, 3)
            got = store.get(tokens)
            assert same_bits(got, kv_for(store.layout, tokens)[: got.shape[0]])
