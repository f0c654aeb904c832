"""Write a tiny disk-tier store directory, for the on-disk format compatibility test.

`tests/test_disk_format.py` opens the fixture this script wrote with the code of today and
checks that every block comes back bit-exact: a refactor must keep stores written by older
code readable. The committed fixture `tests/data/disk_store_b6f97db` was written by commit
b6f97db (main before the layout refactor). To regenerate it, run this script with the
*old* code on the import path, not the checkout it lives in:

    git worktree add /tmp/tierkv-b6f97db b6f97db
    PYTHONPATH=/tmp/tierkv-b6f97db python scripts/make_disk_fixture.py tests/data/disk_store_b6f97db
    git worktree remove --force /tmp/tierkv-b6f97db

The script prints `tierkv.__file__` so you can check which code wrote the store. It uses the
public API only (`BlockStore`, `KVLayout`, `Namespace`, `StoreConfig`), so it runs against
any version that has it. What it writes into DIR:

    store/            the store directory: data000.bin (preallocated to DISK_BYTES) and
                      manifest/data.mdb; the lock files (LOCK, manifest/lock.mdb) are removed,
                      every open recreates them
    expected.json     layout, namespace, config, the prompts (tokens, tenant) and the sha256
                      of each block's KV bytes as `get` must return them

The layout, namespace and config below are repeated in the test: change them in both places.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tierkv import BlockStore, KVLayout, Namespace, StoreConfig

LAYOUT = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=8, dtype=torch.float16, block_tokens=4)
MODEL = "fixture/model"
DISK_BYTES = 64 << 10  # 16 slots of 4 KiB: the data file is preallocated to this size
HOST_BYTES = 16 << 10  # 16 blocks of 1 KiB


def fixture_config(disk_path: str | os.PathLike[str]) -> StoreConfig:
    """CPU only, no device tier: every block lives in host memory until close() flushes it."""
    return StoreConfig(
        device="cpu", device_bytes=0, host_bytes=HOST_BYTES, pin_host=False,
        disk_path=os.fspath(disk_path), disk_bytes=DISK_BYTES, durability="batch",
        flush_on_close=True, disk_io="posix", io_threads=1,
    )


# Prompts: A (4 blocks), B sharing A's first 2 blocks then 2 of its own and a partial block
# (not stored), C under tenant "t1" (3 blocks). Each block's KV is a function of a block id, so
# the blocks B shares with A get the same KV in both puts.
PROMPTS = [
    {"name": "A", "tokens": list(range(16)), "tenant": None, "block_ids": [0, 1, 2, 3]},
    {"name": "B", "tokens": list(range(8)) + [500 + i for i in range(10)], "tenant": None, "block_ids": [0, 1, 4, 5]},
    {"name": "C", "tokens": [1000 + i for i in range(12)], "tenant": "t1", "block_ids": [6, 7, 8]},
]


def block_kv(block_id: int) -> torch.Tensor:
    """Deterministic KV of one block: small integers and halves, exact in float16, no RNG."""
    n = 1
    for d in LAYOUT.block_shape:
        n *= d
    values = (torch.arange(n, dtype=torch.int64) * 7 + block_id * 131) % 4093 - 2046
    return (values.to(torch.float32) / 2).to(LAYOUT.dtype).reshape(LAYOUT.block_shape)


def prompt_kv(block_ids: list[int]) -> torch.Tensor:
    return torch.stack([block_kv(i) for i in block_ids])


def block_sha256(kv: torch.Tensor) -> list[str]:
    """sha256 of each block's bytes (`kv` is `[n, *block_shape]`)."""
    rows = kv.contiguous().view(torch.uint8).reshape(kv.shape[0], -1)
    return [hashlib.sha256(row.numpy().tobytes()).hexdigest() for row in rows]


def _source_commit(package_file: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(Path(package_file).parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(Path(package_file).parent), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def write_store(directory: Path) -> list[dict]:
    store = BlockStore(LAYOUT, Namespace(model=MODEL), fixture_config(directory))
    try:
        for p in PROMPTS:
            store.put(p["tokens"], prompt_kv(p["block_ids"]), tenant=p["tenant"])
        prompts = []
        for p in PROMPTS:
            kv = store.get(p["tokens"], device="cpu", tenant=p["tenant"])
            assert torch.equal(kv.view(torch.int16), prompt_kv(p["block_ids"]).view(torch.int16)), p["name"]
            full = len(p["tokens"]) // LAYOUT.block_tokens
            assert store.match(p["tokens"], tenant=p["tenant"]) == full * LAYOUT.block_tokens, p["name"]
            prompts.append({
                "name": p["name"], "tokens": p["tokens"], "tenant": p["tenant"],
                "matched_tokens": full * LAYOUT.block_tokens, "block_sha256": block_sha256(kv),
            })
    finally:
        store.close()  # flush_on_close: every block goes to disk, then the manifest commit
    return prompts


def self_check(directory: Path, prompts: list[dict]) -> int:
    """Reopen a copy (opening writes to a store) with the same code; returns the recovered blocks."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "store"
        shutil.copytree(directory, copy)
        with BlockStore(LAYOUT, Namespace(model=MODEL), fixture_config(copy)) as store:
            for p in prompts:
                kv = store.get(p["tokens"], device="cpu", tenant=p["tenant"])
                assert block_sha256(kv) == p["block_sha256"], f"prompt {p['name']} did not survive a reopen"
            return store.stats()["disk"]["recovered_blocks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="fixture directory to create (must not exist, or use --force)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args()
    import tierkv

    print(f"tierkv from {tierkv.__file__}")
    if args.out.exists():
        if not args.force:
            sys.exit(f"{args.out} exists; pass --force to replace it")
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    store_dir = args.out / "store"
    prompts = write_store(store_dir)
    for lock in (store_dir / "LOCK", store_dir / "manifest" / "lock.mdb"):
        lock.unlink(missing_ok=True)  # recreated by every open; the LOCK file holds a pid
    files = {str(p.relative_to(store_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(store_dir.rglob("*")) if p.is_file()}
    recovered = self_check(store_dir, prompts)
    blocks = len({h for p in prompts for h in p["block_sha256"]})
    assert recovered == blocks, f"reopen recovered {recovered} blocks, {blocks} were written"
    expected = {
        "written_by": {"tierkv_version": getattr(tierkv, "__version__", None), "commit": _source_commit(tierkv.__file__)},
        "layout": LAYOUT.to_dict(),
        "namespace": {"model": MODEL},
        "config": {k: v for k, v in fixture_config("store").to_dict().items()
                   if k in ("device", "device_bytes", "host_bytes", "pin_host", "disk_bytes", "durability", "disk_io")},
        "blocks": blocks,
        "files": files,
        "prompts": prompts,
    }
    (args.out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out}: {blocks} blocks, {len(files)} store files, {size} bytes")


if __name__ == "__main__":
    main()
