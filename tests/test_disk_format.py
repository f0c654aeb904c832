"""On-disk format compatibility: a store directory written by older code opens with today's.

`tests/data/disk_store_b6f97db/` was written by commit b6f97db (main before the layout
refactor) with `scripts/make_disk_fixture.py`, through the public API only:

    store/            data000.bin (64 KiB, preallocated) and manifest/data.mdb (LMDB); the
                      lock files are left out, every open recreates them
    expected.json     the layout, namespace and config it was written with, the prompts
                      (tokens, tenant), the sha256 of each block's KV and of each store file

Regenerate it (only when the format changes on purpose; then the old store is supposed to be
refused or migrated, and this test says which) with the old code on the import path:

    git worktree add /tmp/tierkv-b6f97db b6f97db
    PYTHONPATH=/tmp/tierkv-b6f97db python scripts/make_disk_fixture.py --force tests/data/disk_store_b6f97db
    git worktree remove --force /tmp/tierkv-b6f97db

Opening a store writes to it (locks, manifest commits, recency), so every test opens a copy in
tmp_path, never the committed directory. The layout, namespace and config below repeat the
script's; `expected.json` records them and the tests check the two agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from tierkv import BlockStore, KVLayout, LayoutMismatchError, Namespace, StoreConfig

FIXTURE = Path(__file__).parent / "data" / "disk_store_b6f97db"
LAYOUT = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=8, dtype=torch.float16, block_tokens=4)
NAMESPACE = Namespace(model="fixture/model")
LOCK_FILES = {"LOCK", "manifest/lock.mdb"}  # created by every open, not part of the fixture


def fixture_config(disk_path: str | os.PathLike[str]) -> StoreConfig:
    return StoreConfig(
        device="cpu", device_bytes=0, host_bytes=16 << 10, pin_host=False,
        disk_path=os.fspath(disk_path), disk_bytes=64 << 10, durability="batch",
        flush_on_close=True, disk_io="posix", io_threads=1,
    )


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def block_sha256(kv: torch.Tensor) -> list[str]:
    rows = kv.cpu().contiguous().view(torch.uint8).reshape(kv.shape[0], -1)
    return [hashlib.sha256(row.numpy().tobytes()).hexdigest() for row in rows]


def new_kv(n: int, salt: int) -> torch.Tensor:
    values = (torch.arange(n * LAYOUT.block_bytes // 2, dtype=torch.int64) * 5 + salt) % 2001 - 1000
    return values.to(torch.float16).reshape(n, *LAYOUT.block_shape)


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    data = json.loads((FIXTURE / "expected.json").read_text())
    # The committed files are the ones the old code wrote (no checkout filter touched them)...
    assert file_hashes(FIXTURE / "store") == data["files"]
    # ... and this test opens them with the settings they were written with.
    assert data["layout"] == LAYOUT.to_dict()
    assert data["namespace"] == {"model": NAMESPACE.model}
    config = fixture_config("store").to_dict()
    assert {k: config[k] for k in data["config"]} == data["config"]
    return data


@pytest.fixture
def store_dir(tmp_path: Path, expected: dict[str, Any]) -> Path:
    """A private copy of the fixture's store directory."""
    copy = tmp_path / "store"
    shutil.copytree(FIXTURE / "store", copy)
    return copy


def test_store_written_by_b6f97db_serves_every_block_bit_exact(store_dir: Path, expected: dict[str, Any]) -> None:
    prompts = expected["prompts"]
    with BlockStore(LAYOUT, NAMESPACE, fixture_config(store_dir)) as store:
        disk = store.stats()["disk"]
        assert disk["recovered_blocks"] == expected["blocks"] > 0
        assert disk["recovery_dropped"] == 0
        for p in prompts:
            assert store.match(p["tokens"], tenant=p["tenant"]) == p["matched_tokens"] > 0, p["name"]
        for p in prompts:
            kv = store.get(p["tokens"], device="cpu", tenant=p["tenant"])
            assert kv.dtype == LAYOUT.dtype and tuple(kv.shape[1:]) == LAYOUT.block_shape
            assert block_sha256(kv) == p["block_sha256"], f"prompt {p['name']}: KV read back differs from what was written"
        stats = store.stats()
        assert stats["tiers"]["disk"]["hits"] > 0  # served from the old data file, checksums verified
        assert stats["tiers"]["disk"]["corrupt"] == 0


