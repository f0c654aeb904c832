"""Index: prefix-aware leaf rules, LRU order, leases and bounded heaps, without a store."""

from __future__ import annotations

import pytest

from tierkv.index import ABSENT, PENDING, Block, Index

DEVICE, HOST = 0, 1


def key(n: int) -> bytes:
    return n.to_bytes(16, "little")


def add(index: Index, n: int, parent: int | None, tier: int, slot: int, tick: int | None = None):
    p = index.blocks[key(parent)] if parent is not None else None
    ident = (p.key if p else bytes(16)) + n.to_bytes(4, "little")
    return index.add(key(n), ident, p, tier, slot, index.tick() if tick is None else tick)


def drain(index: Index, tier: int) -> list[int]:
    """Pop every victim of `tier`, removing each from the tier as a store would."""
    order = []
    while (b := index.pop_victim(tier)) is not None:
        order.append(int.from_bytes(b.key, "little"))
        index.clear_slot(b, tier)
    return order


def test_add_records_slot_and_counts() -> None:
    index = Index(2)
    a = add(index, 1, None, HOST, 7)
    assert a.slots == [ABSENT, 7] and a.fastest == HOST
    assert index.resident_count(HOST) == 1 and index.resident_count(DEVICE) == 0
    assert len(index) == 1
    with pytest.raises(KeyError, match="already indexed"):
        add(index, 1, None, DEVICE, 0)


def test_child_in_faster_tier_protects_parent_in_slower_tier() -> None:
    index = Index(2)
    add(index, 1, None, HOST, 0)
    add(index, 2, 1, DEVICE, 0)
    parent = index.blocks[key(1)]
    assert parent.child_fast == [1, 0]
    assert not parent.is_leaf(HOST) and not parent.is_leaf(DEVICE)
    assert index.pop_victim(HOST) is None  # the parent is not a leaf of host
    victim = index.pop_victim(DEVICE)
    assert victim is index.blocks[key(2)]
    index.clear_slot(victim, DEVICE)  # child dropped: parent becomes a host leaf
    assert key(2) not in index.blocks
    assert parent.child_fast == [0, 0]
    assert index.pop_victim(HOST) is parent


def test_child_in_slower_tier_does_not_protect_parent_in_faster_tier() -> None:
    index = Index(2)
    add(index, 1, None, HOST, 0)
    add(index, 2, 1, HOST, 1)
    parent = index.blocks[key(1)]
    index.set_slot(parent, DEVICE, 0)  # promoted: lives in device and host
    assert parent.child_fast == [0, 1]
    assert parent.is_leaf(DEVICE) and not parent.is_leaf(HOST)
    assert index.pop_victim(DEVICE) is parent
    index.clear_slot(parent, DEVICE)
    # In host only the child is a leaf; the parent follows once the child is gone.
    assert drain(index, HOST) == [2, 1]


def test_chain_leaves_evicted_tail_first() -> None:
    index = Index(2)
    add(index, 1, None, DEVICE, 0, tick=1)
    add(index, 2, 1, DEVICE, 1, tick=1)
    add(index, 3, 2, DEVICE, 2, tick=1)
    assert drain(index, DEVICE) == [3, 2, 1]
    assert len(index) == 0


def test_lru_order_among_leaves() -> None:
    index = Index(2)
    for n in (1, 2, 3, 4):
        add(index, n, None, DEVICE, n)
    assert drain(index, DEVICE) == [1, 2, 3, 4]


def test_touched_blocks_go_to_the_back() -> None:
    index = Index(2)
    for n in (1, 2, 3, 4):
        add(index, n, None, DEVICE, n)
    index.touch([index.blocks[key(1)], index.blocks[key(3)]])  # stale heap stamps now
    index.touch([index.blocks[key(2)]])
    assert drain(index, DEVICE) == [4, 1, 3, 2]


def test_leased_blocks_are_never_popped_and_requeued_on_release() -> None:
    index = Index(2)
    for n in (1, 2, 3):
        add(index, n, None, DEVICE, n)
    leased = [index.blocks[key(1)], index.blocks[key(2)]]
    index.acquire(leased)
    index.acquire(leased[:1])  # two leases on block 1
    assert drain(index, DEVICE) == [3]
    assert index.pop_victim(DEVICE) is None
    index.release(leased)
    assert drain(index, DEVICE) == [2]  # block 1 still holds one lease
    index.release(leased[:1])
    assert drain(index, DEVICE) == [1]


def test_release_more_than_acquired_is_an_error() -> None:
    index = Index(2)
    b = add(index, 1, None, DEVICE, 0)
    with pytest.raises(AssertionError, match="released more often than taken"):
        index.release([b])


def test_a_popped_victim_that_stays_gets_its_place_back() -> None:
    """A victim that could not move out stays (the store sets its slot back): it is a candidate again."""
    index = Index(2)
    add(index, 1, None, DEVICE, 0)
    victim = index.pop_victim(DEVICE)
    assert victim is not None and index.pop_victim(DEVICE) is None
    index.set_slot(victim, DEVICE, victim.slots[DEVICE])
    assert index.pop_victim(DEVICE) is victim


def test_pending_slot_counts_as_resident_but_is_never_a_victim() -> None:
    index = Index(2)
    add(index, 1, None, DEVICE, 0)
    child = add(index, 2, 1, DEVICE, 1)
    parent = index.blocks[key(1)]
    index.set_slot(child, HOST, PENDING)  # on its way down
    index.clear_slot(child, DEVICE)
    assert child.fastest == HOST and parent.child_fast == [0, 1]
    assert index.resident_count(HOST) == 1
    assert index.pop_victim(HOST) is None  # child pending, parent not a host resident
    assert index.pop_victim(DEVICE) is parent  # parent is a device leaf now
    index.set_slot(child, HOST, 5)
    assert index.pop_victim(HOST) is child


