"""A format-1 disk store (whole-block xxh3 checksums) is migrated to `TREE_CHECKSUM` when it opens.

The store in tests/data/disk_store_b6f97db was written by commit b6f97db (see test_disk_format.py).
Its first open verifies every block with the old function, re-hashes it with the new one and
rewrites the manifest as format 2; a block whose bytes no longer match its old checksum is
dropped there, with its descendants, and the rest is served.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lmdb
import pytest
from test_disk_format import FIXTURE, LAYOUT, NAMESPACE, block_sha256, fixture_config

from tierkv import BlockStore, LayoutMismatchError
from tierkv.integrity import TREE_CHECKSUM, block_checksum, legacy_checksum_rows
from tierkv.tiers.disk.files import slot_stride
from tierkv.tiers.disk.manifest import MANIFEST_FORMAT, Record, identity_record, legacy_identity, refuse_other


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(FIXTURE / "store", copy)
    return copy


def manifest_contents(store_dir: Path) -> tuple[dict, list[Record]]:
    env = lmdb.open(str(store_dir / "manifest"), subdir=True, max_dbs=2, readonly=True, lock=False)
    try:
        meta, blocks = env.open_db(b"meta", create=False), env.open_db(b"blocks", create=False)
        with env.begin() as txn:
            identity = json.loads(txn.get(b"identity", db=meta))
            records = [Record.unpack(bytes(k), bytes(v)) for k, v in txn.cursor(db=blocks)]
    finally:
        env.close()
    return identity, records


def slot_bytes(store_dir: Path, slot: int) -> bytes:
    stride = slot_stride(LAYOUT.block_bytes)
    with open(store_dir / "data000.bin", "rb") as f:
        f.seek(slot * stride)
        return f.read(LAYOUT.block_bytes)


def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


def test_fixture_holds_the_old_checksums(store_dir: Path) -> None:
    """The premise: format 1, whole-block xxh3_64 of each block's bytes (what migration verifies against)."""
    import torch

    identity, records = manifest_contents(store_dir)
    assert identity["format"] == 1 and "checksum" not in identity
    for r in records:
        row = torch.frombuffer(bytearray(slot_bytes(store_dir, r.slot)), dtype=torch.uint8).reshape(1, -1)
        assert legacy_checksum_rows(row) == [r.checksum]
        assert block_checksum(row) != r.checksum


def test_old_store_is_migrated_on_open_and_reopens_as_format_2(store_dir: Path) -> None:
    data = expected()
    with BlockStore(LAYOUT, NAMESPACE, fixture_config(store_dir)) as store:
        assert store.stats()["disk"]["recovered_blocks"] == data["blocks"]
        assert store.stats()["disk"]["recovery_dropped"] == 0
    identity, records = manifest_contents(store_dir)
    assert identity["format"] == MANIFEST_FORMAT == 2 and identity["checksum"] == TREE_CHECKSUM
    assert len(records) == data["blocks"]
    for r in records:
        assert r.checksum == block_checksum(slot_bytes(store_dir, r.slot)), r.key.hex()
    with BlockStore(LAYOUT, NAMESPACE, fixture_config(store_dir)) as store:  # a plain format-2 open now
        assert store.stats()["disk"]["recovered_blocks"] == data["blocks"]
        for p in data["prompts"]:
            kv = store.get(p["tokens"], device="cpu", tenant=p["tenant"])
            assert block_sha256(kv) == p["block_sha256"], p["name"]
        assert store.stats()["tiers"]["disk"]["corrupt"] == 0


def test_block_damaged_before_migration_is_dropped_with_its_descendants(store_dir: Path) -> None:
    data = expected()
    _, records = manifest_contents(store_dir)
    children: dict[bytes, list[Record]] = {}
    for r in records:
        if r.parent_key is not None:
            children.setdefault(r.parent_key, []).append(r)
    victim = next(r for r in records if r.key in children)

    def descendants(key: bytes) -> int:
        return sum(1 + descendants(c.key) for c in children.get(key, []))

    below = descendants(victim.key)
    stride = slot_stride(LAYOUT.block_bytes)
    with open(store_dir / "data000.bin", "r+b") as f:
        f.seek(victim.slot * stride + 5)
        byte = f.read(1)
        f.seek(victim.slot * stride + 5)
        f.write(bytes([byte[0] ^ 0x10]))
    with BlockStore(LAYOUT, NAMESPACE, fixture_config(store_dir)) as store:
        disk = store.stats()["disk"]
        reasons = disk["recovery_dropped_by_reason"]
        assert reasons.get("checksum mismatch while migrating checksums") == 1
        assert reasons.get("no trusted parent", 0) == below
        assert disk["recovered_blocks"] == data["blocks"] - 1 - below
        served = 0
        for p in data["prompts"]:
            kv = store.get(p["tokens"], device="cpu", tenant=p["tenant"])
            assert block_sha256(kv) == p["block_sha256"][: kv.shape[0]], p["name"]  # a prefix, bit-exact
            served += kv.shape[0]
        assert store.stats()["tiers"]["disk"]["corrupt"] == 0  # dropped at open, never read as corrupt
    _, after = manifest_contents(store_dir)
    assert victim.key not in {r.key for r in after}
    assert len(after) == data["blocks"] - 1 - below


def test_refuse_other_tells_a_format_1_record_of_the_same_store() -> None:
    identity = {"layout": LAYOUT.to_dict(), "namespace": {"model": NAMESPACE.model}, "block_bytes": LAYOUT.block_bytes}
    current = identity_record(identity)
    old = legacy_identity(current)
    assert old == {**identity, "format": 1}
    assert refuse_other(json.dumps(old).encode(), current) is True
    assert refuse_other(json.dumps(current).encode(), current) is False
    other = {**old, "block_bytes": 1}
    with pytest.raises(LayoutMismatchError, match="block_bytes"):
        refuse_other(json.dumps(other).encode(), current)
    with pytest.raises(LayoutMismatchError, match="checksum"):  # format 2 with another checksum name
        refuse_other(json.dumps({**current, "checksum": "crc64"}).encode(), current)
