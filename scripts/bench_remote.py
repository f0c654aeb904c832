"""Remote tier throughput against redis-benchmark on the same cluster, same value sizes, same run.

Starts a 3-master Redis Cluster on loopback (real redis-server processes), or uses yours:

    python scripts/bench_remote.py                              # 256 KiB, 2 MiB, 8 MiB blocks, a local cluster
    python scripts/bench_remote.py --sizes 2MiB --repeats 5
    python scripts/bench_remote.py --url redis://10.0.0.5:7000  # an existing cluster (its first node for redis-benchmark)

Prints a markdown table: GB/s (10^9 B/s) of tierkv put / get / read and of redis-benchmark SET / GET
with one client and 16 commands in flight, and the ratios. See tierkv/tiers/remote/throughput.py
for what each column times, and docs/remote.md for the figures of the reference machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from urllib.parse import urlsplit

from tierkv import parse_bytes
from tierkv.tiers.remote.local_cluster import LocalCluster
from tierkv.tiers.remote.throughput import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256KiB,2MiB,8MiB", help="block sizes, comma separated")
    parser.add_argument("--total", default="256MiB", help="bytes moved per run and direction")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per size (the best is shown)")
    parser.add_argument("--masters", type=int, default=3, help="masters of the local cluster")
    parser.add_argument("--url", help="an existing cluster instead of a local one")
    args = parser.parse_args()
    sizes = [parse_bytes(s.strip(), "--sizes") for s in args.sizes.split(",")]
    total = parse_bytes(args.total, "--total")
    cluster = None
    if args.url is None:
        cluster = LocalCluster(masters=args.masters).start()
        url, host, port, is_cluster, password = cluster.url(nodes=args.masters), "127.0.0.1", cluster.nodes[0].port, True, None
    else:
        first = urlsplit(args.url.split(",")[0])
        url, host, port, is_cluster, password = args.url, first.hostname or "127.0.0.1", first.port or 6379, True, first.password
    try:
        rows = [measure(url, host, port, is_cluster, size, total, args.repeats, password) for size in sizes]
    finally:
        if cluster is not None:
            cluster.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()[0]
    print(f"remote tier vs redis-benchmark (-c 1 -P 16), {args.masters if cluster else '?'} masters, "
          f"{platform.node()} ({os.cpu_count()} CPUs, load {load:.1f}), commit {commit}, best of {args.repeats}\n")
    print("| block | put GB/s | SET GB/s | put/SET | get GB/s | read GB/s | GET GB/s | get/GET | read/GET |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.block_bytes >> 10} KiB | {r.put:.2f} | {r.redis_set:.2f} | {r.put_ratio:.2f} | {r.get:.2f} | "
              f"{r.read:.2f} | {r.redis_get:.2f} | {r.get_ratio:.2f} | {r.read_ratio:.2f} |")


if __name__ == "__main__":
    main()
