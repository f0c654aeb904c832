"""The disk tier: restart, crash safety under SIGKILL, corruption, locking and bad paths."""

from __future__ import annotations

import gc
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import pytest
import torch
from conftest import BLOCK_TOKENS, check_index_invariants, kv_for, prompt, same_bits, tiny_layout

from tierkv import BlockStore, KVLayout, LayoutMismatchError, Namespace, StoreConfig, TierKVError
from tierkv.tiers.disk.manifest import Record
from tierkv.tiers.disk.recovery import paused_gc

# Prompts sharing prefixes: 8 families of 3 branches, 12 blocks each.
FAMILY = [prompt(f * 10_000, 6) + list(range(f * 10_000 + 500 + b * 100, f * 10_000 + 524 + b * 100))
          for f in range(8) for b in range(3)]


def disk_config(layout: KVLayout, directory: str | os.PathLike[str], device: int = 3, host: int = 6,
                disk: int = 200, **kw: object) -> StoreConfig:
    bb = layout.block_bytes
    return StoreConfig(device_bytes=device * bb, host_bytes=host * bb, device="cpu",
                       disk_path=str(directory), disk_bytes=disk * 4096 * -(-bb // 4096), **kw)


def open_store(directory: Path, layout: KVLayout | None = None, model: str = "crash", **kw: object) -> BlockStore:
    layout = layout or tiny_layout()
    return BlockStore(layout, Namespace(model=model), disk_config(layout, directory, **kw))


def assert_serves_only_truth(store: BlockStore, prompts: list[list[int]]) -> int:
    """Every block `get` returns is the KV that was put for its tokens. Returns blocks served."""
    served = 0
    for tokens in prompts:
        got = store.get(tokens)
        expected = kv_for(store.layout, tokens)[: got.shape[0]]
        assert same_bits(got, expected), "served KV that was never put for these tokens"
        served += got.shape[0]
    return served


def test_restart_serves_every_block_bit_exact(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        for tokens in FAMILY:
            store.put(tokens, kv_for(store.layout, tokens))
        expected = {tuple(t): store.match(t) for t in FAMILY}
    with open_store(tmp_path) as store:
        assert store.recovery.blocks > 0
        for tokens in FAMILY:
            assert store.match(tokens) == expected[tuple(tokens)]
        assert assert_serves_only_truth(store, FAMILY) == sum(expected.values()) // 4
        check_index_invariants(store)
        assert store.stats()["tiers"]["disk"]["corrupt"] == 0


def test_close_without_flush_keeps_only_what_reached_disk(tmp_path: Path) -> None:
    tokens = prompt(0, 2)
    with open_store(tmp_path, flush_on_close=False) as store:
        store.put(tokens, kv_for(store.layout, tokens))  # fits in the device tier: never demoted
    with open_store(tmp_path) as store:
        assert store.match(tokens) == 0


def test_disk_hit_is_promoted_and_disk_copy_stays(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.put(FAMILY[0], kv_for(store.layout, FAMILY[0]))
    with open_store(tmp_path) as store:
        got = store.get(FAMILY[0][:12])  # the device tier holds 3 blocks
        assert same_bits(got, kv_for(store.layout, FAMILY[0][:12]))
        stats = store.stats()
        assert stats["bytes_moved"]["disk->device"] == 3 * store.layout.block_bytes
        assert stats["tiers"]["disk"]["used_slots"] == 12  # inclusive: the disk copies stay
        check_index_invariants(store)


@pytest.mark.parametrize("durability", ["none", "batch", "every"])
def test_sigkill_mid_write_never_serves_a_torn_block(tmp_path: Path, durability: str) -> None:
    """Kill a writer at random moments; each reopen serves only true KV and keeps working."""
    rng = random.Random(durability)
    writer = Path(__file__).with_name("_crash_writer.py")
    iterations = 4 if durability != "batch" else 8
    recovered = 0
    for i in range(iterations):
        proc = subprocess.Popen([sys.executable, str(writer), str(tmp_path), str(i), durability],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("ready"), proc.stderr.read() if proc.stderr else line
            deadline = time.monotonic() + rng.uniform(0.05, 0.8)
            while time.monotonic() < deadline and proc.poll() is None:
                proc.stdout.readline()
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "writer died"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        with open_store(tmp_path) as store:
            recovered = max(recovered, store.recovery.blocks)
            assert_serves_only_truth(store, FAMILY)
            check_index_invariants(store)
            extra = prompt(900_000 + i * 100, 3)  # and it still takes new blocks
            store.put(extra, kv_for(store.layout, extra))
            assert same_bits(store.get(extra), kv_for(store.layout, extra))
    assert recovered > 0, "no block ever survived a crash: the disk tier never committed"


def _slot_offset(store: BlockStore, tokens: list[int], block: int) -> tuple[Path, int]:
    disk = store.tiers[store.tier_names.index("disk")]
    key = store.keys(tokens)[block]
    f, slot = divmod(store.locate([key])[key]["disk"], disk.slots_per_file)
    return disk.directory / f"data{f:03d}.bin", slot * disk.stride


def _flip_bit(path: Path, offset: int) -> None:
    """Flip one bit of the byte at `offset` of a data file, behind the store's back."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_flipped_bytes_are_detected_and_never_served(tmp_path: Path) -> None:
    tokens = FAMILY[0]
    with open_store(tmp_path) as store:
        store.put(tokens, kv_for(store.layout, tokens))
    with open_store(tmp_path) as store:  # after a restart every block lives on disk only
        path, offset = _slot_offset(store, tokens, 5)
    _flip_bit(path, offset + 7)
    with open_store(tmp_path) as store:
        got = store.get(tokens)
        assert got.shape[0] == 5, "the corrupt block and its descendants must not be served"
        assert same_bits(got, kv_for(store.layout, tokens)[:5])
        assert store.stats()["tiers"]["disk"]["corrupt"] == 1
        assert store.match(tokens) == 20
        check_index_invariants(store)
        store.put(tokens, kv_for(store.layout, tokens))  # recomputed KV heals the prefix
        assert same_bits(store.get(tokens), kv_for(store.layout, tokens))


def test_truncated_data_file_serves_no_wrong_byte(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        for tokens in FAMILY[:6]:
            store.put(tokens, kv_for(store.layout, tokens))
        data = store.tiers[store.tier_names.index("disk")].directory / "data000.bin"
    os.truncate(data, 10 * 4096 + 100)  # mid-slot: slots 10.. are gone, slot 10 torn
    with open_store(tmp_path) as store:
        served = assert_serves_only_truth(store, FAMILY[:6])
        assert store.stats()["tiers"]["disk"]["corrupt"] > 0
        assert served > 0
        check_index_invariants(store)


def test_manifest_checksum_that_lies_is_caught(tmp_path: Path) -> None:
    tokens = FAMILY[1]
    with open_store(tmp_path) as store:
        store.put(tokens, kv_for(store.layout, tokens))
        key = store.keys(tokens)[2]
    env = lmdb.open(str(tmp_path / "manifest"), subdir=True, max_dbs=2)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        record = Record.unpack(key, txn.get(key))
        txn.put(key, record._replace(checksum=record.checksum ^ 1).pack())
    env.close()
    with open_store(tmp_path) as store:
        got = store.get(tokens)
        assert got.shape[0] == 2
        assert same_bits(got, kv_for(store.layout, tokens)[:2])


def test_orphan_and_out_of_range_records_are_dropped_at_open(tmp_path: Path) -> None:
    tokens = FAMILY[2]
    other = FAMILY[9]
    with open_store(tmp_path) as store:
        store.put(tokens, kv_for(store.layout, tokens))
        store.put(other, kv_for(store.layout, other))
        parent_key = store.keys(tokens)[3]
        far_key = store.keys(other)[11]
    env = lmdb.open(str(tmp_path / "manifest"), subdir=True, max_dbs=2)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        txn.delete(parent_key)  # blocks 4..11 become orphans
        record = Record.unpack(far_key, txn.get(far_key))
        txn.put(far_key, record._replace(slot=10**9).pack())
    env.close()
    with open_store(tmp_path) as store:
        assert store.match(tokens) == 12
        assert store.match(other) == 44  # its last block pointed past the end of the files
        assert store.recovery.dropped == 9
        assert_serves_only_truth(store, [tokens, other])
        check_index_invariants(store)


def test_second_writer_is_refused_and_first_keeps_working(tmp_path: Path) -> None:
    with open_store(tmp_path) as first:
        with pytest.raises(TierKVError, match="already open for writing"):
            open_store(tmp_path)
        tokens = prompt(0, 3)
        first.put(tokens, kv_for(first.layout, tokens))
        assert same_bits(first.get(tokens), kv_for(first.layout, tokens))
    open_store(tmp_path).close()  # the lock went with the first store


def test_other_layout_or_namespace_is_refused_with_the_difference(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    with pytest.raises(LayoutMismatchError, match="model"):
        open_store(tmp_path, model="another-model")
    with pytest.raises(LayoutMismatchError, match="head_dim"):
        open_store(tmp_path, layout=KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=8,
                                              dtype=torch.bfloat16, block_tokens=4))
    open_store(tmp_path).close()  # and the directory is still usable


def test_bad_paths_fail_at_open_with_clear_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(TierKVError, match="is a file"):
        open_store(a_file)
    with pytest.raises(TierKVError, match="does not exist"):
        open_store(tmp_path / "missing" / "deeper")
    open_store(tmp_path / "created").close()  # a missing last component is created


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user for the check")
def test_permission_denied_is_a_clear_error() -> None:
    base = Path(tempfile.mkdtemp(prefix="tierkv-perm-"))
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)  # readable, not writable, by others
        os.setegid(65534)
        os.seteuid(65534)
        try:
            with pytest.raises(TierKVError, match="permission denied"):
                open_store(locked)
        finally:
            os.seteuid(0)
            os.setegid(0)
    finally:
        shutil.rmtree(base)


def test_shrinking_disk_bytes_drops_only_out_of_range_blocks(tmp_path: Path) -> None:
    with open_store(tmp_path, disk=200) as store:
        for tokens in FAMILY:
            store.put(tokens, kv_for(store.layout, tokens))
    with open_store(tmp_path, disk=20) as store:
        assert store.stats()["tiers"]["disk"]["used_slots"] <= 20
        assert_serves_only_truth(store, FAMILY)
        check_index_invariants(store)


def test_bad_disk_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="durability"):
        StoreConfig(disk_path="/tmp/x", durability="sometimes")
    with pytest.raises(ValueError, match="disk_bytes"):
        StoreConfig(disk_path="/tmp/x", disk_bytes=-1)
    with pytest.raises(ValueError, match="io_threads"):
        StoreConfig(io_threads=0)


def test_the_collector_paused_for_a_restart_is_restored_as_it_was() -> None:
    """A warm restart pauses the cyclic collector (most of its time was collections); it must come back on,
    even when recovery raises, and stay off for an application that had turned it off."""
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="recovery failed"), paused_gc():
        assert not gc.isenabled()
        raise RuntimeError("recovery failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_restart_leaves_the_collector_on(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        for tokens in FAMILY[:3]:
            store.put(tokens, kv_for(store.layout, tokens))
    with open_store(tmp_path) as store:
        assert store.recovery.blocks > 0
        assert gc.isenabled()


def test_verify_reads_off_serves_unchecked_but_still_records_checksums(tmp_path: Path) -> None:
    """`verify_reads=False` turns the check off for disk reads; the manifest still gets every checksum,
    so a store opened later with verification on catches what changed meanwhile."""
    tokens = FAMILY[0]
    with open_store(tmp_path, verify_reads=False) as store:
        store.put(tokens, kv_for(store.layout, tokens))
    with open_store(tmp_path) as store:
        path, offset = _slot_offset(store, tokens, 5)
    _flip_bit(path, offset + 7)
    with open_store(tmp_path, verify_reads=False) as store:
        got = store.get(tokens)
        assert got.shape[0] == len(tokens) // BLOCK_TOKENS, "an unverified read stops at nothing"
        assert not same_bits(got[5], kv_for(store.layout, tokens)[5])  # the flipped byte, as asked
        assert store.stats()["tiers"]["disk"]["corrupt"] == 0
    with open_store(tmp_path) as store:
        assert store.get(tokens).shape[0] == 5, "the checksum the unverified store recorded catches the flip"
        assert store.stats()["tiers"]["disk"]["corrupt"] == 1
