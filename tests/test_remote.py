"""The remote tier on a real Redis Cluster (3 masters on loopback): sharing, isolation, write modes, broken values.

Stores here are what inference nodes would hold: no device tier, a little host memory, and the
cluster below. Each test works in a namespace of its own, so tests share the cluster but never
blocks. Node loss and failover are in test_remote_faults.py, credentials and TLS in
test_remote_security.py, two processes in test_remote_nodes.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import BLOCK_TOKENS, ask, kv_for, prompt, same_bits, spawn
from remote_fixtures import LAYOUT, published, remote, remote_store, start_cluster, unique_model
from tierkv import BlockStore, Namespace, StoreConfig, TierKVError
from tierkv.tiers.remote.local_cluster import LocalCluster
from tierkv.tiers.remote.record import RecordFormat, record_key

BB = LAYOUT.block_bytes


@pytest.fixture(scope="module")
def cluster():
    yield from start_cluster(masters=3)


def put(store: BlockStore, first: int, blocks: int, tenant: str = "") -> list[int]:
    tokens = prompt(first, blocks)
    store.put(tokens, kv_for(LAYOUT, tokens, tenant), tenant=tenant)
    return tokens


def record_value(store: BlockStore, tokens: list[int], block: int, tenant: str = "") -> bytes:
    """The bytes a store writes for block `block` of `tokens`: header, then the payload."""
    from tierkv.integrity import checksum_blocks

    key = store.keys(tokens, tenant)[block]
    ident = (store.keys(tokens, tenant)[block - 1] if block else store.chain.seed(tenant)) + \
        bytes(memoryview(__import__("numpy").asarray(tokens[block * BLOCK_TOKENS:(block + 1) * BLOCK_TOKENS], "<i4")))
    row = kv_for(LAYOUT, tokens, tenant)[block].contiguous().view(__import__("torch").uint8).reshape(1, -1)
    return RecordFormat.for_store(store.namespace, LAYOUT).header(key, ident, checksum_blocks(row)[0]) + row.numpy().tobytes()


# -- sharing ---------------------------------------------------------------------------------------


def test_a_prefix_put_by_one_store_is_a_bit_exact_hit_for_another(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model) as a, remote_store(cluster, model) as b:
        tokens = put(a, 0, 40)
        published(a)
        assert b.match(tokens) == 40 * BLOCK_TOKENS
        assert len(b.index) == 0, "match asks the cluster but changes nothing"
        got = b.get(tokens)
        assert same_bits(got, kv_for(LAYOUT, tokens))
        s = b.stats()
        assert s["tiers"]["remote"]["hits"] == 40 and s["tiers"]["host"]["hits"] == 0
        assert s["tiers"]["remote"]["bytes_out"] == 40 * BB
        assert s["remote"]["reads_blocks_total"] == 40 and s["remote"]["probe_found_blocks_total"] == 80
        assert s["remote"]["mode"] == "cluster" and s["remote"]["faults_total"] == {}
        assert s["bytes_moved"]["remote->host"] == 16 * BB, "hits are promoted into host memory as room allows"
        again = b.get(tokens)
        assert same_bits(again, got)
        assert b.stats()["tiers"]["host"]["hits"] == 16
        owners = {cluster.owner(record_key(k)).port for k in b.keys(tokens)}
        assert len(owners) == 3, "no hash tag: one prompt's blocks spread over every shard"


def test_a_local_miss_continues_the_chain_in_the_remote_tier(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model) as a, remote_store(cluster, model, host_blocks=64) as b:
        tokens = put(a, 0, 30)
        published(a)
        put(b, 0, 10)  # b computed the first 10 blocks itself
        got = b.get(tokens)
        assert same_bits(got, kv_for(LAYOUT, tokens))
        s = b.stats()["tiers"]
        assert (s["host"]["hits"], s["remote"]["hits"]) == (10, 20)
        assert b.residency(b.keys(tokens)[9:11]) == {b.keys(tokens)[9]: "host", b.keys(tokens)[10]: "host"}


def test_another_namespace_or_tenant_never_hits(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model) as a, remote_store(cluster, model) as b, \
            remote_store(cluster, unique_model()) as stranger:
        tokens = put(a, 0, 12)
        salted = put(a, 1000, 12, tenant="tenant-1")
        published(a)
        assert stranger.match(tokens) == 0 and stranger.get(tokens).shape[0] == 0
        assert b.match(tokens, tenant="tenant-2") == 0
        assert b.match(salted) == 0, "tenant-1's blocks are not the default tenant's"
        got = b.get(salted, tenant="tenant-1")
        assert same_bits(got, kv_for(LAYOUT, salted, "tenant-1"))
        tenant_store = BlockStore(LAYOUT, Namespace(model=model, tenant="tenant-1"), b.config)
        with tenant_store:
            assert tenant_store.match(salted) == 12 * BLOCK_TOKENS, "a store of that tenant shares its chain"


def test_a_restarted_store_starts_warm(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model) as a:
        tokens = put(a, 0, 25)
        published(a)
    for _ in range(2):  # a node that restarts, twice, with nothing of its own
        with remote_store(cluster, model) as b:
            assert same_bits(b.get(tokens), kv_for(LAYOUT, tokens))


def test_plain_redis_server_is_chosen_from_the_url() -> None:
    for cluster in start_cluster(masters=1, cluster=False):
        model = unique_model()
        with remote_store(cluster, model) as a, remote_store(cluster, model) as b:
            tokens = put(a, 0, 20)
            published(a)
            assert same_bits(b.get(tokens), kv_for(LAYOUT, tokens))
            assert b.stats()["remote"]["mode"] == "single"


NODE = Path(__file__).with_name("_remote_node.py")


def test_two_node_processes_share_prefixes_bit_exact_and_a_cold_restart_hits(cluster: LocalCluster) -> None:
    """Node A and node B are two processes on one cluster: B hits what A put, bit for bit, and so does
    B started again with nothing; another tenant never does (another namespace: see the tests above)."""
    spec = {"remote_url": cluster.url(nodes=3), "model": unique_model(), "host_blocks": 16}
    procs = []

    def node(**changes: object):
        proc = spawn(NODE, json.dumps({**spec, **changes}), stdin=True)
        procs.append(proc)
        return proc

    def call(proc, **cmd: object) -> dict:
        return ask(proc, json.dumps(cmd))

    try:
        a, b = node(), node()
        assert call(a, op="put", first=0, blocks=40) == {"added": 40}
        assert call(a, op="put", first=500, blocks=10, tenant="tenant-1") == {"added": 10}
        call(a, op="publish")
        assert call(b, op="get", first=0, blocks=40) == {"blocks": 40, "exact": True}
        assert call(b, op="get", first=500, blocks=10) == {"blocks": 0, "exact": True}
        assert call(b, op="get", first=500, blocks=10, tenant="tenant-1") == {"blocks": 10, "exact": True}
        assert call(b, op="stats")["tiers"]["remote"]["hits"] == 50
        call(b, op="quit")
        b_again = node()  # restarted cold: nothing local, everything from the cluster
        assert call(b_again, op="get", first=0, blocks=40) == {"blocks": 40, "exact": True}
        for proc in (a, b_again):
            call(proc, op="quit")
        for proc in procs:
            assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- write modes -------------------------------------------------------------------------------------


def test_write_through_publishes_every_new_block_at_once(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model) as a, remote_store(cluster, model) as b:
        tokens = put(a, 0, 6)
        published(a)
        assert b.match(tokens) == 6 * BLOCK_TOKENS
        assert a.residency(a.keys(tokens)) == dict.fromkeys(a.keys(tokens), "host")
        assert all(set(where) == {"host", "remote"} for where in a.locate(a.keys(tokens)).values())


def test_evict_mode_writes_only_what_leaves_local_memory(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model, host_blocks=8, remote_write="evict") as a, remote_store(cluster, model) as b:
        first = put(a, 0, 4)
        published(a)
        assert b.match(first) == 0, "nothing is published while it fits locally"
        put(a, 100, 8)  # fills host: the first prompt moves down, whole
        published(a)
        assert a.residency(a.keys(first)) == dict.fromkeys(a.keys(first), "remote")
        assert a.stats()["bytes_moved"]["host->remote"] == 4 * BB
        assert same_bits(b.get(first), kv_for(LAYOUT, first))
        assert same_bits(a.get(first), kv_for(LAYOUT, first)), "and its own store still hits it"


def test_read_only_store_consumes_but_never_publishes(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model) as a, remote_store(cluster, model, host_blocks=8, remote_read_only=True) as r, \
            remote_store(cluster, model) as b:
        tokens = put(a, 0, 10)
        published(a)
        assert same_bits(r.get(tokens), kv_for(LAYOUT, tokens))
        mine = put(r, 500, 6)
        put(r, 600, 6)  # more than its host holds: the older prompt is dropped, not published
        published(r)
        assert b.match(mine) == 0 and r.match(mine) < 6 * BLOCK_TOKENS
        s = r.stats()
        assert s["dropped"] > 0
        assert s["tiers"]["remote"]["bytes_in"] == 0 and s["remote"]["writes_total"] == 0
        assert s["remote"]["write"] == "read-only"
        with pytest.raises(TierKVError, match="remote_read_only"):
            remote(r).write([0], kv_for(LAYOUT, mine)[:1].view(__import__("torch").uint8).reshape(1, -1), [])


def test_ttl_expires_blocks_and_a_read_starts_their_lifetime_again(cluster: LocalCluster) -> None:
    model = unique_model()
    # TTL 3 s, reads 1.8 s apart: opening the reader store and reading have 1.2 s before the first
    # records expire (0.6 s, with 1.5 s, was missed once on a loaded 2-core CI machine).
    with remote_store(cluster, model, remote_ttl_s=3.0) as a:
        tokens = put(a, 0, 3)
        cold = put(a, 100, 3)
        published(a)
        key = record_key(a.keys(tokens)[0]).decode()
        ttl = int(cluster.cli_cluster("PTTL", key).strip())
        assert 0 < ttl <= 3000
        time.sleep(1.8)
        with remote_store(cluster, model, remote_ttl_s=3.0, host_blocks=0) as reader:
            assert reader.get(tokens).shape[0] == 3  # read: its lifetime starts again
        time.sleep(1.8)
        with remote_store(cluster, model) as b:
            assert b.match(cold) == 0, "not read for longer than its TTL: expired"
            assert same_bits(b.get(tokens), kv_for(LAYOUT, tokens)), "read 0.9 s ago: still there"


# -- broken values -------------------------------------------------------------------------------------


def overwrite(cluster: LocalCluster, store: BlockStore, tokens: list[int], block: int, value: bytes,
              tenant: str = "") -> None:
    key = record_key(store.keys(tokens, tenant)[block]).decode()
    reply = cluster.cli_cluster("SET", key, stdin=value)
    assert "OK" in reply, reply


def test_garbage_truncated_and_flipped_values_are_detected_counted_and_never_served(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model) as a:
        tokens = put(a, 0, 12)
        published(a)
        good = record_value(a, tokens, 0)
        assert cluster.cli_cluster("STRLEN", record_key(a.keys(tokens)[0]).decode()).strip() == str(len(good))
        flipped = bytearray(record_value(a, tokens, 3))
        flipped[-100] ^= 0x40
        overwrite(cluster, a, tokens, 3, bytes(flipped))  # header intact, payload changed: the checksum catches it
        overwrite(cluster, a, tokens, 7, b"somebody else's value")
        overwrite(cluster, a, tokens, 10, record_value(a, tokens, 10)[: len(good) // 2])
    with remote_store(cluster, model) as b:
        got = b.get(tokens)
        assert got.shape[0] == 3 and same_bits(got, kv_for(LAYOUT, tokens)[:3])
        s = b.stats()
        assert s["tiers"]["remote"]["corrupt"] == 1, "the flipped payload failed its checksum"
        assert s["remote"]["bad_values_total"] == {"torn": 1}, "the probe stopped at the foreign value"
        assert b.get(tokens).shape[0] == 3, "asked again: the same broken blocks, the same shorter hit"
        # The node that misses computes the blocks again and stores them: written through, they
        # replace the broken values, and the next node gets the whole prompt.
        b.put(tokens, kv_for(LAYOUT, tokens))
        published(b)
    with remote_store(cluster, model) as c:
        assert same_bits(c.get(tokens), kv_for(LAYOUT, tokens))


def test_a_format_1_record_is_a_counted_foreign_miss_and_is_replaced(cluster: LocalCluster) -> None:
    """Values written before the tree checksum (format 1, whole-block xxh3_64) are misses, never errors."""
    import struct

    import torch

    from tierkv.integrity import legacy_checksum_rows

    model = unique_model()
    with remote_store(cluster, model) as a:
        tokens = put(a, 0, 6)
        published(a)
        for block in (2, 3, 4, 5):  # as the old code wrote them: version 1, the old checksum
            old = bytearray(record_value(a, tokens, block))
            struct.pack_into("<H", old, 4, 1)
            row = torch.frombuffer(bytearray(old[-BB:]), dtype=torch.uint8).reshape(1, -1)
            struct.pack_into("<Q", old, 4 + 2 + 2 + 16 + 16 + 16, legacy_checksum_rows(row)[0])
            overwrite(cluster, a, tokens, block, bytes(old))
    with remote_store(cluster, model) as b:
        got = b.get(tokens)
        assert got.shape[0] == 2 and same_bits(got, kv_for(LAYOUT, tokens)[:2])
        s = b.stats()
        assert s["remote"]["bad_values_total"] == {"foreign": 1}, "the probe stopped at the first old value"
        assert s["tiers"]["remote"]["corrupt"] == 0
        b.put(tokens, kv_for(LAYOUT, tokens))  # recomputed: written through in today's format
        published(b)
    with remote_store(cluster, model) as c:
        assert same_bits(c.get(tokens), kv_for(LAYOUT, tokens))


def test_a_value_broken_after_it_was_found_is_a_miss_on_read(cluster: LocalCluster) -> None:
    model = unique_model()
    with remote_store(cluster, model) as a, remote_store(cluster, model, host_blocks=0) as b:
        tokens = put(a, 0, 8)
        published(a)
        assert b.get(tokens).shape[0] == 8  # b knows all 8 now, and holds none of them locally
        overwrite(cluster, a, tokens, 5, record_value(a, tokens, 5)[:-7])
        bad_header = bytearray(record_value(a, tokens, 2))
        bad_header[50] ^= 1  # inside the block key of the header
        overwrite(cluster, a, tokens, 2, bytes(bad_header))
        got = b.get(tokens)
        assert got.shape[0] == 2 and same_bits(got, kv_for(LAYOUT, tokens)[:2])
        s = b.stats()
        assert s["remote"]["bad_values_total"] == {"foreign": 1, "torn": 1}
        assert s["tiers"]["remote"]["corrupt"] == 2, "both count as failed reads, never served"


def test_a_valid_record_of_the_same_block_written_by_another_store_is_not_mixed_in(cluster: LocalCluster) -> None:
    """Two nodes may compute the same prefix with different bits (GPU nondeterminism): a reader that
    indexed one node's bytes misses the other's record instead of mixing it in, then adopts it fresh."""
    model = unique_model()
    with remote_store(cluster, model) as a, remote_store(cluster, model, host_blocks=0) as b:
        tokens = put(a, 0, 4)
        published(a)
        assert b.get(tokens).shape[0] == 4
        other = kv_for(LAYOUT, tokens, "other bits")
        with remote_store(cluster, model) as c:
            c.put(tokens, other)
            published(c)
        assert b.get(tokens).shape[0] == 0, "every block now holds other bits than b indexed"
        assert b.stats()["remote"]["bad_values_total"] == {"replaced": 4}
        assert same_bits(b.get(tokens), other), "found again, with the checksum its new header promises"


# -- a full cluster ------------------------------------------------------------------------------------


def _used_memory(cluster: LocalCluster) -> int:
    return max(int(line.split(":")[1]) for n in cluster.masters_now()
               for line in cluster.cli(n, "INFO", "memory").splitlines() if line.startswith("used_memory:"))


def test_maxmemory_evicting_our_keys_gives_shorter_hits_and_noeviction_skips_writes(cluster: LocalCluster) -> None:
    model = unique_model()
    cluster.flushall()
    limit = _used_memory(cluster) + (256 << 10)
    try:
        cluster.config_set("maxmemory", str(limit), "maxmemory-policy", "allkeys-lru")
        with remote_store(cluster, model) as a:
            chains = [put(a, 10_000 * i, 50) for i in range(8)]  # ~900 KB: more than 3 x 256 KiB of room
            published(a)
            assert a.stats()["remote"]["lost_writes_total"] == {}, "with allkeys-lru every SET succeeds"
        with remote_store(cluster, model, host_blocks=0) as b:
            got = [b.get(c) for c in chains]
            assert sum(g.shape[0] for g in got) < 8 * 50, "the cluster evicted some of our keys"
            for chain, g in zip(chains, got):
                assert same_bits(g, kv_for(LAYOUT, chain)[: g.shape[0]]), "what is served is bit-exact"
        cluster.config_set("maxmemory-policy", "noeviction")
        with remote_store(cluster, model) as c:
            put(c, 900_000, 200)
            published(c)
            c.match([])  # an operation, after which the tier's agent forgets writes that did not land
            s = c.stats()
            assert s["remote"]["lost_writes_total"].get("full", 0) > 0
            assert s["remote"]["faults_total"].get("full", 0) > 0
            where = c.locate(c.keys(prompt(900_000, 200)))
            assert sum("remote" in w for w in where.values()) < 200, "a write the cluster refused is not indexed"
    finally:
        cluster.config_set("maxmemory", "0", "maxmemory-policy", "noeviction")
        cluster.flushall()


def test_config_from_the_environment_builds_a_remote_store(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_REMOTE_URL", cluster.url())
    monkeypatch.setenv("TIERKV_REMOTE_WRITE", "through")
    config = StoreConfig.from_env(base={"device_bytes": 0, "host_bytes": 8 * BB, "device": "cpu"})
    with BlockStore(LAYOUT, Namespace(model=unique_model()), config) as store:
        assert store.tier_names == ("device", "host", "remote")


def test_remote_traffic_and_faults_are_prometheus_metrics(cluster: LocalCluster) -> None:
    from test_stats import parse_exposition

    model = unique_model()
    with remote_store(cluster, model) as a, remote_store(cluster, model, host_blocks=0) as b:
        tokens = put(a, 0, 10)
        published(a)
        overwrite(cluster, a, tokens, 6, b"not a record")
        assert b.get(tokens).shape[0] == 6
        samples = parse_exposition(b.prometheus())
    assert samples[("tierkv_hits_total", '{tier="remote"}')] == 6
    assert samples[("tierkv_bytes_out_total", '{tier="remote"}')] == 6 * BB
    assert samples[("tierkv_remote_reads_blocks_total", "")] == 6
    assert samples[("tierkv_remote_reads_seconds_total", "")] > 0
    assert samples[("tierkv_remote_bad_values_total", '{kind="torn"}')] == 1
    assert ("tierkv_remote_write_queue_bytes", "") in samples
