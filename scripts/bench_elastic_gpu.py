"""GPU measurements of the elastic device tier (docs/elastic.md); prints JSON lines, writes them to a file.

    PYTHONUNBUFFERED=1 python scripts/bench_elastic_gpu.py [out.json]

1. Map and unmap latency per VMM page (2 MiB on current GPUs): one page per call, and 256
   pages per call, each timed with the device idle.
2. Time to shrink a store by 1 GiB through demotion to pinned host (`BlockStore.shrink_device`),
   for 64 KiB and 1 MiB blocks, with the store's own device->host path (checksums included).
3. Two models sharing one GPU budget in alternating bursts, static 50/50 split vs elastic
   (`tierkv.cli.bursts.run_bursts`): tokens served from the device, device hit rate, tokens
   recomputed, and the elastic/static ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tierkv import BlockStore, KVLayout, Namespace, StoreConfig  # noqa: E402
from tierkv.cli.bursts import BurstScenario, run_bursts  # noqa: E402
from tierkv.keys import chain_keys  # noqa: E402
from tierkv.tiers.elastic.vmm import CudaPages, cuda_granularity  # noqa: E402
from tierkv.cli.workload import synthetic_kv  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
results: list[dict[str, object]] = []


def report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)
    results.append(fields)


def page_latency() -> None:
    gran = cuda_granularity(0)
    pages = CudaPages(512 * gran, torch.device("cuda"))
    one_map, one_unmap = [], []
    for p in range(256):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pages.map([p])
        one_map.append(time.perf_counter() - t0)
    for p in range(256):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pages.unmap([p])
        one_unmap.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pages.map(list(range(256)))
    batch_map = (time.perf_counter() - t0) / 256
    t0 = time.perf_counter()
    pages.unmap(list(range(256)))
    batch_unmap = (time.perf_counter() - t0) / 256
    pages.close()
    us = 1e6
    report(bench="page_latency", page_bytes=gran,
           map_us_median=round(statistics.median(one_map) * us, 1), map_us_p90=round(float(np.percentile(one_map, 90)) * us, 1),
           unmap_us_median=round(statistics.median(one_unmap) * us, 1),
           unmap_us_p90=round(float(np.percentile(one_unmap, 90)) * us, 1),
           map_us_per_page_in_batch_of_256=round(batch_map * us, 1),
           unmap_us_per_page_in_batch_of_256=round(batch_unmap * us, 1))


def shrink_1gib(block_bytes: int) -> None:
    layout = KVLayout(num_layers=block_bytes // (64 * 1024), kv_factor=2, num_kv_heads=2, head_dim=64,
                      dtype=torch.bfloat16, block_tokens=128)
    assert layout.block_bytes == block_bytes
    config = StoreConfig(device="cuda", device_bytes=2 * GiB + 64 * MiB, host_bytes=2 * GiB, device_elastic=True)
    with BlockStore(layout, Namespace(model=f"shrink-{block_bytes}"), config) as store:
        seed = store.namespace.digest(layout)
        per_prompt = 64 * MiB // block_bytes
        t0 = time.perf_counter()
        for i in range(32):  # 2 GiB
            tokens = np.arange(i * 10**6, i * 10**6 + per_prompt * layout.block_tokens, dtype=np.int32)
            store.put(tokens, synthetic_kv(chain_keys(seed, tokens, layout.block_tokens), layout, "cuda"))
        torch.cuda.synchronize()
        fill_s = time.perf_counter() - t0
        before = store.tiers[0].mapped_bytes
        t0 = time.perf_counter()
        released = store.shrink_device(before - GiB)
        torch.cuda.synchronize()
        shrink_s = time.perf_counter() - t0
        report(bench="shrink_1GiB_to_pinned_host", block_bytes=block_bytes, mapped_before=before, released=released,
               seconds=round(shrink_s, 4), GBps=round(released / shrink_s / 1e9, 2),
               demoted_bytes=store.stats()["elastic"]["demoted_bytes"], fill_2GiB_s=round(fill_s, 2))


def bursts(scenario: BurstScenario, label: str) -> None:
    outcomes = {}
    for mode in ("static", "elastic"):
        outcome = run_bursts(scenario, mode)
        outcomes[mode] = outcome
        report(bench="two_model_bursts", scenario=label, **outcome.to_dict())
    s, e = outcomes["static"], outcomes["elastic"]
    report(bench="two_model_bursts_ratio", scenario=label,
           device_tokens_elastic_over_static=round(e.device_tokens / s.device_tokens, 3),
           recomputed_tokens_elastic_over_static=round(e.recomputed_tokens / s.recomputed_tokens, 3))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    report(bench="device", name=torch.cuda.get_device_name(0), torch=torch.__version__)
    steps = [
        ("page_latency", page_latency),
        ("shrink_64KiB", lambda: shrink_1gib(64 * 1024)),
        ("shrink_1MiB", lambda: shrink_1gib(1 << 20)),
        ("bursts_cpu_sizes", lambda: bursts(replace(BurstScenario(), device="cuda"), "64 MiB budget (the CPU run's sizes)")),
        ("bursts_x4", lambda: bursts(replace(BurstScenario(), device="cuda", budget_bytes=256 * MiB, host_bytes=64 * MiB,
                                             min_bytes=32 * MiB, users_per_burst=32), "256 MiB budget")),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as e:  # report and go on: one GPU session runs every step
            report(bench=name, error=f"{type(e).__name__}: {e}")
    if out is not None:
        out.write_text("\n".join(json.dumps(r) for r in results) + "\n")


if __name__ == "__main__":
    main()
