"""Remote tier: put/get throughput against redis-benchmark on the same local Redis Cluster, as ratios and GB/s.

Each benchmark starts a 3-master cluster on loopback (real redis-server processes; skipped where
redis-server is not installed) and alternates tierkv's runs with redis-benchmark's (one client,
16 commands in flight, values of the block size): see tierkv/tiers/remote/throughput.py. The
ratio means the same on any machine; the GB/s figure is the machine's. scripts/bench_remote.py
prints the same as a table, with more data per run.

`FleetSimulation`: the multi-turn chat served by 2 and 4 store nodes with random routing, prefill
saved with a shared remote tier and with each node alone (tierkv/tiers/remote/fleet.py; the
table is scripts/bench_fleet.py's, with a larger workload).
"""

from __future__ import annotations

from tierkv.cli.workload import ChatWorkload
from tierkv.tiers.remote.fleet import run_fleet
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


class FleetSimulation:
    params = [2, 4]
    param_names = ["nodes"]
    timeout = 600
    number = 1
    repeat = 1

    def setup(self, nodes: int) -> None:
        if redis_available() is not None:
            raise NotImplementedError(redis_available())
        self.cluster = LocalCluster(masters=3).start()
        workload = ChatWorkload(users=24, turns=4, system_prompts=4, seed=0)
        self.alone = run_fleet(workload, nodes, 128 << 20, None, seed=0)
        self.shared = run_fleet(workload, nodes, 128 << 20, self.cluster.url(nodes=3), seed=0)

    def teardown(self, nodes: int) -> None:
        self.cluster.stop()

    def track_prefill_saved_alone(self, nodes: int) -> float:
        return self.alone.saved

    def track_prefill_saved_shared(self, nodes: int) -> float:
        return self.shared.saved

    track_prefill_saved_alone.unit = "fraction"
    track_prefill_saved_shared.unit = "fraction"
