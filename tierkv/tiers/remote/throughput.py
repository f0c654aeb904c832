"""The remote tier's throughput next to redis-benchmark's, on the same servers, with values of the same size.

A figure in GB/s says more about the machine than about tierkv; the ratio to what Redis's own C
client gets from the same cluster in the same run says how much of it tierkv uses. Both sides
get one client: tierkv one store (a batch of blocks, one pipeline per shard), redis-benchmark
`-c 1 -P 16` (sixteen commands in flight) over the same keyspace size. The runs alternate, so a
machine whose load changes (a shared CI box) shifts both sides alike, and each side's best run
is reported: interference from other work only ever slows a run down, so the best run is the
closest to what the code can do, on both sides alike.

- put: `BlockStore.put` into a store whose only tier with room is the remote one, until every
  SET was answered (checksums, headers, staging, the network).
- get: `BlockStore.get` of a store that starts cold (its index empty): the probe, the GETs, the
  verification of every payload against its checksum, and the output rows.
- read: the tier's `read_into` a reused buffer: the network path alone, as redis-benchmark
  measures it (it never allocates fresh memory for a reply).

Used by scripts/bench_remote.py (the table) and asv_bench/benchmarks/bench_remote.py.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass

import torch

from ...config import StoreConfig
from ...layout import KVLayout
from ...namespace import Namespace
from ...store import BlockStore
from .tier import RemoteTier


@dataclass(frozen=True)
class Throughput:
    """GB/s (10^9 bytes per second) of one block size, the best of the repeats."""

    block_bytes: int
    put: float
    get: float
    read: float
    redis_set: float
    redis_get: float

    @property
    def put_ratio(self) -> float:
        return self.put / self.redis_set

    @property
    def get_ratio(self) -> float:
        return self.get / self.redis_get

    @property
    def read_ratio(self) -> float:
        return self.read / self.redis_get


def block_layout(block_bytes: int) -> KVLayout:
    """A layout of `block_bytes` per block (a multiple of 64 KiB): 16 tokens of 8 KV heads of 128, bf16, per layer."""
    per_layer = 2 * 16 * 8 * 128 * 2
    if block_bytes % per_layer:
        raise ValueError(f"block_bytes must be a multiple of {per_layer}, got {block_bytes}")
    return KVLayout(num_layers=block_bytes // per_layer, kv_factor=2, num_kv_heads=8, head_dim=128,
                    dtype=torch.bfloat16, block_tokens=16)


def redis_benchmark(host: str, port: int, test: str, value_bytes: int, requests: int, cluster: bool,
                    password: str | None = None, pipeline: int = 16) -> float:
    """Bytes per second of `redis-benchmark -t test` with one client, `pipeline` commands in flight."""
    args = ["redis-benchmark", "-h", host, "-p", str(port), "-t", test, "-d", str(value_bytes), "-n", str(requests),
            "-r", str(requests), "-c", "1", "-P", str(pipeline), "-q"]
    if cluster:
        args.append("--cluster")
    if password is not None:
        args += ["-a", password]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600).stdout.replace("\r", "\n")
    found = re.findall(r"([0-9.]+) requests per second", out)
    if not found:
        raise RuntimeError(f"redis-benchmark printed no rate: {out[-500:]}")
    return float(found[-1]) * value_bytes


def _remote(store: BlockStore) -> RemoteTier:
    tier = store.tiers[-1]
    assert isinstance(tier, RemoteTier), "a store opened with remote_url has the remote tier last"
    return tier


def _store(url: str, layout: KVLayout, model: str) -> BlockStore:
    config = StoreConfig(device_bytes=0, host_bytes=0, device="cpu", remote_url=url, remote_timeout_s=10.0)
    return BlockStore(layout, Namespace(model=model), config)


def measure(url: str, host: str, port: int, cluster: bool, block_bytes: int, total_bytes: int = 256 << 20,
            repeats: int = 3, password: str | None = None) -> Throughput:
    """Alternating runs of tierkv and redis-benchmark on the servers of `url` (host:port: one of its nodes)."""
    layout = block_layout(block_bytes)
    n = max(8, total_bytes // block_bytes)
    nbytes = n * block_bytes
    kv = torch.randint(0, 256, (n, block_bytes), dtype=torch.uint8).view(layout.dtype).view(n, *layout.block_shape)
    model = f"throughput-{block_bytes}-{time.monotonic_ns()}"
    runs: dict[str, list[float]] = {k: [] for k in ("put", "get", "read", "redis_set", "redis_get")}
    out = torch.empty((n, block_bytes), dtype=torch.uint8)
    out.fill_(0)  # touched once: the read figure is the network's, not the page faults'
    writer = _store(url, layout, model)  # one store for every run, as a node keeps its store
    try:
        _put(writer, _tokens(layout, n, -1), kv)  # warm-up (connections, staging buffers), not timed
        for run in range(repeats):
            tokens = _tokens(layout, n, run)
            runs["put"].append(nbytes / _put(writer, tokens, kv))
            runs["redis_set"].append(redis_benchmark(host, port, "set", block_bytes, n, cluster, password))
            get, read = _get(url, layout, model, tokens, out)
            runs["get"].append(nbytes / get)
            runs["read"].append(nbytes / read)
            runs["redis_get"].append(redis_benchmark(host, port, "get", block_bytes, n, cluster, password))
    finally:
        writer.close()
    best = {k: max(v) / 1e9 for k, v in runs.items()}
    return Throughput(block_bytes, best["put"], best["get"], best["read"], best["redis_set"], best["redis_get"])


def _tokens(layout: KVLayout, n: int, run: int) -> torch.Tensor:
    """A prompt of its own per run (a put of blocks the store holds would do nothing)."""
    return torch.arange(n * layout.block_tokens, dtype=torch.int32) + (run + 2) * 1_000_000


def _put(writer: BlockStore, tokens: torch.Tensor, kv: torch.Tensor) -> float:
    """Seconds to put `kv` and have every SET answered."""
    remote = _remote(writer)
    start = time.perf_counter()
    writer.put(tokens, kv)
    remote.writer.drain()
    seconds = time.perf_counter() - start
    if remote.writer.take_lost():
        raise RuntimeError("some writes did not land; the cluster is too small or faulty for this run")
    return seconds


def _get(url: str, layout: KVLayout, model: str, tokens: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """Seconds of a cold store's get of `tokens`, and of the tier's read of the same blocks into `out`."""
    n = out.shape[0]
    with _store(url, layout, model) as reader:  # cold: its index knows nothing yet
        start = time.perf_counter()
        got = reader.get(tokens)
        get = time.perf_counter() - start
        if got.shape[0] != n:
            raise RuntimeError(f"a cold get found {got.shape[0]} of {n} blocks")
        del got
        remote = _remote(reader)
        slots = [b.slots[-1] for b in reader.index.lookup(reader.chain.seed(), reader.chain.chunks(tokens))]
        start = time.perf_counter()
        failed = remote.read_into(slots, out)
        read = time.perf_counter() - start
        if failed:
            raise RuntimeError(f"{len(failed)} reads failed")
    return get, read