def test_clear_slot_refuses_to_strand_children() -> None:
    index = Index(2)
    add(index, 1, None, HOST, 0)
    add(index, 2, 1, DEVICE, 0)
    with pytest.raises(AssertionError, match="strand"):
        index.clear_slot(index.blocks[key(1)], HOST)


def test_clear_slot_of_absent_copy_is_an_error() -> None:
    index = Index(2)
    b = add(index, 1, None, HOST, 0)
    with pytest.raises(KeyError, match="not resident in tier 0"):
        index.clear_slot(b, DEVICE)


def test_clear_slot_keeps_block_with_another_copy() -> None:
    index = Index(2)
    b = add(index, 1, None, HOST, 3)
    index.set_slot(b, DEVICE, 4)
    assert index.clear_slot(b, HOST) == 3
    assert key(1) in index.blocks and b.slots == [4, ABSENT]
    assert index.clear_slot(b, DEVICE) == 4
    assert key(1) not in index.blocks
    assert index.resident_count(DEVICE) == index.resident_count(HOST) == 0


def test_heap_stays_bounded_under_churn() -> None:
    """Blocks that leave without being popped leave dead heap entries; compaction must bound them."""
    index = Index(2)
    live: list[int] = []
    bound = 0
    for n in range(20_000):
        add(index, n, None, DEVICE, n % 64)
        live.append(n)
        if len(live) > 8:
            gone = live.pop(0)
            index.clear_slot(index.blocks[key(gone)], DEVICE)  # removed directly, not popped
        if n % 7 == 0:
            index.touch([index.blocks[key(live[0])]])
        bound = max(bound, len(index._heaps[DEVICE]))
    assert index.resident_count(DEVICE) == 8
    assert bound <= 2 * 9 + 64 + 1  # at most 9 resident at a push, plus the entry that triggers compaction
    assert sorted(drain(index, DEVICE)) == live


def test_heap_has_one_entry_per_block_despite_repeated_pushes() -> None:
    index = Index(2)
    add(index, 1, None, DEVICE, 0)
    b = index.blocks[key(1)]
    for _ in range(100):
        index.touch([b])
        index.acquire([b])
        index.release([b])  # pushes on release: already queued, so no second entry
        index.set_slot(b, DEVICE, 0)  # pushes on a slot change: likewise
    assert len(index._heaps[DEVICE]) == 1
    assert index.pop_victim(DEVICE) is b and index.pop_victim(DEVICE) is None


def test_a_chain_added_at_once_is_indexed_as_block_by_block() -> None:
    """`add_chain` (a put's path) against blocks made one by one and given their slot with `set_slot`
    (the general path every later move takes): counts, leaf rules, eviction order, journal, changes."""
    tiers, slots = [HOST, HOST, DEVICE, DEVICE, DEVICE], [3, 4, 0, 1, 2]  # the head in the slower tier, as placed
    one_by_one, at_once = Index(2, journaled=[HOST]), Index(2, journaled=[HOST])
    for index in (one_by_one, at_once):
        index.watch_changes()
        add(index, 1, None, HOST, 0, tick=1)
        add(index, 2, 1, HOST, 1, tick=1)
    for n, (tier, slot) in enumerate(zip(tiers, slots), start=3):
        p = one_by_one.blocks[key(n - 1)]
        b = Block(key(n), p.key + n.to_bytes(4, "little"), p, 2)
        b.last_use = 2
        one_by_one.blocks[b.key] = b
        one_by_one.set_slot(b, tier, slot)
    parent = at_once.blocks[key(2)]
    links, p = [], parent.key
    for n in range(3, 8):
        links.append((key(n), p + n.to_bytes(4, "little")))
        p = key(n)
    at_once.add_chain(links, parent, tiers, slots, tick=2)
    for index in (one_by_one, at_once):
        for t in (DEVICE, HOST):
            assert index.resident_count(t) == tiers.count(t) + (2 if t == HOST else 0)
    for k, b in one_by_one.blocks.items():
        c = at_once.blocks[k]
        assert (c.slots, c.child_fast, c.last_use, c.ident) == (b.slots, b.child_fast, b.last_use, b.ident)
    assert one_by_one.journal(HOST).keys() == at_once.journal(HOST).keys()
    assert one_by_one.changes == at_once.changes
    assert drain(one_by_one, DEVICE) == drain(at_once, DEVICE) == [7, 6, 5]
    assert drain(one_by_one, HOST) == drain(at_once, HOST) == [4, 3, 2, 1]


def test_a_chain_naming_an_indexed_block_changes_nothing() -> None:
    index = Index(2)
    add(index, 1, None, HOST, 0)
    parent = index.blocks[key(1)]
    links = [(key(2), parent.key + b"\x02"), (key(1), key(2) + b"\x01")]  # the second is indexed already
    with pytest.raises(KeyError, match="already indexed"):
        index.add_chain(links, parent, [HOST, HOST], [1, 2], tick=index.tick())
    with pytest.raises(KeyError, match="named twice"):
        index.add_chain([links[0], links[0]], parent, [HOST, HOST], [1, 2], tick=index.tick())
    assert list(index.blocks) == [key(1)] and index.resident_count(HOST) == 1
    assert parent.child_fast == [0, 0] and drain(index, HOST) == [1]
