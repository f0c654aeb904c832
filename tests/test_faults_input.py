"""Hostile arguments: each refused before it does damage, with an error that names the argument.

Before, a capacity far beyond the machine built a list of one entry per slot and then failed in
the allocator (MemoryError('') or a RuntimeError naming no field); a put whose kv failed at copy
time had already evicted blocks to make room; get(device="cuda") on a CPU machine raised
AssertionError after promotion had already moved blocks, and "bogus" a RuntimeError; a block
table naming pages the engine does not have copied from (or into) other requests' pages.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _faults import open_fault_store, run_in_child
from conftest import check_index_invariants, kv_for, make_store, prompt, same_bits, tiny_layout
from gpu.cases import bind, natural_tensors

from tierkv import BlockStore, ConfigError, DimOrder, EngineKVLayout, Namespace, StoreConfig


def _capacity_in_a_small_process(field: str, size: str, limit_gib: float, disk_path: str | None) -> str:
    """In a child limited to `limit_gib` of address space: the error a store of `field=size` raises."""
    limit = int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    kw: dict[str, Any] = {"device": "cpu", "device_bytes": 4096, "host_bytes": 4096}
    if disk_path is not None:
        kw.update(disk_path=disk_path, disk_bytes=4096)
    kw[field] = size
    start = time.monotonic()
    try:
        BlockStore(tiny_layout(), Namespace(model="limits"), StoreConfig(**kw)).close()
    except Exception as e:
        return f"{type(e).__name__} after {time.monotonic() - start:.1f}s: {e}"
    return "opened"


@pytest.mark.parametrize(("field", "size"), [
    ("host_bytes", "100TiB"), ("device_bytes", "100TiB"), ("host_bytes", "1PiB"),
    ("host_bytes", "24GiB"),  # within the machine's memory on big hosts, beyond the child's address space
])
def test_a_capacity_beyond_the_machine_is_refused_naming_the_field(field: str, size: str) -> None:
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    current = 0 if limit == resource.RLIM_INFINITY else limit
    result = run_in_child(_capacity_in_a_small_process, field, size, max(current / 2**30, 12.0), None)
    assert not result.crashed and result.error is None, result.error or f"exit {result.exitcode}"
    said = result.value
    assert said.startswith("ConfigError") and f"{field}: " in said, said
    assert "lower" in said, said
    assert float(said.split(" after ")[1].split("s:")[0]) < 5, f"refused only after building for it: {said}"


def test_a_disk_capacity_beyond_the_file_system_is_refused_naming_the_field(tmp_path: Path) -> None:
    result = run_in_child(_capacity_in_a_small_process, "disk_bytes", "100TiB", 12.0, str(tmp_path))
    assert not result.crashed and result.error is None, result.error
    assert result.value.startswith("ConfigError") and "disk_bytes: " in result.value, result.value
    assert not list(tmp_path.glob("data*.bin")), "a data file was created for a refused size"


@pytest.fixture
def busy_store():
    """A store whose tiers are full, so that any put or promotion would have to evict first."""
    with make_store(2, 2) as store:
        for i in range(4):
            tokens = prompt(1000 * i, 1)
            store.put(tokens, kv_for(store.layout, tokens))
        yield store


def snapshot(store: BlockStore) -> dict[bytes, dict[str, int]]:
    return store.locate(list(store.index.blocks))


def test_a_put_of_kv_that_cannot_be_copied_moves_nothing(busy_store: BlockStore) -> None:
    before = snapshot(busy_store)
    tokens = prompt(50_000, 2)
    meta = torch.empty((2, *busy_store.layout.block_shape), dtype=busy_store.layout.dtype, device="meta")
    with pytest.raises(ValueError, match="kv lives on meta"):
        busy_store.put(tokens, meta)
    assert snapshot(busy_store) == before, "blocks were evicted for a put that was refused"
    sparse = kv_for(busy_store.layout, tokens).to_sparse()
    with pytest.raises((ValueError, TypeError)):
        busy_store.put(tokens, sparse)
    assert snapshot(busy_store) == before
    check_index_invariants(busy_store)


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "meta", 3.5, "mps"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_get_to_a_device_that_is_not_here_moves_nothing(busy_store: BlockStore, device: object) -> None:
    tokens = prompt(0, 1)
    before = snapshot(busy_store)
    stats = busy_store.stats()
    with pytest.raises(ValueError, match="^device: "):
        busy_store.get(tokens, device=device)  # type: ignore[arg-type]
    assert snapshot(busy_store) == before, "promotion moved blocks for a get that was refused"
    assert busy_store.stats()["bytes_moved"] == stats["bytes_moved"]
    assert same_bits(busy_store.get(tokens, device="cpu"), kv_for(busy_store.layout, tokens))


def engine(num_blocks: int = 8, device: str = "cpu") -> Any:
    layout = tiny_layout()
    engine_layout = EngineKVLayout(DimOrder.LBNHSC, num_layers=layout.num_layers, num_blocks=num_blocks, block_size=4,
                                   num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype)
    return bind(engine_layout, natural_tensors(engine_layout, device))


@pytest.mark.parametrize("table", [[0, 9], [-1, 1], [1, 2**40]], ids=["past-the-end", "negative", "huge"])
def test_a_block_table_naming_pages_the_engine_lacks_moves_nothing(busy_store: BlockStore, table: list[int]) -> None:
    tokens = prompt(0, 2)
    busy_store.put(tokens, kv_for(busy_store.layout, tokens))
    before = snapshot(busy_store)
    eng = engine()
    pages = [t.clone() for t in eng.tensors]
    with pytest.raises(ValueError, match="block_table"):
        busy_store.load_into(eng, table, tokens)
    with pytest.raises(ValueError, match="block_table"):
        busy_store.save_from(eng, table, prompt(70_000, 2))
    assert snapshot(busy_store) == before
    assert all(torch.equal(a, b) for a, b in zip(pages, eng.tensors)), "engine pages were written"


def test_an_engine_on_the_meta_device_moves_nothing(busy_store: BlockStore) -> None:
    tokens = prompt(0, 1)
    before = snapshot(busy_store)
    with pytest.raises(ValueError, match="meta"):
        busy_store.load_into(engine(device="meta"), [0], tokens)
    with pytest.raises(ValueError, match="meta"):
        busy_store.save_from(engine(device="meta"), [0], prompt(80_000, 1))
    assert snapshot(busy_store) == before


def test_one_off_tenants_do_not_stay_cached(tmp_path: Path) -> None:
    """40k one-off tenants: their key seeds are an LRU of bounded size, not a dict that only grows."""
    with open_fault_store(tmp_path) as store:
        tokens = prompt(0, 1)
        for i in range(40_000):
            store.match(tokens, tenant=f"tenant-{i}")
        assert len(store.chain._seeds) <= 4096
        store.put(tokens, kv_for(store.layout, tokens), tenant="kept")
        for i in range(10_000):
            store.match(tokens, tenant=f"other-{i}")
        assert store.match(tokens, tenant="kept") == 4  # an evicted seed is derived again, the same
        assert store.match(tokens) == 0


def test_bad_capacity_strings_name_the_field() -> None:
    for field in ("host_bytes", "device_bytes", "disk_bytes", "writeback_bytes"):
        with pytest.raises(ConfigError, match=f"^{field}: "):
            StoreConfig(**{field: "12 parsecs"})
