"""A file system that fills up under a running store, for real: a small tmpfs, and a file-size limit.

The tmpfs test mounts one (root only; skipped where mount is refused) and fills it with a ballast
file while the store runs: the data files are preallocated, so what fails is the manifest, whose
LMDB file must grow. The RLIMIT_FSIZE test needs no privilege: in a child process no file may be
written past its second page (EFBIG instead of ENOSPC, the same path through LMDB; data writes to
slots past that offset fail too, and lose only their blocks). Either way puts and
gets go on, nothing wrong is served, the manifest changes wait and are recorded once space is
back, and a crash image taken then holds every block the disk tier held.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
from _faults import (
    FAMILY,
    disk_keys,
    key_prefixes,
    open_fault_store,
    prefix_closed,
    run_in_child,
    settled,
    still_usable,
    verify_served,
)
from conftest import check_index_invariants, kv_for, prompt


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"tierkv-{uuid.uuid4().hex[:8]}", str(where)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1.5 MiB tmpfs, unmounted afterwards."""
    where = tmp_path / "fs"
    if not _mount_tmpfs(where, "1536k"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); test_manifest_that_cannot_grow covers it")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(fs: Path) -> Path:
    """Take every free byte of the file system `fs` with a ballast file."""
    ballast = fs / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    chunk = b"\0" * 4096
    try:
        while os.write(fd, chunk):
            pass
    except OSError:
        pass  # full
    finally:
        os.close(fd)
    return ballast


def crash_image(store_dir: Path, image: Path) -> Path:
    """A copy of the store directory as a kill -9 would leave it now (the caller let the store settle)."""
    shutil.copytree(store_dir, image, ignore=shutil.ignore_patterns("LOCK"))
    return image


def test_a_file_system_that_fills_up_under_the_store(small_fs: Path, tmp_path: Path) -> None:
    """Before: raw lmdb.Error from put and get, and the manifest changes of the failed commit were lost."""
    store_dir = small_fs / "store"
    with open_fault_store(store_dir, disk=100) as store:
        for tokens in FAMILY[:2]:
            store.put(tokens, kv_for(store.layout, tokens))
        ballast = fill(small_fs)
        for tokens in FAMILY[2:12]:
            store.put(tokens, kv_for(store.layout, tokens))  # the manifest cannot grow: its commits fail
            verify_served(store, [tokens])
        full = settled(store).stats()["disk"]
        assert full["commit_failures"] > 0, "the file system never ran out of space"
        on_disk = prefix_closed(disk_keys(store), key_prefixes())  # what a restart can serve
        ballast.unlink()  # space is back: the next commit records everything that waited
        settled(store)
        assert store.stats()["disk"]["commit_failures"] == full["commit_failures"]
        image = crash_image(store_dir, tmp_path / "image")
        verify_served(store)
        check_index_invariants(store)
    assert len(on_disk) > 20
    with open_fault_store(image, disk=100) as store:
        lost = on_disk - set(store.index.blocks)
        assert not lost, f"{len(lost)} blocks on disk while it was full were never recorded"
        verify_served(store)
        still_usable(store, 5)


def _grow_limited(store_dir: str) -> dict[str, object]:
    """In a child: run the store while no file may be written past its second page, then lift the limit.

    The disk tier has two slots, both below the limit, so its data writes succeed while every
    manifest commit that records a block (a page written further in) fails.
    """
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    store = open_fault_store(store_dir, disk=2)
    short = [prompt(1000 * i, 3) for i in range(12)]  # 11 slots in all: prompts of 3 blocks
    for tokens in short[:2]:
        store.put(tokens, kv_for(store.layout, tokens))
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 4096, hard))
    served = 0
    for tokens in short[2:]:
        store.put(tokens, kv_for(store.layout, tokens))
        served += verify_served(store, [tokens]).blocks
    failures = settled(store).stats()["disk"]["commit_failures"]
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    settled(store)
    on_disk = sorted(k.hex() for k in disk_keys(store))
    crash_image(Path(store_dir), Path(store_dir + "-image"))
    store.close()
    return {"failures": failures, "on_disk": on_disk, "served": served}


def recorded(store_dir: Path) -> set[bytes]:
    """The keys the manifest of `store_dir` records, read as they are (orphans included)."""
    env = lmdb.open(str(store_dir / "manifest"), subdir=True, readonly=True, lock=False, max_dbs=2)
    with env.begin() as txn:
        keys = {bytes(k) for k, _ in txn.cursor(db=env.open_db(b"blocks", txn=txn, create=False))}
    env.close()
    return keys


def test_manifest_that_cannot_grow(tmp_path: Path) -> None:
    result = run_in_child(_grow_limited, str(tmp_path / "store"))
    assert not result.crashed and result.error is None, result.error or f"child exit {result.exitcode}"
    assert result.value["failures"] > 0, "the manifest never hit the limit"
    on_disk = {bytes.fromhex(k) for k in result.value["on_disk"]}
    assert len(on_disk) == 2
    lost = on_disk - recorded(tmp_path / "store-image")
    assert not lost, f"{len(lost)} blocks on disk while the manifest could not grow were never recorded"
    with open_fault_store(tmp_path / "store-image", disk=2) as store:
        verify_served(store)
        still_usable(store, 6)
