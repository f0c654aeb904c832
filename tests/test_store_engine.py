"""The store's public views and its engine front door, on the CPU.

Views: `keys` (the chain keys of the store's seed), `residency` / `residency_changes` (the fastest
tier of each key, None for a key not stored), `locate` (every copy and its slot), `get(first_block=)`.
Engine: `save_from` / `load_into` between a CPU `EngineKV` and the tiers (device, host, disk), with
the expected bytes read off the engine tensors letter by letter (`gpu/cases.py`), not by the copy
paths under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import BLOCK_TOKENS, check_index_invariants, kv_for, make_store, prompt, same_bits, tiny_layout
from gpu.cases import Case, bind, element_ref, expected_blocks, natural_tensors

from tierkv import (
    BlockStore,
    CapacityError,
    DimOrder,
    EngineKV,
    EngineKVLayout,
    Namespace,
    StoreConfig,
    chain_keys,
)

LAYOUT = tiny_layout()  # 2 layers, K and V, 2 heads of 4 channels, bf16, blocks of 4 tokens: 256 bytes
BB = LAYOUT.block_bytes
POISON = 0xA5
NO_SLOTS = torch.empty(0, 1, dtype=torch.int64)  # the oracle reads `Case.token_slots`, never the kernels' slots


def tier(store: BlockStore, name: str):
    return store.tiers[store.tier_names.index(name)]


def corrupt_slot(store: BlockStore, key: bytes, name: str) -> None:
    """Flip one bit of the block `key` where it lies in the memory tier `name` (its checksum stays)."""
    t = tier(store, name)
    slot = store.locate([key])[key][name]
    row = t.read([slot])
    row[0, 7] ^= 0x40
    t.write([slot], row, [])  # raw bytes: the block keeps the checksum of what was stored


# -- keys ---------------------------------------------------------------------------------------


def test_keys_are_the_chain_keys_of_the_stores_seed() -> None:
    with make_store(8, 8, LAYOUT, Namespace(model="tiny-test", tenant="ns-tenant")) as store:
        tokens = prompt(0, 3, extra=2)  # the trailing partial block has no key
        for tenant in (None, "", "alice"):
            keys = store.keys(tokens, tenant=tenant)
            assert keys == chain_keys(store.chain.seed(tenant), tokens, BLOCK_TOKENS) == store.chain.keys(tokens, tenant)
            assert len(keys) == 3 and len(set(keys)) == 3
        assert store.keys(tokens) == store.keys(tokens, tenant="ns-tenant")  # None: the namespace's tenant
        assert store.keys(tokens, tenant="alice") != store.keys(tokens)
        assert store.keys(tokens[:8]) == store.keys(tokens)[:2]  # a key names its whole prefix
        assert store.keys(torch.tensor(tokens)) == store.keys(tokens)
        assert store.keys([1, 2]) == []
        store.put(tokens, kv_for(LAYOUT, tokens), tenant="alice")
        assert set(store.residency()) == set(store.keys(tokens, tenant="alice"))


# -- residency and locate -----------------------------------------------------------------------


def test_residency_names_the_fastest_tier_and_none_for_keys_not_stored() -> None:
    with make_store(2, 8, LAYOUT) as store:
        assert store.tier_names == ("device", "host") and store.residency() == {}
        a, b = prompt(0, 2), prompt(100, 2)
        store.put(a, kv_for(LAYOUT, a))
        store.put(b, kv_for(LAYOUT, b))  # a is demoted to host
        ka, kb = store.keys(a), store.keys(b)
        unknown = store.keys(prompt(900, 1))[0]
        assert store.residency(ka + kb + [unknown]) == {ka[0]: "host", ka[1]: "host", kb[0]: "device", kb[1]: "device",
                                                        unknown: None}
        assert store.residency() == {k: ("host" if k in ka else "device") for k in ka + kb}
        store.get(a)  # promoted: its host copy stays, the device is now its fastest tier
        assert store.residency(ka) == {k: "device" for k in ka}
        assert store.residency(kb) == {k: "host" for k in kb}
        assert store.residency([]) == {}


def test_residency_changes_are_first_everything_then_only_what_changed() -> None:
    with make_store(2, 2, LAYOUT) as store:
        a, b, c = prompt(0, 2), prompt(100, 2), prompt(200, 2)
        ka, kb, kc = store.keys(a), store.keys(b), store.keys(c)
        store.put(a, kv_for(LAYOUT, a))
        assert store.residency_changes() == {k: "device" for k in ka}  # the first call: every stored block
        assert store.residency_changes() == {}
        store.match(a)
        store.get(a)  # served from where it is: nothing moves
        assert store.residency_changes() == {}
        store.put(b, kv_for(LAYOUT, b))  # a demoted to host
        assert store.residency_changes() == {**{k: "host" for k in ka}, **{k: "device" for k in kb}}
        store.put(c, kv_for(LAYOUT, c))  # b demoted, a dropped from the last tier
        assert store.residency_changes() == {**{k: None for k in ka}, **{k: "host" for k in kb}, **{k: "device" for k in kc}}
        assert store.residency_changes() == {}
        assert store.residency() == {**{k: "host" for k in kb}, **{k: "device" for k in kc}}


def test_residency_changes_start_with_what_is_stored_when_first_asked() -> None:
    with make_store(2, 2, LAYOUT) as store:
        a, b = prompt(0, 2), prompt(100, 2)
        store.put(a, kv_for(LAYOUT, a))
        store.put(b, kv_for(LAYOUT, b))
        assert store.residency_changes() == store.residency()  # moves before the first call are not replayed
        assert store.residency_changes() == {}


def test_locate_gives_every_copy_and_the_bytes_lie_in_its_slot() -> None:
    with make_store(2, 8, LAYOUT) as store:
        a, b = prompt(0, 2), prompt(100, 2)
        store.put(a, kv_for(LAYOUT, a))
        store.put(b, kv_for(LAYOUT, b))
        store.get(a)  # a on device and host; b demoted to host
        ka, kb = store.keys(a), store.keys(b)
        unknown = store.keys(prompt(900, 1))[0]
        where = store.locate(ka + kb + [unknown])
        assert [sorted(where[k]) for k in ka] == [["device", "host"]] * 2
        assert [sorted(where[k]) for k in kb] == [["host"]] * 2
        assert where[unknown] == {}
        for tokens, keys in ((a, ka), (b, kb)):
            kv = kv_for(LAYOUT, tokens).view(torch.uint8).reshape(2, BB)
            for i, key in enumerate(keys):
                for name, slot in where[key].items():
                    assert torch.equal(tier(store, name).read([slot])[0], kv[i]), f"block {i} is not in {name} slot {slot}"
        assert store.locate([]) == {}


# -- get(first_block=) ------------------------------------------------------------------------


def test_get_from_first_block_returns_exactly_the_rest_and_reads_none_before() -> None:
    with make_store(0, 8, LAYOUT) as store:  # every block on host: each read is verified and counted
        tokens = prompt(0, 5, extra=1)
        kv = kv_for(LAYOUT, tokens)
        store.put(tokens, kv)
        for first in range(6):
            moved = store.stats()["bytes_moved"].get("host->get", 0)
            got = store.get(tokens, first_block=first)
            assert tuple(got.shape) == (5 - first, *LAYOUT.block_shape) and got.dtype == LAYOUT.dtype
            assert same_bits(got, kv[first:])
            assert store.stats()["bytes_moved"].get("host->get", 0) - moved == (5 - first) * BB
        # A bad copy of block 0 is not seen by reads that start after it...
        corrupt_slot(store, store.keys(tokens)[0], "host")
        assert same_bits(store.get(tokens, first_block=1), kv[1:])
        assert store.stats()["tiers"]["host"]["corrupt"] == 0
        # ...and caught by the first read that includes it, which then serves nothing.
        assert store.get(tokens).shape[0] == 0
        assert store.stats()["tiers"]["host"]["corrupt"] == 1 and store.match(tokens) == 0
        check_index_invariants(store)


def test_get_from_first_block_past_the_stored_prefix_is_empty_and_out_of_range_is_refused() -> None:
    with make_store(8, 8, LAYOUT) as store:
        tokens = prompt(0, 5)
        store.put(tokens[:8], kv_for(LAYOUT, tokens[:8]))
        assert tuple(store.get(tokens, first_block=3).shape) == (0, *LAYOUT.block_shape)
        assert same_bits(store.get(tokens, first_block=1), kv_for(LAYOUT, tokens)[1:2])
        for bad in (6, -1, 1.0, True):
            with pytest.raises(ValueError, match="first_block must be an int from 0 to 5"):
                store.get(tokens, first_block=bad)


# -- engine front door --------------------------------------------------------------------------


class Engine:
    """A CPU engine of one order: its tensors (random bytes, or poison), bound as an `EngineKV`."""

    def __init__(self, order: DimOrder, block_size: int, num_blocks: int, seed: int | None) -> None:
        self.layout = EngineKVLayout(order, num_layers=LAYOUT.num_layers, num_blocks=num_blocks, block_size=block_size,
                                     num_kv_heads=LAYOUT.num_kv_heads, head_dim=LAYOUT.head_dim, dtype=LAYOUT.dtype)
        self.raw = natural_tensors(self.layout, "cpu", fill="zeros")
        gen = torch.Generator().manual_seed(seed or 0)
        for t in self.raw:  # raw bytes, NaN payloads included: bit-exact means bits
            b = t.view(torch.uint8)
            b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen) if seed is not None else
                    torch.full(b.shape, POISON, dtype=torch.uint8))
        self.kv: EngineKV = bind(self.layout, self.raw)

    def token_slot(self, table: list[int], position: int) -> int:
        e = self.layout.block_size
        return table[position // e] * e + position % e

    def blocks(self, table: list[int], first: int, stop: int) -> torch.Tensor:
        """Store blocks `first..stop-1` of the sequence `table` names, read letter by letter."""
        positions = list(range(first, stop))
        token_slots = [[self.token_slot(table, p * BLOCK_TOKENS + t) for t in range(BLOCK_TOKENS)] for p in positions]
        return expected_blocks(Case(self.layout, LAYOUT, self.raw, self.kv, NO_SLOTS, token_slots))

    def poison_except(self, table: list[int], first: int, stop: int) -> bool:
        """Whether every byte outside the tokens of blocks `first..stop-1` still holds the poison."""
        saved = [t.clone() for t in self.raw]
        case = Case(self.layout, LAYOUT, self.raw, self.kv, NO_SLOTS, [])
        for p in range(first, stop):
            for t in range(BLOCK_TOKENS):
                slot = self.token_slot(table, p * BLOCK_TOKENS + t)
                for layer in range(LAYOUT.num_layers):
                    for s in range(LAYOUT.kv_factor):
                        for h in range(LAYOUT.num_kv_heads):
                            channels = element_ref(case, layer, s, slot // self.layout.block_size, h,
                                                   slot % self.layout.block_size)
                            channels.view(torch.uint8).fill_(POISON)  # a view into the engine tensor
        clean = all(bool(t.view(torch.uint8).eq(POISON).all()) for t in self.raw)
        for t, s in zip(self.raw, saved):
            t.copy_(s)
        return clean


def table_for(num_blocks: int, used: int, seed: int) -> list[int]:
    """`used` distinct engine blocks out of `num_blocks`, in a shuffled order."""
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))[:used].tolist()


def engine_store(tmp_path: Path | None, device: int = 0, host: int = 4, disk: int = 64) -> BlockStore:
    """A CPU store of `device` and `host` blocks, and a disk tier of `disk` slots under `tmp_path` if given."""
    kw: dict[str, object] = {}
    if tmp_path is not None:
        kw = {"disk_path": str(tmp_path), "disk_bytes": disk * 4096}
    config = StoreConfig(device="cpu", device_bytes=device * BB, host_bytes=host * BB, **kw)
    return BlockStore(LAYOUT, Namespace(model="engine-test"), config)


ORDERS = [DimOrder.LBNHSC, DimOrder.BLHNSC, DimOrder.BHSNC, DimOrder.SBNHC, DimOrder.BNHC, DimOrder.HBNC]
N = 10  # store blocks per sequence


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.value)
@pytest.mark.parametrize("engine_block", [2, 4, 8], ids=lambda e: f"e{e}")
@pytest.mark.parametrize("device", [0, 3], ids=["no-device", "device"])
def test_save_from_and_load_into_round_trip_bit_exact_through_host_and_disk(
        tmp_path: Path, order: DimOrder, engine_block: int, device: int) -> None:
    tokens = prompt(0, N, extra=3)  # the partial block is neither saved nor loaded
    used = -(-len(tokens) // engine_block)
    src = Engine(order, engine_block, used + 4, seed=1)
    table = table_for(used + 4, used, seed=2)
    want = src.blocks(table, 0, N)
    with engine_store(tmp_path, device=device) as store:
        assert store.save_from(src.kv, table, tokens) == N
        tiers = set(store.residency(store.keys(tokens)).values())
        assert tiers == ({"device", "host", "disk"} if device else {"host", "disk"})  # more blocks than memory holds
        moved = store.stats()["bytes_moved"]
        assert sum(v for k, v in moved.items() if k.startswith("engine->")) == N * BB  # straight from the pages
        assert not any(k.startswith("put->") for k in moved)
        assert same_bits(store.get(tokens, device="cpu"), want)
        dst = Engine(order, engine_block, used + 4, seed=None)
        other = table_for(used + 4, used, seed=3)
        assert store.load_into(dst.kv, torch.tensor(other), tokens) == N
        assert same_bits(dst.blocks(other, 0, N), want)
        assert dst.poison_except(other, 0, N), "load_into wrote outside the tokens of the blocks it loaded"
        check_index_invariants(store)
    with engine_store(tmp_path, device=device) as store:  # after a restart every block is on disk only
        assert set(store.residency().values()) == {"disk"}
        dst = Engine(order, engine_block, used + 4, seed=None)
        assert store.load_into(dst.kv, table, tokens) == N
        assert same_bits(dst.blocks(table, 0, N), want)
        assert dst.poison_except(table, 0, N)
        assert store.stats()["tiers"]["disk"]["corrupt"] == 0


def test_save_from_and_load_into_honour_first_block(tmp_path: Path) -> None:
    tokens = prompt(0, N)
    src = Engine(DimOrder.LBNHSC, 4, N + 2, seed=4)
    table = table_for(N + 2, N, seed=5)
    want = src.blocks(table, 0, N)
    with engine_store(tmp_path, host=16) as store:
        assert store.save_from(src.kv, table, tokens[: 3 * BLOCK_TOKENS]) == 3
        assert store.save_from(src.kv, table, tokens, first_block=6) == 0  # blocks 3..5 are missing: a gap
        assert store.match(tokens) == 3 * BLOCK_TOKENS
        moved = store.stats()["bytes_moved"]
        assert store.save_from(src.kv, table, tokens, first_block=3) == N - 3
        assert store.stats()["bytes_moved"].get("engine->host", 0) - moved.get("engine->host", 0) == (N - 3) * BB
        assert same_bits(store.get(tokens), want)
        assert store.save_from(src.kv, table, tokens, first_block=N) == 0
        for first in (0, 4, N):
            dst = Engine(DimOrder.LBNHSC, 4, N + 2, seed=None)
            before = store.stats()["bytes_moved"]
            assert store.load_into(dst.kv, table, tokens, first_block=first) == N
            after = store.stats()["bytes_moved"]
            loaded = sum(v - before.get(k, 0) for k, v in after.items() if k.endswith("->engine"))
            assert loaded == (N - first) * BB, "blocks before first_block were copied"
            assert same_bits(dst.blocks(table, first, N), want[first:])
            assert dst.poison_except(table, first, N), "blocks before first_block were touched"
        # Past the stored prefix nothing is loaded, and the run ends where the engine's own blocks do.
        longer = tokens + prompt(50_000, 2)
        dst = Engine(DimOrder.LBNHSC, 4, N + 4, seed=None)
        assert store.load_into(dst.kv, list(range(N + 2)), longer, first_block=N + 1) == N + 1
        assert dst.poison_except(list(range(N + 2)), 0, 0)
        for bad in (N + 1, -1, True):
            with pytest.raises(ValueError, match="first_block"):
                store.load_into(dst.kv, table, tokens, first_block=bad)
            with pytest.raises(ValueError, match="first_block"):
                store.save_from(src.kv, table, tokens, first_block=bad)


def test_a_block_table_too_short_is_a_value_error_naming_it() -> None:
    tokens = prompt(0, 4, extra=2)
    src = Engine(DimOrder.LBNHSC, 4, 8, seed=6)
    with engine_store(None, host=8) as store:
        before = store.stats()
        with pytest.raises(ValueError, match="block table covers only 3 engine blocks"):
            store.save_from(src.kv, [0, 1, 2], tokens)
        assert store.stats() == before and store.residency() == {}
        assert store.save_from(src.kv, [0, 1, 2, 3], tokens) == 4  # the partial block needs no engine block
        dst = Engine(DimOrder.LBNHSC, 4, 8, seed=None)
        before = store.stats()
        with pytest.raises(ValueError, match="block table covers only 3 engine blocks"):
            store.load_into(dst.kv, [5, 6, 7], tokens)
        assert store.stats() == before
        assert dst.poison_except([], 0, 0), "a refused load_into touched the engine"
        with pytest.raises(ValueError, match="block table covers only 1 engine blocks"):
            store.load_into(dst.kv, [5], tokens, first_block=2)  # the table must cover every full block


@pytest.mark.parametrize("pieces", ["whole", "pieces"])
def test_a_corrupt_host_block_is_never_loaded(pieces: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also verified and copied in pieces of 2 blocks by the chunk copy: the pieces before the bad one land, none after."""
    if pieces == "pieces":
        from tierkv import placement
        from tierkv.ops import chunk_copy
        from tierkv.tiers import memory

        monkeypatch.setattr(placement, "CACHED_PIECE_BYTES", 2 * BB)
        monkeypatch.setattr(memory, "CACHED_PIECE_BYTES", 2 * BB)
        monkeypatch.setattr(chunk_copy, "MIN_CHUNK_BYTES", 0)
    tokens = prompt(0, 6)
    src = Engine(DimOrder.BLHNSC, 8, 4, seed=7)
    assert src.kv.grid_view() is not None, "one allocation: the chunk copy applies"
    table = [3, 1, 0]
    want = src.blocks(table, 0, 6)
    with engine_store(None, host=16) as store:
        assert store.save_from(src.kv, table, tokens) == 6
        keys = store.keys(tokens)
        corrupt_slot(store, keys[3], "host")
        dst = Engine(DimOrder.BLHNSC, 8, 4, seed=None)
        assert store.load_into(dst.kv, table, tokens) == 3  # the run ends before the bad block
        assert same_bits(dst.blocks(table, 0, 3), want[:3])
        assert dst.poison_except(table, 0, 3), "a block from the corrupt one on was copied into the engine"
        assert store.stats()["tiers"]["host"]["corrupt"] == 1
        assert store.residency(keys) == {**{k: "host" for k in keys[:3]}, **{k: None for k in keys[3:]}}
        check_index_invariants(store)
        assert store.save_from(src.kv, table, tokens, first_block=3) == 3  # the engine recomputed them
        assert same_bits(store.get(tokens), want)


