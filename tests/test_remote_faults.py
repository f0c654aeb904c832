"""The remote tier when the cluster fails: a master killed with SIGKILL, a failover to its replica,
the whole cluster down. Faults are misses and skipped writes, counted; nothing raises; everything
recovers by itself when the node returns or its replica takes over.

Each test starts its own cluster (they kill nodes), on loopback, with real redis-server processes.
"""

from __future__ import annotations

import time

import pytest

from conftest import kv_for, prompt, same_bits
from remote_fixtures import LAYOUT, published, remote, remote_store, start_cluster, unique_model
from tierkv import BlockStore
from tierkv.tiers.remote.local_cluster import LocalCluster
from tierkv.tiers.remote.record import record_key


def put(store: BlockStore, first: int, blocks: int) -> list[int]:
    tokens = prompt(first, blocks)
    store.put(tokens, kv_for(LAYOUT, tokens))
    return tokens


def first_block_on(cluster: LocalCluster, store: BlockStore, tokens: list[int], port: int) -> int:
    """Index of the first block of `tokens` whose key lives on the master at `port`."""
    return next(i for i, k in enumerate(store.keys(tokens)) if cluster.owner(record_key(k)).port == port)


def until(condition, timeout: float = 20.0, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


@pytest.fixture
def cluster():
    yield from start_cluster(masters=3)


@pytest.fixture
def replicated():
    yield from start_cluster(masters=3, replicas=1)


def test_a_master_killed_mid_run_costs_its_keys_only_and_everything_recovers(cluster: LocalCluster) -> None:
    model = unique_model()
    url = cluster.url(nodes=3)
    with remote_store(cluster, model, url=url) as a:
        x = put(a, 0, 60)
        published(a)
        victim = cluster.owner(record_key(a.keys(x)[0]))
        victim = next(n for n in cluster.nodes if n.port != victim.port)  # not block 0's: the hit is a real prefix
        stop = first_block_on(cluster, a, x, victim.port)
        cluster.kill(victim)
        started = time.monotonic()
        with remote_store(cluster, model, url=url, host_blocks=0) as b:
            got = b.get(x)
            assert got.shape[0] == stop and same_bits(got, kv_for(LAYOUT, x)[:stop]), "a shorter hit, never wrong"
            for _ in range(5):  # asked again and again while the node is down: fast misses, nothing raises
                assert b.get(x).shape[0] == stop
            assert time.monotonic() - started < 10
            faults = b.stats()["remote"]["faults_total"]
            assert faults.get("connection", 0) + faults.get("node_down", 0) > 0, faults
        y = put(a, 1000, 30)  # writes to the dead master's slots are skipped, the others land
        published(a)
        a.match([])  # after an operation the agent forgets the remote copies that did not land
        s = a.stats()["remote"]
        assert sum(s["lost_writes_total"].values()) > 0 and sum(s["lost_writes_total"].values()) < 30
        on_victim = [k for k in a.keys(y) if cluster.owner(record_key(k)).port == victim.port]
        assert on_victim and all("remote" not in a.locate([k])[k] for k in on_victim), \
            "a write that did not land is not indexed as remote"
        got = a.get(y)  # what still has a copy somewhere serves on, bit-exact
        assert same_bits(got, kv_for(LAYOUT, y)[: got.shape[0]])

        cluster.restart(victim)
        cluster.wait_state_ok()
        z_ok = []

        def recovered() -> bool:
            z = put(a, 5000 + 100 * len(z_ok), 40)
            published(a)
            z_ok.append(z)
            with remote_store(cluster, model, url=url) as c:
                return c.get(z).shape[0] == 40

        assert until(recovered), "new blocks reach every shard again once the node is back"
        assert "open" not in a.stats()["remote"]["breakers"].values()


def test_failover_to_a_replica_recovers_the_shard_with_its_blocks(replicated: LocalCluster) -> None:
    cluster = replicated
    model = unique_model()
    url = cluster.url(nodes=len(cluster.nodes))
    with remote_store(cluster, model, url=url) as a:
        x = put(a, 0, 60)
        published(a)
        cluster.wait_replicated()  # every write is on the replicas too before the kill
        victim = cluster.owner(record_key(a.keys(x)[-1]))
        cluster.kill(victim)
        with remote_store(cluster, model, url=url, host_blocks=0) as b:
            first = b.get(x).shape[0]
            assert first < 60, "while the master is down its blocks miss"
            ok = until(lambda: b.get(x).shape[0] == 60, timeout=60)
            live = next(n for n in cluster.nodes if n.alive())
            assert ok, (f"the replica did not take over with the blocks: {b.stats()['remote']}\n"
                        f"{cluster.cli(live, 'CLUSTER', 'NODES')}")
            assert same_bits(b.get(x), kv_for(LAYOUT, x))
        attempts: list[int] = []

        def writes_land() -> bool:  # the writer learns of the new master from its first failed batch
            new = put(a, 3000 + 100 * len(attempts), 40)
            attempts.append(1)
            published(a)
            with remote_store(cluster, model, url=url) as c:
                return c.get(new).shape[0] == 40

        assert until(writes_land, timeout=30)
        assert len(attempts) <= 3, "one batch to the dead master at most, then the new one takes the writes"


def test_whole_cluster_down_the_breaker_keeps_lookups_fast_and_it_recovers_by_itself(cluster: LocalCluster) -> None:
    model = unique_model()
    url = cluster.url(nodes=3)
    with remote_store(cluster, model, url=url) as a:
        x = put(a, 0, 20)
        published(a)
        for node in cluster.nodes:
            cluster.kill(node)
        with remote_store(cluster, model, url=url) as b:  # a store opens while its cluster is down
            started = time.monotonic()
            for _ in range(20):
                assert b.get(x).shape[0] == 0
                b.put(prompt(100, 4), kv_for(LAYOUT, prompt(100, 4)))
            assert time.monotonic() - started < 10, "a dead cluster is not asked again and again"
            s = b.stats()["remote"]
            assert s["breakers"].get("connect") == "open" or "open" in s["breakers"].values(), s["breakers"]
            assert same_bits(b.get(prompt(100, 4)), kv_for(LAYOUT, prompt(100, 4))), "the local tiers serve on"
            for node in cluster.nodes:
                cluster.restart(node)
            cluster.wait_state_ok()
            # The nodes kept their slots (nodes.conf) but not their data (no persistence): new
            # blocks must get through again without anyone reopening anything.
            assert until(lambda: (put(b, 7000, 10), published(b), remote_store(cluster, model, url=url).get(
                prompt(7000, 10)).shape[0] == 10)[-1], timeout=30)
            assert remote(b).client.breaker_states().get("connect") in (None, "closed")
