"""The host page backend and the elastic tier's page policy, on real mmap'ed memory (no budget)."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch

from tierkv import ConfigError, TierKVError
from tierkv.tiers.elastic import ElasticTier
from tierkv.tiers.elastic.vmm import HostPages, PageError, page_backend, tensor_over

PAGE = 2 * mmap.PAGESIZE  # small pages: many of them, and slots that straddle them


def tier(num_slots: int, slot_bytes: int, page_bytes: int = PAGE) -> ElasticTier:
    return ElasticTier("device", num_slots, slot_bytes, HostPages(num_slots * slot_bytes, page_bytes))


def rows(n: int, slot_bytes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, slot_bytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def slot_pages(t: ElasticTier, slot: int) -> range:
    """The pages slot `slot` touches: it holds bytes `[slot * slot_bytes, (slot + 1) * slot_bytes)` of the range."""
    return range(slot * t.slot_bytes // t.page_bytes, ((slot + 1) * t.slot_bytes - 1) // t.page_bytes + 1)


def pages_of(t: ElasticTier, slots: list[int]) -> set[int]:
    return {p for s in slots for p in slot_pages(t, s)}


def page_use(t: ElasticTier, allocated: list[int]) -> np.ndarray:
    """Allocated slots touching each page, recounted from the slots the test allocated."""
    use = np.zeros(t.backend.num_pages, dtype=np.int64)
    for s in allocated:
        for p in slot_pages(t, s):
            use[p] += 1
    return use


# -- HostPages --------------------------------------------------------------------------------


def test_host_pages_map_write_unmap_release_memory() -> None:
    pages = HostPages(8 * PAGE, PAGE)
    assert pages.num_pages == 8 and pages.mapped_pages == 0 and pages.resident_bytes() == 0
    assert pages.map([2, 5]) == 2
    pages.tensor[2 * PAGE : 3 * PAGE] = 7
    pages.tensor[5 * PAGE : 5 * PAGE + 10] = 9
    assert pages.resident_bytes() == PAGE + mmap.PAGESIZE
    assert pages.tensor[2 * PAGE : 3 * PAGE].eq(7).all()
    pages.unmap([2])
    assert pages.mapped.tolist() == [False, False, False, False, False, True, False, False]
    assert pages.resident_bytes() == mmap.PAGESIZE
    pages.map([2])
    assert pages.tensor[2 * PAGE : 3 * PAGE].eq(0).all()  # unmapping dropped the bytes
    pages.close()
    assert pages.resident_bytes() == 0
    pages.close()  # idempotent


def test_host_pages_range_rounds_up_to_whole_pages() -> None:
    pages = HostPages(3 * PAGE + 1, PAGE)
    assert pages.num_pages == 4 and pages.nbytes == 4 * PAGE and pages.tensor.numel() == 4 * PAGE
    pages.close()


@pytest.mark.parametrize("bad", [0, mmap.PAGESIZE + 1, -PAGE])
def test_host_pages_need_whole_os_pages(bad: int) -> None:
    with pytest.raises(ConfigError, match="device_page_bytes"):
        HostPages(PAGE, bad)


def test_host_pages_refuse_double_map_unmapped_unmap_bad_pages_and_use_after_close() -> None:
    pages = HostPages(4 * PAGE, PAGE)
    pages.map([1])
    with pytest.raises(ValueError, match="page 1 is already mapped"):
        pages.map([0, 1])
    assert pages.mapped.tolist() == [False, True, False, False]  # nothing done on refusal
    with pytest.raises(ValueError, match="page 2 is not mapped"):
        pages.unmap([2])
    with pytest.raises(IndexError, match="outside"):
        pages.map([4])
    with pytest.raises(ValueError, match="named twice"):
        pages.map([3, 3])
    pages.close()
    with pytest.raises(PageError, match="closed"):
        pages.map([0])


def test_tensor_over_views_memory_without_copy() -> None:
    base = torch.arange(64, dtype=torch.uint8)
    view = tensor_over(base.data_ptr(), 64, torch.device("cpu"))
    assert view.data_ptr() == base.data_ptr() and view.shape == (64,) and view.dtype == torch.uint8
    view[3] = 200
    assert base[3] == 200
    del view  # torch frees the DLPack record, not the memory


def test_page_backend_picks_host_pages_on_cpu_and_refuses_other_devices() -> None:
    backend = page_backend(5 * PAGE, torch.device("cpu"), PAGE)
    assert isinstance(backend, HostPages) and backend.num_pages == 5
    backend.close()
    with pytest.raises(ConfigError, match="no page backend"):
        page_backend(PAGE, torch.device("meta"), PAGE)


# -- ElasticTier: allocation and pages ----------------------------------------------------------


def test_slots_spanning_pages_map_both_and_round_trip() -> None:
    sb = PAGE // 3 + 40  # does not divide the page: every few slots straddle a boundary
    t = tier(20, sb)
    slots = t.allocate(20)
    assert slots == list(range(20))
    straddling = [s for s in slots if len(slot_pages(t, s)) == 2]
    assert straddling, "the geometry should make some slots span two pages"
    data = rows(20, sb, 1)
    t.write(slots, data, [])
    assert torch.equal(t.read(slots), data)
    assert torch.equal(t.read(straddling[::-1]), data[straddling[::-1]])
    assert t.mapped_bytes == t.backend.num_pages * PAGE
    t.close()


def test_pages_are_mapped_on_first_use_and_unmapped_when_empty() -> None:
    sb = PAGE // 4  # 4 slots a page
    t = tier(16, sb)
    assert t.mapped_bytes == 0
    a = t.allocate(1)
    assert a == [0] and t.mapped_bytes == PAGE
    b = t.allocate(3)  # the rest of page 0: no new page
    assert sorted(b) == [1, 2, 3] and t.mapped_bytes == PAGE
    c = t.allocate(1)
    assert c == [4] and t.mapped_bytes == 2 * PAGE
    t.write(c, rows(1, sb, 2), [])
    t.free(a + b)
    assert t.mapped_bytes == PAGE and t.backend.mapped.tolist()[:2] == [False, True]
    assert t.backend.resident_bytes() == mmap.PAGESIZE  # slot 4's bytes on page 1 only
    t.free(c)
    assert t.mapped_bytes == 0 and t.backend.resident_bytes() == 0
    assert t.free_slots == 16 and t.used_slots == 0
    t.close()


def test_allocation_prefers_free_slots_on_mapped_pages() -> None:
    sb = PAGE // 4
    t = tier(16, sb)
    first = t.allocate(8)  # pages 0 and 1
    t.free([first[1], first[6]])  # holes on both mapped pages
    again = t.allocate(2)
    assert sorted(again) == [first[1], first[6]] and t.mapped_bytes == 2 * PAGE
    t.close()


def test_slot_larger_than_a_page_maps_all_its_pages() -> None:
    sb = 2 * PAGE + 100
    t = tier(3, sb)
    s = t.allocate(1)
    assert s == [0] and t.mapped_bytes == 3 * PAGE
    data = rows(1, sb, 3)
    t.write(s, data, [])
    assert torch.equal(t.read(s), data)
    s2 = t.allocate(1)  # shares page 2 with slot 0
    assert s2 == [1] and t.mapped_bytes == 5 * PAGE
    t.free(s)
    assert t.backend.mapped.tolist()[:5] == [False, False, True, True, True]
    t.close()


def test_access_to_unallocated_slots_and_double_free_are_refused() -> None:
    sb = PAGE // 4
    t = tier(8, sb)
    s = t.allocate(1)
    with pytest.raises(TierKVError, match="not allocated"):
        t.read([5])  # would fault: page 1 is not mapped
    with pytest.raises(TierKVError, match="not allocated"):
        t.write([1], rows(1, sb, 0), [])  # mapped page, but not allocated
    with pytest.raises(ValueError, match="uint8 rows of shape"):
        t.write(s, rows(2, sb, 0), [])
    t.free(s)
    with pytest.raises(TierKVError, match="not allocated"):
        t.free(s)
    with pytest.raises(ValueError, match="do not fit"):
        ElasticTier("device", 10, sb, HostPages(sb, PAGE))
    t.close()


# -- ElasticTier: which blocks a shrink moves ---------------------------------------------------


def test_plan_shrink_empties_the_coldest_whole_pages() -> None:
    sb = PAGE // 4
    t = tier(16, sb)
    slots = t.allocate(16)  # 4 pages of 4 slots
    # Page 2 is the coldest as a whole; page 0 holds the single coldest block but also a hot one.
    last_use = {s: 100 + s for s in slots}
    last_use[0], last_use[3] = 1, 999
    for s in (8, 9, 10, 11):
        last_use[s] = 10 + s
    picks = t.plan_shrink(slots, [last_use[s] for s in slots], [False] * 16, PAGE)
    assert sorted(slots[i] for i in picks) == [8, 9, 10, 11]
    picks = t.plan_shrink(slots, [last_use[s] for s in slots], [False] * 16, 2 * PAGE - 1)
    assert sorted(slots[i] for i in picks) == [4, 5, 6, 7, 8, 9, 10, 11]
    # Coldest first in the returned order.
    assert [last_use[slots[i]] for i in picks] == sorted(last_use[slots[i]] for i in picks)
    t.close()


def test_plan_shrink_skips_pages_with_pinned_blocks_and_counts_straddling_slots() -> None:
    sb = PAGE // 3 + 40
    t = tier(20, sb)
    slots = t.allocate(20)
    pinned = [s == 0 for s in slots]  # page 0 may not empty
    picks = t.plan_shrink(slots, list(range(20)), pinned, PAGE)
    chosen = [slots[i] for i in picks]
    assert 0 not in chosen
    # Moving the chosen blocks really empties at least one page.
    remaining = page_use(t, slots)
    for s in chosen:
        for p in slot_pages(t, s):
            remaining[p] -= 1
    assert (remaining[t.backend.mapped] == 0).sum() >= 1
    everything = t.plan_shrink(slots, list(range(20)), pinned, 100 * PAGE)
    assert 0 not in [slots[i] for i in everything]  # asked for more than can move: what can, moves
    assert t.plan_shrink(slots, list(range(20)), [True] * 20, PAGE) == []
    assert t.plan_shrink([], [], [], PAGE) == [] and t.plan_shrink(slots, list(range(20)), pinned, 0) == []
    t.close()


def test_plan_shrink_keeps_at_least_keep_bytes_mapped() -> None:
    sb = PAGE // 2 + PAGE // 4  # 3 slots on 2 pages: slot 1 straddles pages 0 and 1
    t = tier(6, sb)
    slots = t.allocate(6)  # 3 pages... and a bit: 6 x 0.75 pages = 4.5 -> 5 pages
    assert t.mapped_bytes == 5 * PAGE
    cold_first = [0, 1, 2, 3, 4, 5]
    everything = t.plan_shrink(slots, cold_first, [False] * 6, 5 * PAGE)
    assert sorted(everything) == list(range(6))
    kept = t.plan_shrink(slots, cold_first, [False] * 6, 5 * PAGE, keep_bytes=2 * PAGE)
    remaining = page_use(t, slots)
    for i in kept:
        for p in slot_pages(t, slots[i]):
            remaining[p] -= 1
    assert (remaining > 0).sum() >= 2 and kept  # moved what it could without going below
    assert t.plan_shrink(slots, cold_first, [False] * 6, PAGE, keep_bytes=5 * PAGE) == []
    t.close()


def test_plan_shrink_ignores_pages_holding_slots_it_was_not_told_about() -> None:
    sb = PAGE // 4
    t = tier(8, sb)
    slots = t.allocate(8)
    known = slots[:6]  # slots 6 and 7 (page 1) are allocated but not described: page 1 cannot empty
    picks = t.plan_shrink(known, [5, 4, 3, 2, 1, 0], [False] * 6, 2 * PAGE)
    assert sorted(known[i] for i in picks) == [0, 1, 2, 3]
    t.close()


def test_tier_close_releases_the_range_and_collection_does_too() -> None:
    t = tier(8, PAGE // 4)
    t.write(t.allocate(8), rows(8, PAGE // 4, 0), [])
    backend = t.backend
    assert backend.resident_bytes() == 2 * PAGE
    del t  # never closed: the finalizer gives the memory back
    import gc

    gc.collect()
    assert backend.resident_bytes() == 0 and backend.mapped.sum() == 0
    np.testing.assert_array_equal(backend.mapped, np.zeros(2, dtype=bool))