@pytest.mark.parametrize("host", [2, 16], ids=["read-from-disk", "promoted-first"])
def test_a_corrupt_disk_block_is_never_loaded(tmp_path: Path, host: int) -> None:
    tokens = prompt(0, 6)
    src = Engine(DimOrder.SBNHC, 2, 14, seed=8)
    table = table_for(14, 12, seed=9)
    want = src.blocks(table, 0, 6)
    with engine_store(tmp_path, host=host) as store:
        assert store.save_from(src.kv, table, tokens) == 6
        key = store.keys(tokens)[3]
    with engine_store(tmp_path, host=host) as store:  # every block on disk only: flip a bit of block 3's slot
        disk = tier(store, "disk")
        f, slot = divmod(store.locate([key])[key]["disk"], disk.slots_per_file)
    with (disk.directory / f"data{f:03d}.bin").open("r+b") as data:
        data.seek(slot * disk.stride + 7)
        byte = data.read(1)
        data.seek(slot * disk.stride + 7)
        data.write(bytes([byte[0] ^ 0x40]))
    with engine_store(tmp_path, host=host) as store:
        dst = Engine(DimOrder.SBNHC, 2, 14, seed=None)
        assert store.load_into(dst.kv, table, tokens) == 3
        assert same_bits(dst.blocks(table, 0, 3), want[:3])
        assert dst.poison_except(table, 0, 3), "a block from the corrupt one on was copied into the engine"
        assert store.stats()["tiers"]["disk"]["corrupt"] == 1
        assert store.match(tokens) == 3 * BLOCK_TOKENS
        check_index_invariants(store)


