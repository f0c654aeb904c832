"""BlockStore: round trips, prefix hits, isolation, demotion, promotion, leases and capacity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BLOCK_TOKENS, check_index_invariants, kv_for, make_store, prompt, same_bits, tiny_layout
from tierkv import BlockStore, CapacityError, Lease, Namespace, StoreConfig, TierKVError


def tiers_of(store: BlockStore, tokens: list[int]) -> list[tuple[bool, bool]]:
    """(in device, in host) for each stored block of the prefix of `tokens`."""
    keys = store.keys(tokens)
    where = store.locate(keys)
    out = []
    for key in keys:
        if not where[key]:  # the stored prefix ends here
            break
        out.append(("device" in where[key], "host" in where[key]))
    return out


def assert_get_exact(store: BlockStore, tokens: list[int], num_blocks: int, tenant: str | None = None) -> None:
    got = store.get(tokens, tenant=tenant)
    assert got.shape[0] == num_blocks
    assert same_bits(got, kv_for(store.layout, tokens, tenant or "")[:num_blocks])


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kv_factor", [1, 2])
def test_put_get_bit_exact(dtype: torch.dtype, kv_factor: int) -> None:
    layout = tiny_layout(dtype, kv_factor)
    with make_store(8, 8, layout) as store:
        tokens = prompt(0, 3, extra=2)
        kv = kv_for(layout, tokens)
        assert store.put(tokens, kv) == 3
        got = store.get(tokens)
        assert got.dtype == dtype and got.device == store.device
        assert tuple(got.shape) == (3, *layout.block_shape)
        assert same_bits(got, kv)
        assert store.match(tokens) == 3 * BLOCK_TOKENS
        check_index_invariants(store)


def test_token_forms_are_interchangeable(layout) -> None:
    with make_store(8, 8, layout) as store:
        tokens = prompt(100, 3)
        store.put(np.array(tokens, dtype=np.int32), kv_for(layout, tokens))
        for form in (tokens, np.array(tokens, dtype=np.int64), torch.tensor(tokens), torch.tensor(tokens, dtype=torch.int32)):
            assert store.match(form) == 12
            assert same_bits(store.get(form), kv_for(layout, tokens))
        assert store.put(torch.tensor(tokens), kv_for(layout, tokens)) == 0


def test_get_to_explicit_device_and_empty_result(layout) -> None:
    with make_store(8, 8, layout) as store:
        tokens = prompt(0, 2)
        store.put(tokens, kv_for(layout, tokens))
        assert same_bits(store.get(tokens, device="cpu"), kv_for(layout, tokens))
        miss = store.get(prompt(500, 2), device=torch.device("cpu"))
        assert tuple(miss.shape) == (0, *layout.block_shape) and miss.dtype == layout.dtype
        assert store.get([1, 2]).shape[0] == 0  # shorter than one block


def test_noncontiguous_kv_is_stored_bit_exact(layout) -> None:
    with make_store(8, 8, layout) as store:
        tokens = prompt(0, 3)
        kv = kv_for(layout, tokens)
        strided = kv.transpose(1, 3).contiguous().transpose(1, 3)  # same values, other strides
        assert not strided.is_contiguous()
        store.put(tokens, strided)
        assert same_bits(store.get(tokens), kv)


def test_store_does_not_alias_caller_tensors(layout) -> None:
    with make_store(8, 8, layout) as store:
        tokens = prompt(0, 2)
        kv = kv_for(layout, tokens)
        store.put(tokens, kv.clone())
        kv_in = kv.clone()
        store.put(prompt(0, 3), torch.cat([kv_in, kv_for(layout, prompt(0, 3))[2:]]))
        kv_in.view(torch.uint8).fill_(0)  # caller reuses its buffer after put
        out = store.get(tokens)
        out.view(torch.uint8).fill_(255)  # caller scribbles on what get returned
        assert same_bits(store.get(tokens), kv)


def test_put_of_zero_full_blocks_stores_nothing(layout) -> None:
    with make_store(8, 8, layout) as store:
        assert store.put([1, 2, 3], torch.empty(0, *layout.block_shape, dtype=layout.dtype)) == 0
        assert store.residency() == {}


# -- existing blocks, prefixes -----------------------------------------------------


def test_put_of_existing_blocks_is_a_no_op(layout) -> None:
    with make_store(8, 8, layout) as store:
        tokens = prompt(0, 3)
        store.put(tokens, kv_for(layout, tokens))
        before = store.stats()
        other_bytes = torch.zeros(3, *layout.block_shape, dtype=layout.dtype)
        assert store.put(tokens, other_bytes) == 0  # existing blocks are not rewritten
        after = store.stats()
        assert after["bytes_moved"] == before["bytes_moved"]
        assert after["blocks"] == before["blocks"] == 3
        assert after["puts"] == before["puts"] + 1
        assert same_bits(store.get(tokens), kv_for(layout, tokens))


def test_put_extending_a_prefix_writes_only_new_blocks(layout) -> None:
    with make_store(8, 8, layout) as store:
        long = prompt(0, 5)
        store.put(long[:8], kv_for(layout, long[:8]))
        moved = store.stats()["bytes_moved"]["put->device"]
        assert store.put(long, kv_for(layout, long)) == 3
        assert store.stats()["bytes_moved"]["put->device"] == moved + 3 * layout.block_bytes
        assert same_bits(store.get(long), kv_for(layout, long))
        check_index_invariants(store)


def test_match_equals_get_blocks_times_block_tokens(layout) -> None:
    with make_store(8, 8, layout) as store:
        base = prompt(0, 3)
        store.put(base, kv_for(layout, base))
        queries = [
            base,
            base + [7, 7, 7],
            base + prompt(900, 2),
            base[:8] + [999] * 4,  # diverges in the third block
            [999] + base[1:],  # diverges in the first block
            base[:5],
            [],
        ]
        for q in queries:
            n = store.match(q)
            assert n % BLOCK_TOKENS == 0
            assert store.get(q).shape[0] * BLOCK_TOKENS == n
        assert [store.match(q) for q in queries] == [12, 12, 12, 8, 0, 4, 0]


def test_partial_prefix_hit_returns_the_shared_blocks(layout) -> None:
    with make_store(8, 8, layout) as store:
        a = prompt(0, 3)
        store.put(a, kv_for(layout, a))
        b = a[:8] + prompt(700, 2)
        got = store.get(b)
        assert same_bits(got, kv_for(layout, a)[:2])
        assert store.put(b, kv_for(layout, b)) == 2
        assert_get_exact(store, b, 4)
        assert_get_exact(store, a, 3)


def test_match_changes_no_counters(layout) -> None:
    with make_store(8, 8, layout) as store:
        a = prompt(0, 2)
        store.put(a, kv_for(layout, a))
        before = store.stats()
        store.match(a)
        store.match(prompt(300, 3))
        assert store.stats() == before


# -- isolation -----------------------------------------------------------------------


def test_tenants_do_not_share_blocks(layout) -> None:
    with make_store(8, 8, layout) as store:
        tokens = prompt(0, 2)
        store.put(tokens, kv_for(layout, tokens, "alice"), tenant="alice")
        assert store.match(tokens, tenant="alice") == 8
        assert store.match(tokens) == 0
        assert store.match(tokens, tenant="bob") == 0
        assert store.get(tokens, tenant="bob").shape[0] == 0
        assert store.put(tokens, kv_for(layout, tokens, "bob"), tenant="bob") == 2
        assert_get_exact(store, tokens, 2, tenant="alice")
        assert_get_exact(store, tokens, 2, tenant="bob")


def test_namespace_tenant_is_the_default_tenant(layout) -> None:
    with make_store(8, 8, layout, Namespace(model="tiny-test", tenant="alice")) as store:
        tokens = prompt(0, 2)
        store.put(tokens, kv_for(layout, tokens))
        assert store.match(tokens, tenant="alice") == 8
        assert store.match(tokens, tenant="") == 0


def test_tenant_must_be_a_string(layout) -> None:
    with make_store(8, 8, layout) as store:
        with pytest.raises(TypeError, match="tenant must be a string"):
            store.match(prompt(0, 1), tenant=5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "other",
    [
        Namespace(model="other-model"),
        Namespace(model="tiny-test", weights_fingerprint="v2"),
        Namespace(model="tiny-test", tp_rank=1, tp_size=2),
        Namespace(model="tiny-test", adapter="lora"),
    ],
)
def test_two_namespaces_never_share_a_key(layout, other: Namespace) -> None:
    tokens = prompt(0, 3)
    with make_store(8, 8, layout) as a, make_store(8, 8, layout, other) as b:
        a.put(tokens, kv_for(layout, tokens))
        b.put(tokens, kv_for(layout, tokens))
        assert not set(a.residency()) & set(b.residency())


# -- demotion, dropping, promotion ---------------------------------------------------


def test_full_device_demotes_lru_leaves_to_host(layout) -> None:
    bb = layout.block_bytes
    with make_store(2, 8, layout) as store:
        a, b = prompt(0, 2), prompt(100, 2)
        store.put(a, kv_for(layout, a))
        store.put(b, kv_for(layout, b))
        assert tiers_of(store, a) == [(False, True), (False, True)]
        assert tiers_of(store, b) == [(True, False), (True, False)]
        s = store.stats()
        assert s["tiers"]["device"]["evictions"] == 2
        assert s["bytes_moved"]["device->host"] == 2 * bb
        assert s["tiers"]["device"]["used_slots"] == 2 and s["tiers"]["host"]["used_slots"] == 2
        assert s["dropped"] == 0
        check_index_invariants(store)
        assert store.match(a) == 8
        assert_get_exact(store, a, 2)


def test_get_promotes_host_blocks_to_device(layout) -> None:
    bb = layout.block_bytes
    with make_store(2, 8, layout) as store:
        a, b = prompt(0, 2), prompt(100, 2)
        store.put(a, kv_for(layout, a))
        store.put(b, kv_for(layout, b))
        before = store.stats()
        assert_get_exact(store, a, 2)
        after = store.stats()
        assert tiers_of(store, a) == [(True, True), (True, True)]  # host copy stays valid
        assert tiers_of(store, b) == [(False, True), (False, True)]
        assert after["bytes_moved"]["host->device"] == 2 * bb
        assert after["tiers"]["host"]["hits"] == before["tiers"]["host"]["hits"] + 2
        assert after["tiers"]["device"]["misses"] == before["tiers"]["device"]["misses"] + 2
        # Demoting the promoted blocks again is free: their host copy is still there.
        moved = after["bytes_moved"]["device->host"]
        assert_get_exact(store, b, 2)
        assert store.stats()["bytes_moved"]["device->host"] == moved
        check_index_invariants(store)


def test_prompt_longer_than_device_tier_reads_across_tiers(layout) -> None:
    with make_store(2, 8, layout) as store:
        long = prompt(0, 5)
        assert store.put(long, kv_for(layout, long)) == 5
        assert tiers_of(store, long) == [(False, True)] * 3 + [(True, False)] * 2  # tail in the fast tier
        assert_get_exact(store, long, 5)
        check_index_invariants(store)


def test_full_host_drops_lru_leaves_never_a_parent(layout) -> None:
    with make_store(0, 4, layout) as store:
        a, b = prompt(0, 3), prompt(100, 2)
        store.put(a, kv_for(layout, a))
        store.put(b, kv_for(layout, b))
        assert store.match(a) == 8  # only a's last block was dropped
        assert store.match(b) == 8
        assert store.stats()["dropped"] == 1
        check_index_invariants(store)
        c = prompt(200, 3)
        store.put(c, kv_for(layout, c))
        assert store.match(a) == 0 and store.match(b) == 4 and store.match(c) == 12
        check_index_invariants(store)
        assert_get_exact(store, b, 1)
        assert_get_exact(store, c, 3)


def test_recently_used_prompt_survives_pressure(layout) -> None:
    with make_store(0, 4, layout) as store:
        x, y, z = prompt(0, 2), prompt(100, 2), prompt(200, 2)
        store.put(x, kv_for(layout, x))
        store.put(y, kv_for(layout, y))
        store.get(x)  # x is now more recent than y
        store.put(z, kv_for(layout, z))
        assert (store.match(x), store.match(y), store.match(z)) == (8, 0, 8)


def test_shared_prefix_is_not_cut_while_a_branch_lives(layout) -> None:
    with make_store(0, 4, layout) as store:
        trunk = prompt(0, 2)
        left, right = trunk + prompt(100, 1), trunk + prompt(200, 1)
        store.put(left, kv_for(layout, left))
        store.put(right, kv_for(layout, right))
        other = prompt(300, 2)
        store.put(other, kv_for(layout, other))  # two evictions: both branch tips, never the trunk
        assert store.match(trunk) == 8
        assert store.match(left) == 8 and store.match(right) == 8
        check_index_invariants(store)


# -- leases --------------------------------------------------------------------------


def test_leased_blocks_survive_pressure(layout) -> None:
    with make_store(2, 2, layout) as store:
        a = prompt(0, 2)
        store.put(a, kv_for(layout, a))
        with store.lease(a) as lease:
            assert isinstance(lease, Lease) and lease.active
            assert (lease.num_blocks, lease.num_tokens) == (2, 8)
            for first in (100, 200, 300):
                p = prompt(first, 2)
                store.put(p, kv_for(layout, p))
                assert tiers_of(store, a) == [(True, False), (True, False)]
            check_index_invariants(store)
        assert not lease.active
        p = prompt(400, 2)
        store.put(p, kv_for(layout, p))
        assert tiers_of(store, a) == [(False, True), (False, True)]
        assert_get_exact(store, a, 2)


def test_lease_is_released_on_exception(layout) -> None:
    with make_store(4, 4, layout) as store:
        a = prompt(0, 2)
        store.put(a, kv_for(layout, a))
        with pytest.raises(RuntimeError, match="boom"):
            with store.lease(a) as lease:
                raise RuntimeError("boom")
        assert not lease.active
        assert all(b.leases == 0 for b in store.index.blocks.values())
        lease.release()  # idempotent


def test_lease_of_unstored_prefix_holds_nothing(layout) -> None:
    with make_store(4, 4, layout) as store:
        with store.lease(prompt(0, 3)) as lease:
            assert lease.num_blocks == 0


def test_release_owner_releases_all_leases_of_that_owner(layout) -> None:
    with make_store(2, 2, layout) as store:
        a, b = prompt(0, 1), prompt(100, 1)
        store.put(a, kv_for(layout, a))
        store.put(b, kv_for(layout, b))
        l1 = store.lease(a, owner="req-1")
        l2 = store.lease(b, owner="req-1")
        l3 = store.lease(a, owner="req-2")
        assert store.stats()["leased_owners"] == 2
        assert store.release_owner("req-1") == 2
        assert not l1.active and not l2.active and l3.active
        assert store.release_owner("req-1") == 0
        assert store.stats()["leased_owners"] == 1
        l3.release()
        assert store.stats()["leased_owners"] == 0
        assert all(blk.leases == 0 for blk in store.index.blocks.values())


def test_put_raises_capacity_error_when_everything_is_leased(layout) -> None:
    with make_store(2, 2, layout) as store:
        a, b = prompt(0, 2), prompt(100, 2)
        store.put(a, kv_for(layout, a))
        store.put(b, kv_for(layout, b))
        leases = [store.lease(a), store.lease(b)]
        before = store.stats()
        c = prompt(200, 1)
        with pytest.raises(CapacityError, match=r"cannot store 1 new blocks.*device 2, host 2.*leased"):
            store.put(c, kv_for(layout, c))
        after = store.stats()
        assert after.pop("puts") == before.pop("puts") + 1  # the attempt is counted, nothing else
        assert after == before
        assert len(store.residency()) == 4 and store.match(c) == 0
        check_index_invariants(store)
        assert_get_exact(store, a, 2)
        assert_get_exact(store, b, 2)
        for lease in leases:
            lease.release()
        store.put(c, kv_for(layout, c))
        assert store.match(c) == 4


def test_put_bigger_than_total_capacity_stores_nothing(layout) -> None:
    with make_store(2, 4, layout) as store:
        big = prompt(0, 7)
        with pytest.raises(CapacityError, match="cannot store 7 new blocks"):
            store.put(big, kv_for(layout, big))
        assert store.match(big) == 0 and store.residency() == {}
        check_index_invariants(store)
        assert store.put(big[:24], kv_for(layout, big[:24])) == 6  # exactly fits


def test_oversized_put_leaves_old_data_in_place(layout) -> None:
    """A put that cannot fit must be refused before it evicts anything (CapacityError's promise)."""
    with make_store(2, 4, layout) as store:
        old = prompt(0, 3)
        store.put(old, kv_for(layout, old))
        before = store.stats()
        big = prompt(100, 7)
        with pytest.raises(CapacityError):
            store.put(big, kv_for(layout, big))
        assert store.match(old) == 12
        after = store.stats()
        after.pop("puts"), before.pop("puts")
        assert after == before
        assert_get_exact(store, old, 3)


def test_put_larger_than_unleased_room_evicts_nothing(layout) -> None:
    with make_store(2, 4, layout) as store:
        a, b = prompt(0, 3), prompt(100, 2)
        store.put(a, kv_for(layout, a))
        store.put(b, kv_for(layout, b))
        with store.lease(a):
            before = store.stats()
            c = prompt(200, 4)  # 6 slots, 3 of them leased: 4 new blocks can never fit
            with pytest.raises(CapacityError, match="cannot store 4 new blocks"):
                store.put(c, kv_for(layout, c))
            after = store.stats()
            after.pop("puts"), before.pop("puts")
            assert after == before
            assert store.match(b) == 8
            d = prompt(300, 3)  # exactly the unleased room: b is evicted to make it
            assert store.put(d, kv_for(layout, d)) == 3
            assert store.match(a) == 12 and store.match(b) == 0 and store.match(d) == 12
            check_index_invariants(store)
        assert_get_exact(store, a, 3)
        assert_get_exact(store, d, 3)


def test_put_fits_whenever_unleased_slots_suffice(layout) -> None:
    """Device 3 + host 5 slots, 3 leased: a 5-block put must fit, whatever the tiers hold."""

    def path(*choices: int) -> list[int]:
        return [t for j, c in enumerate(choices) for t in (c, c, c, j)]

    with make_store(3, 5, layout) as store:
        p, q = path(2, 1, 2), path(2, 0, 0, 0)
        store.put(p, kv_for(layout, p))
        store.put(q[:8], kv_for(layout, q[:8], "other"), tenant="other")
        store.put(q, kv_for(layout, q, "other"), tenant="other")  # q's chain now spans both tiers
        with store.lease(p):
            r = path(0, 0, 0, 0, 0)
            assert store.put(r, kv_for(layout, r)) == 5
            check_index_invariants(store)
            assert_get_exact(store, p, 3)
            assert_get_exact(store, r, 5)


def test_collision_in_store_index_is_a_miss(layout) -> None:
    with make_store(4, 4, layout) as store:
        a = prompt(0, 2)
        store.put(a, kv_for(layout, a))
        second = store.index.blocks[store.keys(a)[1]]  # the index entry itself: its ident is forged
        second.ident = second.ident[:-1] + bytes([second.ident[-1] ^ 1])  # other tokens, same key
        assert store.match(a) == 4
        assert_get_exact(store, a, 1)


def test_put_over_a_collision_neither_crashes_nor_leaks(layout) -> None:
    """Re-putting tokens whose key is taken by other tokens stores up to the collision, no further."""
    with make_store(4, 4, layout) as store:
        a = prompt(0, 2)
        store.put(a, kv_for(layout, a))
        second = store.index.blocks[store.keys(a)[1]]  # the index entry itself: its ident is forged
        second.ident = second.ident[:-1] + bytes([second.ident[-1] ^ 1])
        assert store.put(a, kv_for(layout, a)) == 0
        check_index_invariants(store)
        assert len(store.residency()) == 2
        assert_get_exact(store, a, 1)


# -- lifecycle -----------------------------------------------------------------------


def test_closed_store_refuses_every_operation(layout) -> None:
    store = make_store(4, 4, layout)
    tokens = prompt(0, 1)
    store.put(tokens, kv_for(layout, tokens))
    store.close()
    store.close()  # idempotent
    for call in (
        lambda: store.put(tokens, kv_for(layout, tokens)),
        lambda: store.get(tokens),
        lambda: store.match(tokens),
        lambda: store.lease(tokens),
    ):
        with pytest.raises(TierKVError, match="closed"):
            call()


def test_context_manager_closes(layout) -> None:
    with make_store(4, 4, layout) as store:
        assert isinstance(store, BlockStore)
    with pytest.raises(TierKVError, match="closed"):
        store.match(prompt(0, 1))


def test_default_config_and_device(layout, namespace) -> None:
    with BlockStore(layout, namespace, StoreConfig(device_bytes=4096, host_bytes=4096)) as store:
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert store.device.type == expected
        assert [t.name for t in store.tiers[:2]] == ["device", "host"]
        assert store.tiers[0].num_slots == 4096 // layout.block_bytes


# -- put from a known prefix -------------------------------------------------------


def test_put_with_first_block_stores_only_the_tail(layout) -> None:
    with make_store(8, 8, layout) as store:
        tokens = prompt(0, 5)
        kv = kv_for(layout, tokens)
        store.put(tokens[:8], kv[:2])
        assert store.put(tokens, kv[2:], first_block=2) == 3
        assert same_bits(store.get(tokens), kv)
        assert store.put(tokens, kv[4:], first_block=4) == 0  # all there already


def test_put_with_first_block_over_a_gap_stores_nothing(layout) -> None:
    with make_store(8, 8, layout) as store:
        tokens = prompt(0, 5)
        kv = kv_for(layout, tokens)
        store.put(tokens[:4], kv[:1])
        assert store.put(tokens, kv[3:], first_block=3) == 0
        assert store.match(tokens) == 4


def test_put_with_bad_first_block_names_it(layout) -> None:
    with make_store(8, 8, layout) as store:
        tokens = prompt(0, 2)
        kv = kv_for(layout, tokens)
        with pytest.raises(ValueError, match="first_block"):
            store.put(tokens, kv, first_block=3)
        with pytest.raises(ValueError, match="from block 1 on"):
            store.put(tokens, kv, first_block=1)


# -- verification switch ------------------------------------------------------------


@pytest.mark.parametrize("verify", [True, False])
def test_verify_reads_switch_reaches_the_host_tier(verify: bool) -> None:
    """On (the default) a host byte flipped behind the store's back is caught and never served;
    `verify_reads=False` neither hashes nor checks: the flipped block is served as it lies."""
    layout = tiny_layout()
    config = StoreConfig(device_bytes=0, host_bytes=8 * layout.block_bytes, device="cpu", verify_reads=verify)
    with BlockStore(layout, Namespace(model="tiny-test"), config) as store:
        tokens = prompt(0, 4)
        store.put(tokens, kv_for(layout, tokens))
        key = store.keys(tokens)[2]
        assert (store.index.blocks[key].checksum is not None) == verify
        host = store.tiers[store.tier_names.index("host")]
        host.storage[store.locate([key])[key]["host"], 5] ^= 0x10
        got = store.get(tokens)
        assert got.shape[0] == (2 if verify else 4)
        assert same_bits(got[:2], kv_for(layout, tokens)[:2])
        assert store.stats()["tiers"]["host"]["corrupt"] == int(verify)
