"""Shared by the remote tier's tests: a real Redis Cluster on loopback, stores on it, and their layout.

`LocalCluster` (tierkv/tiers/remote/local_cluster.py) starts real redis-server processes with
cluster-enabled yes on free ports and joins them with `redis-cli --cluster create`; nothing is
mocked. Without redis-server on PATH the tests are skipped with the reason (.ci/run installs it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from conftest import BLOCK_TOKENS
from tierkv import BlockStore, KVLayout, Namespace, StoreConfig
from tierkv.tiers.remote.local_cluster import LocalCluster, redis_available

# 2 KiB blocks of 4 tokens: big enough to be real values, small enough for hundreds per test.
LAYOUT = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=32, dtype=torch.bfloat16, block_tokens=BLOCK_TOKENS)


def start_cluster(**kwargs: Any) -> Iterator[LocalCluster]:
    """A started LocalCluster for a fixture (skips the test where redis-server is missing)."""
    missing = redis_available()
    if missing:
        pytest.skip(missing)
    with LocalCluster(**kwargs) as cluster:
        yield cluster


def unique_model() -> str:
    """A namespace of its own per test: tests share a cluster but never each other's blocks."""
    return f"remote-test-{uuid.uuid4().hex[:10]}"


def remote_store(cluster: LocalCluster, model: str, host_blocks: int = 16, url: str | None = None,
                 **extra: Any) -> BlockStore:
    """A CPU store: no device tier, `host_blocks` of host memory, then the remote tier on `cluster`."""
    bb = LAYOUT.block_bytes
    config = StoreConfig(device_bytes=0, host_bytes=host_blocks * bb, device="cpu",
                         remote_url=url or cluster.url(nodes=len(cluster.nodes)),
                         **{"remote_timeout_s": 0.5, **extra})
    return BlockStore(LAYOUT, Namespace(model=model), config)


def remote(store: BlockStore) -> Any:
    return store.tiers[store.tier_names.index("remote")]


def published(store: BlockStore) -> None:
    """Wait until the store's queued remote writes are sent (write-through is asynchronous)."""
    assert remote(store).writer.drain(30), "remote writes still queued after 30 s"