def test_save_from_with_every_slot_leased_is_a_capacity_error_and_changes_nothing() -> None:
    a, b = prompt(0, 4), prompt(100, 1)
    src = Engine(DimOrder.LBNHSC, 4, 8, seed=10)
    table = [4, 0, 6, 2]
    with engine_store(None, host=4) as store:
        assert store.save_from(src.kv, table, a) == 4
        with store.lease(a):
            before, where = store.stats(), store.residency()
            with pytest.raises(CapacityError, match=r"cannot store 1 new blocks.*4 slots hold leased blocks"):
                store.save_from(src.kv, [7], b)
            after = store.stats()
            assert after.pop("puts") == before.pop("puts") + 1  # the attempt is counted, nothing else
            assert after == before and store.residency() == where and store.match(b) == 0
            check_index_invariants(store)
        assert store.save_from(src.kv, [7], b) == 1  # released: a's last block makes room
        assert store.match(a) == 3 * BLOCK_TOKENS
        dst = Engine(DimOrder.LBNHSC, 4, 8, seed=None)
        assert store.load_into(dst.kv, [7], b) == 1
        assert same_bits(dst.blocks([7], 0, 1), src.blocks([7], 0, 1))


def test_load_layers_without_a_gpu_loads_whole_and_verified_as_load_into() -> None:
    tokens = prompt(0, N)
    src = Engine(DimOrder.LBNHSC, 4, N + 2, seed=11)
    table = table_for(N + 2, N, seed=12)
    want = src.blocks(table, 0, N)
    with engine_store(None, host=16) as store:
        assert store.save_from(src.kv, table, tokens) == N
        dst = Engine(DimOrder.LBNHSC, 4, N + 2, seed=None)
        load = store.load_layers(dst.kv, table, tokens, first_block=2)
        assert not load.layerwise and load.finished and load.end == N
        load.wait(0)  # nothing to wait for: loaded before it returned
        assert load.finish() == N
        assert same_bits(dst.blocks(table, 2, N), want[2:])
        assert dst.poison_except(table, 2, N), "blocks before first_block were touched"
        keys = store.keys(tokens)
        corrupt_slot(store, keys[6], "host")
        dst = Engine(DimOrder.LBNHSC, 4, N + 2, seed=None)
        with store.load_layers(dst.kv, table, tokens) as load:
            assert load.end == 6, "the run ends before the corrupt block"
        assert same_bits(dst.blocks(table, 0, 6), want[:6])
        assert store.load_layers(dst.kv, table, prompt(70_000, 3)).end == 0  # nothing stored
        with pytest.raises(ValueError, match="block table covers only 1 engine blocks"):
            store.load_layers(dst.kv, [0], tokens)
        with pytest.raises(ValueError, match="first_block"):
            store.load_layers(dst.kv, table, tokens, first_block=N + 1)
        with pytest.raises(ValueError, match="path must be one of"):
            store.load_layers(dst.kv, table, tokens, path="staged")
        check_index_invariants(store)
