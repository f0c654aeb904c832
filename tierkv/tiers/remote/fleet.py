"""A fleet of store nodes behind a load balancer: prefill saved with a shared remote tier vs each node alone.

The multi-turn chat workload of `tierkv replay` (users sharing a few system prompts, each
conversation growing turn by turn) is served by N stores, and every request goes to a store drawn
at random, as a load balancer without session affinity sends it. A node serves what its store
holds and computes the rest (synthetic KV, checked bit for bit on every hit). Alone, a node hits
only what it computed itself; with a shared remote tier (`url`, remote_write "through") every node
hits what any node computed.

Used by scripts/bench_fleet.py (the table) and asv_bench/benchmarks/bench_remote.py.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np

from ...cli.workload import SYNTHETIC_LAYOUT, ChatWorkload, replay
from ...config import StoreConfig
from ...namespace import Namespace
from ...store import BlockStore


@dataclass(frozen=True)
class FleetRun:
    """One fleet's pass over the workload: prompt tokens, those served from a store, blocks from the remote tier."""

    nodes: int
    shared: bool
    prompt_tokens: int
    served_tokens: int
    remote_hits: int  # blocks the shared tier served (0 alone)
    seconds: float

    @property
    def saved(self) -> float:
        """The share of prefill served from a store instead of computed."""
        return self.served_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def run_fleet(workload: ChatWorkload, nodes: int, host_bytes: int, url: str | None, seed: int) -> FleetRun:
    """Serve `workload` with `nodes` stores of `host_bytes` each, sharing the cluster at `url` (None: each alone)."""
    if nodes < 1:
        raise ValueError(f"nodes must be at least 1, got {nodes}")
    model = f"fleet-{uuid.uuid4().hex[:8]}"  # a namespace per run: runs never see each other's blocks
    config = StoreConfig(device_bytes=0, host_bytes=host_bytes, device="cpu", remote_url=url)
    stores = [BlockStore(SYNTHETIC_LAYOUT, Namespace(model=model), config) for _ in range(nodes)]
    rng = np.random.default_rng(seed)
    prompt = served = 0
    start = time.perf_counter()
    try:
        for request in workload.requests():
            store = stores[int(rng.integers(nodes))]
            result = replay(store, [request])
            prompt += result.prompt_tokens
            served += result.served_tokens
            if url is not None:  # write-through is asynchronous: let the next node see this turn
                store.tiers[-1].writer.drain(60)  # type: ignore[attr-defined]
        remote = sum(s.stats()["tiers"]["remote"]["hits"] for s in stores) if url is not None else 0
    finally:
        for s in stores:
            s.close()
    return FleetRun(nodes, url is not None, prompt, served, remote, time.perf_counter() - start)