def test_tenant_blocks_stay_private(store_dir: Path, expected: dict[str, Any]) -> None:
    tenanted = [p for p in expected["prompts"] if p["tenant"]]
    shared = [p for p in expected["prompts"] if not p["tenant"]]
    assert tenanted and shared
    with BlockStore(LAYOUT, NAMESPACE, fixture_config(store_dir)) as store:
        for p in tenanted:
            assert store.match(p["tokens"], tenant=p["tenant"]) == p["matched_tokens"]
            assert store.match(p["tokens"]) == 0
            assert store.match(p["tokens"], tenant=p["tenant"] + "-other") == 0
            assert store.get(p["tokens"], device="cpu").shape[0] == 0
        for p in shared:
            assert store.match(p["tokens"], tenant=tenanted[0]["tenant"]) == 0


def test_old_store_keeps_working_after_open(store_dir: Path, expected: dict[str, Any]) -> None:
    """New blocks written by today's code next to the old ones survive a restart, as do the old ones."""
    first = expected["prompts"][0]
    extended = first["tokens"][: first["matched_tokens"]] + [7000 + i for i in range(8)]  # 2 blocks past A
    fresh = [9000 + i for i in range(12)]
    with BlockStore(LAYOUT, NAMESPACE, fixture_config(store_dir)) as store:
        assert store.put(extended, torch.cat([store.get(first["tokens"], device="cpu"), new_kv(2, 1)])) == 2
        assert store.put(fresh, new_kv(3, 2)) == 3
    with BlockStore(LAYOUT, NAMESPACE, fixture_config(store_dir)) as store:
        assert store.stats()["disk"]["recovered_blocks"] == expected["blocks"] + 5
        assert store.stats()["disk"]["recovery_dropped"] == 0
        assert store.match(extended) == len(extended)
        assert block_sha256(store.get(extended, device="cpu")) == first["block_sha256"] + block_sha256(new_kv(2, 1))
        assert block_sha256(store.get(fresh, device="cpu")) == block_sha256(new_kv(3, 2))
        for p in expected["prompts"]:
            assert block_sha256(store.get(p["tokens"], device="cpu", tenant=p["tenant"])) == p["block_sha256"], p["name"]


@pytest.mark.parametrize(
    ("layout", "namespace", "named"),
    [
        (replace(LAYOUT, head_dim=16), NAMESPACE, ["head_dim", "block_bytes"]),
        (replace(LAYOUT, dtype=torch.bfloat16), NAMESPACE, ["dtype", "bfloat16"]),  # same block bytes
        (LAYOUT, Namespace(model="other/model"), ["namespace", "other/model"]),
    ],
    ids=["head_dim", "dtype", "model"],
)
def test_other_layout_is_refused_and_changes_nothing(
    store_dir: Path, expected: dict[str, Any], layout: KVLayout, namespace: Namespace, named: list[str]
) -> None:
    before = file_hashes(store_dir)
    with pytest.raises(LayoutMismatchError) as err:
        BlockStore(layout, namespace, fixture_config(store_dir))
    for word in named:
        assert word in str(err.value), str(err.value)
    after = file_hashes(store_dir)
    assert {k: after.get(k) for k in before} == before, "a refused open modified the store's files"
    assert set(after) - set(before) <= LOCK_FILES
    # The refused open let go of the directory: the right settings still open it.
    with BlockStore(LAYOUT, NAMESPACE, fixture_config(store_dir)) as store:
        assert store.stats()["disk"]["recovered_blocks"] == expected["blocks"]
