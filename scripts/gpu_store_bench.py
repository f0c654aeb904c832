"""Store-level GPU measurements in one run: the disk tier through kvikio and POSIX, warm restart,
and put/get/demotion of a store whose device tier is on the GPU. Prints a markdown table and
writes it to the file named on the command line.

    PYTHONUNBUFFERED=1 python scripts/gpu_store_bench.py out.md [scratch-dir]

The disk figures reuse the asv benchmark classes of asv_bench/benchmarks/bench_disk.py, so the
GPU machine and the CPU machine measure the same thing.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "asv_bench"))

from benchmarks import bench_disk  # noqa: E402

from tierkv import BlockStore, KVLayout, Namespace, StoreConfig  # noqa: E402
from tierkv.tiers.disk import kvikio_status  # noqa: E402

rows: list[str] = []


def disk_rows() -> None:
    rows.append("| disk path | block | write GB/s | read GB/s | write / O_DIRECT | read / O_DIRECT |")
    rows.append("| --- | --- | --- | --- | --- | --- |")
    ios = ["posix"] + (["kvikio"] if kvikio_status()[0] else [])
    for io in ios:
        for block in bench_disk.DiskThroughput.params:
            b = bench_disk.DiskThroughput()
            b.setup(block)
            b.tier.close()
            b.tier = bench_disk.disk_tier(b.dir, b.n, block, io=io)
            try:
                w = b._write_all()
                r = b._read_all()
                rows.append(f"| {b.tier.io_path} | {block >> 10} KiB | {w / 1e9:.2f} | {r / 1e9:.2f} | "
                            f"{w / b.base_write:.2f} | {r / b.base_read:.2f} |")
            finally:
                b.teardown(block)
            print(rows[-1])


def restart_row() -> None:
    r = bench_disk.WarmRestart()
    directory = r.setup_cache()
    rows.append("")
    what = [("open + first hit + close", r.time_open_and_first_hit), ("open alone (clean close before)", r.time_open),
            ("open after a crash (manifest rebuilt)", r.time_open_after_crash)]
    for name, bench in what:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            bench(directory)
            times.append(time.perf_counter() - t)
            r.teardown(directory)  # closes the store the open-only benchmarks leave open
        rows.append(f"warm restart, {bench_disk.RESTART_BLOCKS} blocks in the manifest: {name} "
                    f"median {statistics.median(times) * 1e3:.0f} ms (runs: {', '.join(f'{x * 1e3:.0f}' for x in times)} ms)")
        print(rows[-1])


def store_rows() -> None:
    layout = KVLayout(num_layers=32, kv_factor=2, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_tokens=16)
    bb = layout.block_bytes  # 2 MiB: a Llama-3-8B block of 16 tokens
    n = 512
    kv = torch.randn((n, *layout.block_shape), device="cuda").to(layout.dtype)
    tokens = torch.arange(n * 16)
    rows.append("")
    rows.append("| store on the GPU (2 MiB blocks, 512 a call) | GB/s |")
    rows.append("| --- | --- |")
    with BlockStore(layout, Namespace(model="bench"), StoreConfig(device_bytes=2 * n * bb, host_bytes=2 * n * bb)) as store:
        torch.cuda.synchronize()
        t = time.perf_counter()
        store.put(tokens, kv)
        torch.cuda.synchronize()
        rows.append(f"| put (device tier) | {n * bb / (time.perf_counter() - t) / 1e9:.1f} |")
        t = time.perf_counter()
        got = store.get(tokens)
        torch.cuda.synchronize()
        rows.append(f"| get (device tier) | {n * bb / (time.perf_counter() - t) / 1e9:.1f} |")
        assert torch.equal(got, kv)
        other = torch.arange(10**6, 10**6 + 2 * n * 16)
        kv2 = torch.randn((2 * n, *layout.block_shape), device="cuda").to(layout.dtype)
        torch.cuda.synchronize()
        t = time.perf_counter()
        store.put(other, kv2)  # demotes the first 512 blocks to pinned host
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rows.append(f"| put demoting 512 blocks to pinned host (1 GiB in, 1 GiB down, checksummed) | {2 * n * bb / dt / 1e9:.1f} |")
        t = time.perf_counter()
        got = store.get(tokens)  # promoted from host: verified, then copied up
        torch.cuda.synchronize()
        rows.append(f"| get from pinned host with checksum verification and promotion | {n * bb / (time.perf_counter() - t) / 1e9:.1f} |")
        assert torch.equal(got, kv)
    for line in rows[-6:]:
        print(line)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: gpu_store_bench.py OUT.md [scratch-dir]")
    if len(sys.argv) > 2:
        bench_disk.BENCH_DIR = sys.argv[2]
        Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = bench_disk.BENCH_DIR
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    rows.append(f"device: {gpu}, torch {torch.__version__}; {kvikio_status()[1]}")
    rows.append("")
    disk_rows()
    restart_row()
    if torch.cuda.is_available():
        store_rows()
    Path(sys.argv[1]).write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
