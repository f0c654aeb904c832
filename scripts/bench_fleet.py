"""A fleet of store nodes behind a load balancer: prefill saved with a shared remote tier vs each node alone.

The multi-turn chat workload of `tierkv replay` (tierkv/cli/workload.py: users sharing a few
system prompts, each conversation growing turn by turn) is served by N nodes, and every request
goes to a node drawn at random, as a load balancer without session affinity sends it. A node
serves what its store holds and computes the rest (synthetic KV, checked bit for bit on every
hit). Alone, a node only hits what it computed itself: the system prompts once per node, and a
user's history only when the previous turn happened to land on the same node. With a shared
remote tier (a 3-master Redis Cluster on loopback, remote_write "through") every node hits what
any node computed.

    python scripts/bench_fleet.py                        # 1, 2 and 4 nodes, 48 users x 6 turns
    python scripts/bench_fleet.py --nodes 2,4,8 --users 96 --host 64MiB

Prints a markdown table: prefill tokens saved (served from a store instead of computed), per
fleet size, alone and shared, and what the shared tier served. The simulation itself is
tierkv/tiers/remote/fleet.py (asv_bench/benchmarks/bench_remote.py tracks the same figures).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess

from tierkv import parse_bytes
from tierkv.cli.workload import SYNTHETIC_LAYOUT, ChatWorkload
from tierkv.tiers.remote.fleet import FleetRun, run_fleet
from tierkv.tiers.remote.local_cluster import LocalCluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,2,4", help="fleet sizes, comma separated")
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-prompts", type=int, default=4)
    parser.add_argument("--host", default="128MiB", help="host memory of each node's store")
    parser.add_argument("--seed", type=int, default=0, help="the workload's and the load balancer's")
    args = parser.parse_args()
    workload = ChatWorkload(users=args.users, turns=args.turns, system_prompts=args.system_prompts, seed=args.seed)
    host = parse_bytes(args.host, "--host")
    sizes = [int(n) for n in args.nodes.split(",")]
    rows: list[tuple[FleetRun, FleetRun]] = []
    with LocalCluster(masters=3) as cluster:
        url = cluster.url(nodes=3)
        for n in sizes:
            alone = run_fleet(workload, n, host, None, args.seed)
            shared = run_fleet(workload, n, host, url, args.seed)
            cluster.flushall()
            rows.append((alone, shared))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    bt = SYNTHETIC_LAYOUT.block_tokens
    print(f"fleet of stores, {workload.users} users x {workload.turns} turns, {workload.system_prompts} system prompts of "
          f"{workload.system_tokens} tokens, {workload.total_prompt_tokens} prompt tokens; {args.host} host per node, "
          f"{SYNTHETIC_LAYOUT.block_bytes >> 10} KiB blocks of {bt} tokens; random routing (seed {args.seed}); "
          f"{platform.node()} ({os.cpu_count()} CPUs), commit {commit}\n")
    print("| nodes | prefill saved, each node alone | prefill saved, shared remote tier | blocks from the remote tier | "
          "tokens computed: alone / shared |")
    print("| --- | --- | --- | --- | --- |")
    for alone, shared in rows:
        print(f"| {alone.nodes} | {alone.saved:.1%} | {shared.saved:.1%} | {shared.remote_hits} | "
              f"{alone.prompt_tokens - alone.served_tokens} / {shared.prompt_tokens - shared.served_tokens} |")


if __name__ == "__main__":
    main()
