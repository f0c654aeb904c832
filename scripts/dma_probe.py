"""Probe: do copy-engine batches of both directions overlap, and where does a verified save/load spend GPU time?

    PYTHONUNBUFFERED=1 python scripts/dma_probe.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_path_bench import PROMPT, gpu_time, layout, prompt, store, vllm_engine  # noqa: E402

from tierkv.ops import dma  # noqa: E402

MiB = 1 << 20


def timed(fn) -> float:
    """Median ms of `fn` with its GPU work (the path bench's `gpu_time`)."""
    return gpu_time(fn) * 1e3


def main() -> None:
    n, row = 128, 2 * MiB
    dev = torch.empty((n, row), dtype=torch.uint8, device="cuda")
    dev2 = torch.empty((n, row), dtype=torch.uint8, device="cuda")
    host = torch.empty((n, row), dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty((n, row), dtype=torch.uint8, pin_memory=True)
    perm = torch.randperm(n)
    d2h = dma.entries(host.data_ptr(), perm, dev.data_ptr(), torch.arange(n), row)
    h2d = dma.entries(dev2.data_ptr(), torch.arange(n), host2.data_ptr(), perm, row)
    down, up = dma.copy_stream(torch.device("cuda"), False), dma.copy_stream(torch.device("cuda"), True)
    a = timed(lambda: dma.memcpy_batch(*d2h, down))
    b = timed(lambda: dma.memcpy_batch(*h2d, up))
    c = timed(lambda: (dma.memcpy_batch(*d2h, down), dma.memcpy_batch(*h2d, up)))
    print(f"batch DMA 256 MiB: d2h {a:.2f} ms, h2d {b:.2f} ms, both queued at once {c:.2f} ms (x{2 * max(a, b) / c:.2f})")

    def per_entry():
        with torch.cuda.stream(down):
            for i in range(n):
                host[int(perm[i])].copy_(dev[i], non_blocking=True)
        with torch.cuda.stream(up):
            for i in range(n):
                dev2[i].copy_(host2[int(perm[i])], non_blocking=True)
    print(f"cudaMemcpyAsync per entry, both at once {timed(per_entry):.2f} ms")

    from torch.profiler import ProfilerActivity, profile
    lay = layout(16)
    pages = PROMPT // 16
    engine, _ = vllm_engine(lay, 2 * pages)
    table = torch.randperm(2 * pages)[:pages].tolist()
    with store(lay, 0) as s:
        s.save_from(engine, table, prompt(1))
        counter = iter(range(2, 10**6))
        ops = {"save_from": lambda: s.save_from(engine, table, prompt(next(counter))),
               "load_into": lambda: s.load_into(engine, table, prompt(1))}
        for name, fn in ops.items():
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
            print(f"== {name}: returns {1e3 * (t1 - t0):.2f} ms, done {1e3 * (t2 - t0):.2f} ms (profiled)")
            evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            cpu = [e for e in prof.events() if e.device_type != torch.autograd.DeviceType.CUDA
                   and e.name in ("cudaStreamSynchronize", "cuMemcpyBatchAsync", "cudaMemcpyAsync", "cuLaunchKernel",
                                  "cudaStreamWaitEvent", "cudaEventSynchronize", "cudaLaunchKernel")]
            start = min([e.time_range.start for e in prof.events()] or [0])
            rows = [(e.time_range.start - start, e.time_range.elapsed_us(), "GPU", e.name[:40]) for e in evs]
            rows += [(e.time_range.start - start, e.time_range.elapsed_us(), "cpu", e.name[:40]) for e in cpu]
            for t, d, kind, nm in sorted(rows)[:90]:
                print(f"  {t / 1e3:8.3f} ms  +{d / 1e3:7.3f}  {kind} {nm}")


if __name__ == "__main__":
    main()
