"""Disk tier: host <-> disk throughput against an O_DIRECT sequential baseline, and warm restart.

Each throughput benchmark measures the baseline in the same run, on the same file system, and
reports the ratio, so the figure means the same on any disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from tierkv import BlockStore, KVLayout, Namespace, StoreConfig
from tierkv.tiers.disk import DiskTier
from tierkv.tiers.disk.files import aligned_empty
from tierkv.tiers.disk.vetting import MARK

TOTAL_BYTES = 256 << 20
BENCH_DIR = os.environ.get("TIERKV_BENCH_DIR")  # default: the system temp dir


def _baseline(path: Path, nbytes: int, chunk: int = 8 << 20, threads: int = 4) -> tuple[float, float]:
    """(write, read) bytes/s of sequential O_DIRECT I/O in 8 MiB requests, `threads` in flight.

    The same queue depth as the tier's I/O pool, so the ratio compares request patterns, not
    parallelism.
    """
    bufs = [aligned_empty(chunk) for _ in range(threads)]
    for b in bufs:
        b[:] = 7
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0)
    fd = os.open(path, flags, 0o644)
    offsets = list(range(0, nbytes, chunk))
    try:
        os.posix_fallocate(fd, 0, nbytes)
        with ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            list(pool.map(lambda i: os.pwrite(fd, bufs[i % threads], offsets[i]), range(len(offsets))))
            os.fdatasync(fd)
            write = nbytes / (time.perf_counter() - t)
            t = time.perf_counter()
            list(pool.map(lambda i: os.preadv(fd, [bufs[i % threads]], offsets[i]), range(len(offsets))))
            read = nbytes / (time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return write, read


def disk_tier(directory: Path, num_slots: int, block_bytes: int, io: str = "auto") -> DiskTier:
    """A disk tier alone, outside a store, of `num_slots` blocks of `block_bytes` (a multiple of 64 KiB)."""
    layout = KVLayout(num_layers=1, kv_factor=2, num_kv_heads=1, head_dim=block_bytes // 64, dtype=torch.bfloat16,
                      block_tokens=16)
    assert layout.block_bytes == block_bytes
    config = StoreConfig(device="cpu", disk_path=str(directory), disk_bytes=num_slots * block_bytes, disk_io=io, io_threads=4)
    return DiskTier(config, layout, Namespace(model="bench-disk"))


class DiskThroughput:
    """host -> disk and disk -> host through `DiskTier`, in batches of 64 blocks.

    Slots come in the order the tier's allocator hands them out, as in the store (consecutive
    runs merge into large requests); reads go back in a shuffled batch order.
    """

    params = [256 << 10, 2 << 20]
    param_names = ["block_bytes"]
    timeout = 300
    number = 1
    repeat = 1

    def setup(self, block_bytes: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tierkv-bench-", dir=BENCH_DIR))
        self.n = TOTAL_BYTES // block_bytes
        self.tier = disk_tier(self.dir, self.n, block_bytes)
        self.rows = torch.randint(0, 256, (64, block_bytes), dtype=torch.uint8)
        batches = [self.tier.allocate(64) for _ in range(-(-self.n // 64))]
        self.tier.free([s for batch in batches for s in batch])
        np.random.default_rng(0).shuffle(batches[1:])  # reads revisit batches out of order
        self.order = [s for batch in batches for s in batch]
        self.base_write, self.base_read = _baseline(self.dir / "baseline.bin", TOTAL_BYTES)

    def teardown(self, block_bytes: int) -> None:
        self.tier.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _write_all(self) -> float:
        """Through the write-behind queue, as the store demotes to disk; timed until durable."""
        t = time.perf_counter()
        for i in range(0, self.n, 64):
            slots = self.order[i : i + 64]
            self.tier.write_behind(slots, self.rows[: len(slots)])
        self.tier.queue.drain()
        self.tier.queue.take_results()
        return TOTAL_BYTES / (time.perf_counter() - t)

    def _read_all(self) -> float:
        t = time.perf_counter()
        for i in range(0, self.n, 64):
            self.tier.read(self.order[i : i + 64])
        return TOTAL_BYTES / (time.perf_counter() - t)

    def track_write_ratio_to_odirect(self, block_bytes: int) -> float:
        return self._write_all() / self.base_write

    def track_read_ratio_to_odirect(self, block_bytes: int) -> float:
        self._write_all()
        return self._read_all() / self.base_read

    def track_write_gbps(self, block_bytes: int) -> float:
        return self._write_all() / 1e9

    def track_read_gbps(self, block_bytes: int) -> float:
        self._write_all()
        return self._read_all() / 1e9

    track_write_ratio_to_odirect.unit = "ratio"
    track_read_ratio_to_odirect.unit = "ratio"
    track_write_gbps.unit = "GB/s"
    track_read_gbps.unit = "GB/s"


RESTART_BLOCKS = 100_000
RESTART_LAYOUT = KVLayout(num_layers=1, kv_factor=1, num_kv_heads=1, head_dim=64, dtype=torch.float16, block_tokens=16)


def _restart_config(directory: str) -> StoreConfig:
    bb = RESTART_LAYOUT.block_bytes
    return StoreConfig(device_bytes=64 * bb, host_bytes=64 * bb, device="cpu", disk_path=directory,
                       disk_bytes=(RESTART_BLOCKS + 1000) * 4096, durability="none")


class WarmRestart:
    """Open a store whose manifest holds 100k blocks and serve the first hit from disk."""

    timeout = 600
    number = 1
    repeat = 3

    def setup_cache(self) -> str:
        directory = tempfile.mkdtemp(prefix="tierkv-restart-", dir=BENCH_DIR)
        rng = np.random.default_rng(0)
        chain = 1000
        kv = torch.zeros((chain, *RESTART_LAYOUT.block_shape), dtype=RESTART_LAYOUT.dtype)
        with BlockStore(RESTART_LAYOUT, Namespace(model="restart"), _restart_config(directory)) as store:
            for _ in range(RESTART_BLOCKS // chain):
                tokens = rng.integers(0, 50_000, chain * 16, dtype=np.int32)
                store.put(tokens, kv)
            np.save(Path(directory) / "last_prompt.npy", tokens)
        return directory

    def time_open_and_first_hit(self, directory: str) -> None:
        """Open, serve the first hit, close (the close journals recency and marks the manifest clean)."""
        tokens = np.load(Path(directory) / "last_prompt.npy")
        with BlockStore(RESTART_LAYOUT, Namespace(model="restart"), _restart_config(directory)) as store:
            assert store.get(tokens[:64]).shape[0] == 4

    def time_open(self, directory: str) -> None:
        """The open alone, after a clean close: what a restarting server waits for (closed in teardown)."""
        self._store = BlockStore(RESTART_LAYOUT, Namespace(model="restart"), _restart_config(directory))

    def time_open_after_crash(self, directory: str) -> None:
        """The open after a crash (no clean mark): the manifest is read by a child process and rebuilt first."""
        (Path(directory) / MARK).unlink(missing_ok=True)
        self._store = BlockStore(RESTART_LAYOUT, Namespace(model="restart"), _restart_config(directory))

    def teardown(self, directory: str) -> None:
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()
            self._store = None
