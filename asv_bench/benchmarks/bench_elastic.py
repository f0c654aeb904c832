"""The elastic device tier on CPU (host page backend): page costs, shrinking, and the two-model scenario.

- Map + unmap of 2 MiB host pages (mprotect / madvise), per page.
- Allocation on the elastic tier when every slot needs a new page, and when all pages are mapped:
  the cost of the page policy over a fixed tier's free list.
- `shrink_device` of a CPU store by 32 MiB of 64 KiB blocks (demotion to host, checksums included),
  as GB/s.
- Two models sharing a 64 MiB budget in alternating bursts (`tierkv.cli.bursts.run_bursts` with its
  default sizes): share of prompt tokens served from the device tier and tokens recomputed, static
  50/50 split vs elastic. Deterministic counts, computed once (`setup_cache`).

The GPU figures (CUDA VMM page latency, 1 GiB shrink to pinned host, the same scenario on the
GPU) come from `scripts/bench_elastic_gpu.py`.
"""

import statistics
import time

import numpy as np

from tierkv import BlockStore, Namespace, StoreConfig
from tierkv.cli.bursts import BurstScenario, run_bursts
from tierkv.keys import chain_keys
from tierkv.tiers.elastic import ElasticTier
from tierkv.tiers.elastic.vmm import HostPages
from tierkv.cli.workload import SYNTHETIC_LAYOUT, synthetic_kv

MiB = 1 << 20
PAGE = 2 * MiB
LAYOUT = SYNTHETIC_LAYOUT  # 64 KiB blocks


class HostPageMapUnmap:
    """Map then unmap 64 pages of 2 MiB, one call each."""

    def setup(self):
        self.pages = HostPages(64 * PAGE, PAGE)

    def teardown(self):
        self.pages.close()

    def time_map_unmap_64_pages(self):
        for p in range(64):
            self.pages.map([p])
            self.pages.unmap([p])


class ElasticAllocate:
    """Allocate and free 1024 slots of 64 KiB: on fresh pages (32 mapped and unmapped each time)
    and on pages kept mapped by one allocated slot each."""

    def setup(self):
        self.fresh = ElasticTier("device", 1024, LAYOUT.block_bytes, HostPages(1024 * LAYOUT.block_bytes, PAGE))
        self.mapped = ElasticTier("device", 1056, LAYOUT.block_bytes, HostPages(1056 * LAYOUT.block_bytes, PAGE))
        slots = self.mapped.allocate(1056)  # 33 pages
        self.mapped.free([s for s in slots if s % 32])  # one slot a page stays: 1023 free slots on mapped pages

    def teardown(self):
        self.fresh.close()
        self.mapped.close()

    def time_allocate_free_mapping_pages(self):
        self.fresh.free(self.fresh.allocate(1024))

    def time_allocate_free_on_mapped_pages(self):
        self.mapped.free(self.mapped.allocate(1023))


def filled_store() -> BlockStore:
    config = StoreConfig(device="cpu", device_bytes=64 * MiB, host_bytes=64 * MiB, device_elastic=True)
    store = BlockStore(LAYOUT, Namespace(model="shrink"), config)
    seed = store.namespace.digest(LAYOUT)
    for i in range(8):  # 8 prompts of 128 blocks: 64 MiB
        tokens = np.arange(i * 10**6, i * 10**6 + 128 * LAYOUT.block_tokens, dtype=np.int32)
        store.put(tokens, synthetic_kv(chain_keys(seed, tokens, LAYOUT.block_tokens), LAYOUT))
    return store


def shrink_trial() -> float:
    with filled_store() as store:
        start = time.perf_counter()
        released = store.shrink_device(32 * MiB)
        return released / (time.perf_counter() - start)


class Shrink32MiB:
    """`shrink_device` from 64 MiB to 32 MiB of a CPU store (blocks demoted to host), GB/s over 5 fresh stores."""

    timeout = 300
    unit = "GB/s"

    def track_shrink_GBps(self):
        return statistics.median(shrink_trial() for _ in range(5)) / 1e9


class TwoModelBursts:
    """Static 50/50 split vs elastic budget, two models in alternating bursts, on CPU."""

    timeout = 900
    unit = "fraction or tokens"

    def setup_cache(self):
        scenario = BurstScenario()
        return {mode: run_bursts(scenario, mode) for mode in ("static", "elastic")}

    def track_device_token_share_static(self, outcomes):
        return outcomes["static"].device_tokens / outcomes["static"].prompt_tokens

    def track_device_token_share_elastic(self, outcomes):
        return outcomes["elastic"].device_tokens / outcomes["elastic"].prompt_tokens

    def track_recomputed_tokens_static(self, outcomes):
        return outcomes["static"].recomputed_tokens

    def track_recomputed_tokens_elastic(self, outcomes):
        return outcomes["elastic"].recomputed_tokens

    def track_recomputed_elastic_over_static(self, outcomes):
        return outcomes["elastic"].recomputed_tokens / outcomes["static"].recomputed_tokens
