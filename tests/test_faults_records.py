"""Manifest records that are not what they claim: malformed values, altered idents; and the lock after a failed open."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest
from _faults import FAMILY, open_fault_store, still_usable, verify_served
from conftest import check_index_invariants, kv_for, same_bits, tiny_layout

from tierkv import BlockStore, KVLayout, LayoutMismatchError, Namespace, TierKVError


def rewrite_record(directory: Path, key: bytes, change) -> None:
    """Replace the manifest value under `key` by `change(value)`, as a bad disk or a bad tool would."""
    env = lmdb.open(str(directory / "manifest"), subdir=True, max_dbs=2)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        txn.put(key, change(bytes(txn.get(key))))
    env.close()


def stored(directory: Path, tokens: list[int]) -> list[bytes]:
    with open_fault_store(directory) as store:
        store.put(tokens, kv_for(store.layout, tokens))
        return store.keys(tokens)


MALFORMED = {
    "cut short": lambda value: value[:5],
    "no room for a parent key": lambda value: value[:40],  # the 25-byte record, then less than 16 bytes
    "root flag 2": lambda value: value[:24] + b"\x02" + value[25:],
}


@pytest.mark.parametrize("damage", list(MALFORMED))
def test_a_malformed_record_is_dropped_and_counted(tmp_path: Path, damage: str) -> None:
    """Before: BlockStore() raised struct.error, and the failed open kept the directory locked."""
    tokens = FAMILY[0]
    keys = stored(tmp_path, tokens)
    rewrite_record(tmp_path, keys[4], MALFORMED[damage])
    with open_fault_store(tmp_path) as store:
        disk = store.stats()["disk"]
        assert disk["recovery_dropped_by_reason"] == {"malformed record": 1, "no trusted parent": 7}
        assert store.recovery.dropped == 8
        got = store.get(tokens)
        assert got.shape[0] == 4 and same_bits(got, kv_for(store.layout, tokens)[:4])
        check_index_invariants(store)
        still_usable(store, 0)
    with open_fault_store(tmp_path) as store:  # the deletions were committed: a clean open drops nothing
        assert store.recovery.dropped == 0


def test_a_record_whose_ident_was_altered_is_dropped_and_counted(tmp_path: Path) -> None:
    """Before: it was restored as a block no lookup can ever reach, and nothing was counted."""
    tokens = FAMILY[1]
    keys = stored(tmp_path, tokens)
    rewrite_record(tmp_path, keys[2], lambda value: value[:-1] + bytes([value[-1] ^ 1]))  # one token id changed
    with open_fault_store(tmp_path) as store:
        reasons = store.stats()["disk"]["recovery_dropped_by_reason"]
        assert reasons["key is not the hash of its ident"] == 1
        assert keys[2] not in store.index.blocks
        assert store.get(tokens).shape[0] == 2
        verify_served(store)
        check_index_invariants(store)


def test_a_record_with_an_ident_of_another_size_is_dropped(tmp_path: Path) -> None:
    tokens = FAMILY[2]
    keys = stored(tmp_path, tokens)
    rewrite_record(tmp_path, keys[0], lambda value: value + b"\0\0\0\0")  # five token ids where a block has four
    with open_fault_store(tmp_path) as store:
        assert store.stats()["disk"]["recovery_dropped_by_reason"]["ident of the wrong size"] == 1
        assert store.match(tokens) == 0
        verify_served(store)


def test_a_record_whose_recency_was_damaged_is_dropped(tmp_path: Path) -> None:
    """Found by the damage soak: a flipped last-use stamp near 2**64 ran the recency clock past what a
    record stores, and every later commit raised struct.error."""
    tokens = FAMILY[4]
    keys = stored(tmp_path, tokens)
    rewrite_record(tmp_path, keys[6], lambda value: value[:16] + b"\xff" * 8 + value[24:])  # slot, checksum, LAST USE
    with open_fault_store(tmp_path) as store:
        assert store.stats()["disk"]["recovery_dropped_by_reason"]["implausible last use"] == 1
        assert store.get(tokens).shape[0] == 6
        store.put(tokens, kv_for(store.layout, tokens))  # recorded again, with a sane stamp
        still_usable(store, 1)
    with open_fault_store(tmp_path) as store:
        assert store.match(tokens) == len(tokens) and store.recovery.dropped == 0
        verify_served(store)


def test_a_refused_open_releases_the_directory_lock(tmp_path: Path) -> None:
    stored(tmp_path, FAMILY[3])
    other = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=8, dtype=tiny_layout().dtype, block_tokens=4)
    with pytest.raises(LayoutMismatchError, match="head_dim"):
        BlockStore(other, Namespace(model="faults"), open_config(tmp_path, other))
    with open_fault_store(tmp_path) as store:  # not "already open (pid <this process>)"
        assert store.match(FAMILY[3]) == len(FAMILY[3])
        with pytest.raises(TierKVError, match="already open for writing"):
            open_fault_store(tmp_path)  # while it is open, it is refused, naming the holder
    open_fault_store(tmp_path).close()


def open_config(directory: Path, layout: KVLayout):
    from _faults import fault_config

    return fault_config(directory, layout)
