"""Remote tier: put/get throughput against redis-benchmark on the same local Redis Cluster, as ratios and GB/s.

Each benchmark starts a 3-master cluster on loopback (real redis-server processes; skipped where
redis-server is not installed) and alternates tierkv's runs with redis-benchmark's (one client,
16 commands in flight, values of the block size): see tierkv/tiers/remote/throughput.py. The
ratio means the same on any machine; the GB/s figure is the machine's. scripts/bench_remote.py
prints the same as a table, with more data per run.
"""

from __future__ import annotations

from tierkv.tiers.remote.local_cluster import LocalCluster, redis_available
from tierkv.tiers.remote.throughput import Throughput, measure

TOTAL_BYTES = 64 << 20


class RemoteThroughput:
    params = [256 << 10, 2 << 20, 8 << 20]
    param_names = ["block_bytes"]
    timeout = 600
    number = 1
    repeat = 1

    def setup(self, block_bytes: int) -> None:
        if redis_available() is not None:
            raise NotImplementedError(redis_available())  # asv: skip this benchmark here
        self.cluster = LocalCluster(masters=3).start()
        c = self.cluster
        self.result: Throughput = measure(c.url(nodes=3), "127.0.0.1", c.nodes[0].port, True, block_bytes,
                                          TOTAL_BYTES, repeats=1)

    def teardown(self, block_bytes: int) -> None:
        self.cluster.stop()

    def track_put_ratio_to_redis_benchmark(self, block_bytes: int) -> float:
        return self.result.put_ratio

    def track_get_ratio_to_redis_benchmark(self, block_bytes: int) -> float:
        return self.result.get_ratio

    def track_put_gbps(self, block_bytes: int) -> float:
        return self.result.put

    def track_get_gbps(self, block_bytes: int) -> float:
        return self.result.get

    track_put_ratio_to_redis_benchmark.unit = "ratio"
    track_get_ratio_to_redis_benchmark.unit = "ratio"
    track_put_gbps.unit = "GB/s"
    track_get_gbps.unit = "GB/s"
