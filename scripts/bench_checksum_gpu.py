"""GPU block checksum throughput: `checksum_rows_gpu` over >= 1 GiB of device memory per block size.

    PYTHONUNBUFFERED=1 python scripts/bench_checksum_gpu.py [checksum.md]

For 64 KiB, 256 KiB, 2 MiB and 32 MiB blocks, over a 1 GiB pool: the whole call (leaf kernel +
root kernel), timed alone (events around one call: the GPU waits for Python to queue it) and
back to back (events around 10 calls: Python queues the next while the GPU runs, as in a
pipelined store); all rows in order, and a random permutation through a device `rows` tensor;
and the leaf kernel alone. GB/s = bytes hashed / median time (warm-up first). The reference is
a device-to-device copy of the same 1 GiB in the same run, given as bytes copied per second
(each byte read once and written once; the checksum only reads). Also: the host time to queue
one call, a small batch (16 x 64 KiB) end to end, a grid-size sweep at 2 MiB, and a pinned
host pool hashed over UVA (PCIe speed). A few rows of each pool are checked against the CPU
function before anything is timed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tierkv.integrity import checksum_block_slots  # noqa: E402
from tierkv.ops import checksum as ck  # noqa: E402
from tierkv.ops.cuda_build import i32, i64, module, ptr  # noqa: E402
from tierkv.ops.kernels import access_width  # noqa: E402

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
TOTAL = 1 * GiB
SIZES = [64 * KiB, 256 * KiB, 2 * MiB, 32 * MiB]
REPS = 20
lines: list[str] = []


def out(text: str = "") -> None:
    print(text, flush=True)
    lines.append(text)


def size_name(b: int) -> str:
    return f"{b // MiB} MiB" if b >= MiB else f"{b // KiB} KiB"


def timed(fn: Callable[[], object], stream: torch.cuda.Stream, reps: int = REPS) -> float:
    """Median seconds of `fn` between events on `stream`, after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        fn()
        b.record(stream)
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def back_to_back(fn: Callable[[], object], stream: torch.cuda.Stream, calls: int = 10, reps: int = 5) -> float:
    """Median seconds per call of `calls` calls queued back to back between two events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        for _ in range(calls):
            fn()
        b.record(stream)
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


def leaves_only(pool: torch.Tensor, leaves: torch.Tensor, stream: torch.cuda.Stream, ctas: int | None = None) -> None:
    m, n = pool.shape
    k = -(-n // ck.SECTOR_BYTES)
    mod = module(ck.SOURCE, pool.device)
    grid = max(1, min(-(-m * k // (ck.THREADS // 4)), ctas or mod.num_sms * ck.CTAS_PER_SM))
    mod.launch(f"tierkv_checksum_leaves_w{access_width(pool.data_ptr(), n)}", grid, ck.THREADS,
               [ptr(pool), ptr(0), i64(n), i32(k), i32(m), ptr(leaves)], stream)


def check(pool: torch.Tensor, stream: torch.cuda.Stream) -> None:
    rows = [0, pool.shape[0] // 2, pool.shape[0] - 1]
    got = ck.as_unsigned(ck.checksum_rows_gpu(pool, rows, stream))
    want = checksum_block_slots(pool[rows].cpu(), range(len(rows)))
    if got != want:
        raise SystemExit(f"GPU checksum differs from the CPU function for {size_name(pool.shape[1])} blocks")


def main() -> None:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "?"
    out(f"# Block checksum throughput ({ck.TREE_CHECKSUM})")
    out()
    out(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, commit {commit}; "
        f"{TOTAL // GiB} GiB per size; one call: median of {REPS}, back to back: median of 5 x 10 calls, after warm-up")
    out()
    stream = torch.cuda.current_stream()
    src = torch.randint(0, 256, (TOTAL,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy = back_to_back(lambda: dst.copy_(src), stream)
    dst = torch.empty(0, device=dev)  # give the copy's 1 GiB back
    copy_gbs = TOTAL / t_copy / 1e9
    out(f"device-to-device copy of 1 GiB: {copy_gbs:.0f} GB/s copied ({2 * copy_gbs:.0f} GB/s read + written)")
    out()
    results: dict[str, object] = {"device": props.name, "commit": commit, "copy_gbs": copy_gbs, "sizes": {}}
    out("| block | blocks | GB/s, one call | GB/s, back to back | / copy | random rows, back to back | leaf kernel alone |")
    out("| --- | --- | --- | --- | --- | --- | --- |")
    for n in SIZES:
        m = TOTAL // n
        pool = src.view(m, n)
        check(pool, stream)
        perm = torch.randperm(m, device=dev)
        leaves = torch.empty(m * (n // ck.SECTOR_BYTES), dtype=torch.int64, device=dev)
        call = partial(ck.checksum_rows_gpu, pool, None, stream)
        t_one = timed(call, stream)
        t_b2b = back_to_back(call, stream)
        t_perm = back_to_back(partial(ck.checksum_rows_gpu, pool, perm, stream), stream)
        t_leaf = back_to_back(partial(leaves_only, pool, leaves, stream), stream)
        gbs = TOTAL / t_b2b / 1e9
        row = {"blocks": m, "one_call_gbs": TOTAL / t_one / 1e9, "gbs": gbs, "ratio_to_copy": gbs / copy_gbs,
               "random_rows_gbs": TOTAL / t_perm / 1e9, "leaf_gbs": TOTAL / t_leaf / 1e9}
        results["sizes"][size_name(n)] = row  # type: ignore[index]
        out(f"| {size_name(n)} | {m} | {row['one_call_gbs']:.0f} | {gbs:.0f} | {gbs / copy_gbs:.2f} | "
            f"{row['random_rows_gbs']:.0f} | {row['leaf_gbs']:.0f} |")
    out()
    small = src[: 16 * 64 * KiB].view(16, 64 * KiB)
    host_us = []
    for _ in range(50):
        t0 = time.perf_counter()
        ck.checksum_rows_gpu(small, None, stream)
        host_us.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
    t_small = timed(partial(ck.checksum_rows_gpu, small, None, stream), stream)
    results["host_us_per_call"] = statistics.median(host_us)
    results["small_batch_us"] = t_small * 1e6
    out(f"host time to queue one call: {statistics.median(host_us):.0f} us (median); 16 x 64 KiB end to end "
        f"(events around one call): {t_small * 1e6:.0f} us")
    n = 2 * MiB
    pool = src.view(TOTAL // n, n)
    leaves = torch.empty(TOTAL // ck.SECTOR_BYTES, dtype=torch.int64, device=dev)
    sweep = []
    for per_sm in (2, 3, 4, 8, 16, 64):
        ctas = per_sm * props.multi_processor_count
        t = back_to_back(partial(leaves_only, pool, leaves, stream, ctas), stream)
        sweep.append(f"{per_sm}/SM {TOTAL / t / 1e9:.0f}")
    t = back_to_back(lambda: leaves_only(pool, leaves, stream, 1 << 30), stream)
    sweep.append(f"one CTA per 64 sectors {TOTAL / t / 1e9:.0f}")
    out("leaf kernel GB/s by grid size (2 MiB blocks): " + ", ".join(sweep))
    results["grid_sweep"] = sweep
    host_bytes = 256 * MiB
    host = torch.randint(0, 256, (host_bytes // n, n), dtype=torch.uint8).pin_memory()
    check(host, stream)
    t = timed(lambda: ck.checksum_rows_gpu(host, None, stream), stream, reps=5)
    results["pinned_host_uva_gbs"] = host_bytes / t / 1e9
    out(f"pinned host pool over UVA, 128 x 2 MiB: {host_bytes / t / 1e9:.1f} GB/s")
    if dest:
        dest.write_text("\n".join(lines) + "\n")
        dest.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
