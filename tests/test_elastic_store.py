"""Stores with elastic device tiers sharing a GPU budget, on the host page backend (CPU).

Blocks of 384 bytes on 4 KiB pages: slots straddle page boundaries, as real 2 MiB pages do with
block sizes that do not divide them. Run as `python test_elastic_store.py child NAME` this file is
the other process of the cross-process test, driven by commands on stdin.
"""

from __future__ import annotations

import gc
import json
import signal
import sys
import time
import uuid
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ask, check_index_invariants, kv_for, prompt, same_bits, spawn  # noqa: E402

from tierkv import BlockStore, ConfigError, KVLayout, Namespace, StoreConfig, TierKVError  # noqa: E402
from tierkv.tiers.elastic import budget as budget_mod  # noqa: E402
from tierkv.tiers.elastic.budget import BudgetMember, budget_path, read_budget  # noqa: E402
from tierkv.cli import main  # noqa: E402
from tierkv.tiers.elastic import ElasticTier  # noqa: E402

PAGE = 4096
LAYOUT = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=6, dtype=torch.bfloat16, block_tokens=4)
BB = LAYOUT.block_bytes  # 384: 10.67 blocks a page
HERE = Path(__file__).resolve()


def config(name: str | None, max_blocks: int, host_blocks: int = 400, min_bytes: int = 0, total: int = 8 * PAGE) -> StoreConfig:
    return StoreConfig(
        device="cpu", device_bytes=max_blocks * BB, host_bytes=host_blocks * BB, device_elastic=True,
        device_page_bytes=PAGE, device_min_bytes=min_bytes, gpu_budget_name=name,
        gpu_budget_bytes=None if name is None else total,
    )


def store(name: str | None, model: str, max_blocks: int = 64, **kw: int) -> BlockStore:
    return BlockStore(LAYOUT, Namespace(model=model), config(name, max_blocks, **kw))


def fill(s: BlockStore, first: int, prompts: int, blocks: int = 5) -> list[list[int]]:
    out = [prompt(first + 1000 * i, blocks) for i in range(prompts)]
    for p in out:
        s.put(p, kv_for(LAYOUT, p))
    return out


def assert_all_served(s: BlockStore, prompts: list[list[int]]) -> None:
    for p in prompts:
        assert same_bits(s.get(p), kv_for(LAYOUT, p)), "a stored prefix came back different or shorter"


def elastic_tier(s: BlockStore) -> ElasticTier:
    tier = s.tiers[0]
    assert isinstance(tier, ElasticTier)
    return tier


def mapped(s: BlockStore) -> int:
    return elastic_tier(s).mapped_bytes


def budget_of(s: BlockStore) -> BudgetMember:
    budget = elastic_tier(s).budget
    assert budget is not None, "the store has no GPU budget"
    return budget


CLOSED: weakref.WeakSet[BlockStore] = weakref.WeakSet()  # stores closed through `close`: no longer audited


def close(s: BlockStore) -> None:
    s.close()
    CLOSED.add(s)


def settled(stores: list[BlockStore], timeout: float = 10.0) -> None:
    """Wait until no open store has a shrink request pending: only then may its budget watcher be
    moving its blocks, so after this the books and the index can be read without its lock."""
    deadline = time.monotonic() + timeout
    while any(s not in CLOSED and budget_of(s).pending_target() is not None for s in stores):
        assert time.monotonic() < deadline, "a shrink request stayed pending"
        time.sleep(0.005)


def check_budget(name: str, stores: list[BlockStore]) -> None:
    """The budget's books match the pages really mapped, and never exceed the total."""
    settled(stores)
    snap = read_budget(name)
    assert snap.held_bytes <= snap.total_bytes
    held = {m.row: m.held_bytes for m in snap.members}
    for s in stores:
        if s not in CLOSED:
            assert held[budget_of(s).row] == mapped(s)
            assert mapped(s) <= s.tiers[0].max_bytes
            check_index_invariants(s)
    assert sum(mapped(s) for s in stores if s not in CLOSED) <= snap.total_bytes


# -- one store, no shared budget -------------------------------------------------------------


def test_elastic_store_maps_pages_as_blocks_arrive_and_evicts_at_its_maximum() -> None:
    with store(None, "solo", max_blocks=32) as s:
        assert mapped(s) == 0
        p = fill(s, 0, 1, blocks=5)
        assert mapped(s) == PAGE  # 5 x 384 bytes on the first page
        more = fill(s, 10_000, 8, blocks=5)  # 45 blocks for 32 slots: demotion to host
        assert mapped(s) == s.tiers[0].max_bytes and s.stats()["tiers"]["host"]["used_slots"] > 0
        assert_all_served(s, p + more)
        check_index_invariants(s)
        e = s.stats()["elastic"]
        assert e == {"backend": "host-mmap", "page_bytes": PAGE, "mapped_bytes": mapped(s), "max_bytes": 3 * PAGE,
                     "min_bytes": 0, "budget": None, "budget_bytes": None, "shrinks": 0, "demoted_bytes": 0}


def test_shrink_device_demotes_whole_pages_and_blocks_still_come_back_bit_exact() -> None:
    with store(None, "solo", max_blocks=64) as s:
        prompts = fill(s, 0, 10, blocks=5)  # 50 blocks: 5 pages
        assert mapped(s) == 5 * PAGE
        s.get(prompts[-1])  # the newest prompt is the hottest
        released = s.shrink_device(2 * PAGE)
        assert released == 3 * PAGE and mapped(s) == 2 * PAGE
        host = s.stats()["tiers"]["host"]
        assert host["used_slots"] >= 50 - (2 * PAGE) // BB
        assert s.stats()["elastic"]["demoted_bytes"] > 0
        check_index_invariants(s)
        # Survivors are the hottest: the prompt used last is still on the device.
        before = s.stats()["tiers"]["device"]["hits"]
        s.get(prompts[-1])
        assert s.stats()["tiers"]["device"]["hits"] - before == 5
        assert_all_served(s, prompts)
        assert s.shrink_device(10 * PAGE) == 0  # already below


def test_shrink_does_not_move_leased_blocks_and_drops_only_what_nothing_depends_on() -> None:
    with store(None, "solo", max_blocks=64, host_blocks=0) as s:
        prompts = fill(s, 0, 6, blocks=5)  # 30 blocks on 3 pages, no host tier to demote to
        with s.lease(prompts[0]):
            s.shrink_device(0)
            check_index_invariants(s)
            # Leaves could be dropped; parents of resident blocks and the leased prompt stay.
            assert same_bits(s.get(prompts[0]), kv_for(LAYOUT, prompts[0]))
            assert s.stats()["dropped"] > 0 and mapped(s) > 0
        assert s.stats()["tiers"]["device"]["used_slots"] >= 5


def test_shrink_of_part_of_a_chain_takes_its_tail_first() -> None:
    with store(None, "solo", max_blocks=64, host_blocks=0) as s:
        (chain,) = fill(s, 0, 1, blocks=40)  # 40 blocks on 4 pages, one put: all equally recent
        s.shrink_device(mapped(s) - PAGE)
        # The last page went, with the blocks at the end of the prefix; the head is whole.
        assert mapped(s) == 3 * PAGE and s.match(chain) == 32 * LAYOUT.block_tokens
        assert s.stats()["dropped"] == 8
        check_index_invariants(s)


def test_shrink_drops_a_stuck_branch_when_nothing_below_can_take_it() -> None:
    """A cold page holds the head of a chain whose tail shares a hot page: with no room below,
    the head cannot leave alone, so the whole chain goes and the hot prompt stays."""
    with store(None, "solo", max_blocks=64, host_blocks=0) as s:
        (cold,) = fill(s, 0, 1, blocks=12)  # slots 0-11: page 0 and the start of page 1
        (hot,) = fill(s, 50_000, 1, blocks=2)  # slots 12-13: page 1
        s.get(hot)
        released = s.shrink_device(mapped(s) - PAGE)
        assert released >= PAGE
        assert s.match(cold) == 0 and s.stats()["dropped"] == 12
        assert same_bits(s.get(hot), kv_for(LAYOUT, hot))
        check_index_invariants(s)


def test_shrink_device_needs_an_elastic_tier_and_a_size(layout) -> None:
    plain = BlockStore(layout, Namespace(model="plain"), StoreConfig(device="cpu", device_bytes=4096, host_bytes=4096))
    with plain, pytest.raises(TierKVError, match="elastic device tier"):
        plain.shrink_device(0)
    with store(None, "solo") as s:
        for bad in (-1, 1.5, True, "1MiB"):
            with pytest.raises(ValueError, match="target_bytes must be an int >= 0"):
                s.shrink_device(bad)


def test_elastic_store_with_a_disk_tier_shrinks_through_host_to_disk(tmp_path: Path) -> None:
    cfg = StoreConfig.from_dict({**config(None, 64, host_blocks=10).to_dict(), "disk_path": str(tmp_path / "d"),
                                 "disk_bytes": 200 * 4096})
    with BlockStore(LAYOUT, Namespace(model="disk"), cfg) as s:
        prompts = fill(s, 0, 10, blocks=5)
        s.shrink_device(PAGE)
        assert mapped(s) <= PAGE and s.stats()["tiers"]["disk"]["used_slots"] > 0
        check_index_invariants(s)
        assert_all_served(s, prompts)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"device_elastic": True, "device": "cuda"}, "CUDA is not available"),
        ({"device_elastic": True, "device_page_bytes": 5000}, "multiple of 4096"),
        ({"device_min_bytes": 4096}, "only used by an elastic device tier"),
        ({"device_elastic": True, "gpu_budget_name": "x"}, "go together"),
        ({"device_elastic": True, "device_min_bytes": "1MiB", "gpu_budget_name": "x", "gpu_budget_bytes": "4MiB",
          "device_bytes": "512KiB"}, "above device_bytes"),
        ({"device_elastic": True, "device_min_bytes": "2MiB", "gpu_budget_name": "x", "gpu_budget_bytes": "1MiB"},
         "above gpu_budget_bytes"),
        ({"device_elastic": "maybe"}, "device_elastic"),
    ],
)
def test_bad_elastic_settings_fail_with_the_field_named(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BlockStore(LAYOUT, Namespace(model="bad"), StoreConfig(**{"device": "cpu", **fields}))


def test_elastic_settings_come_from_the_environment() -> None:
    c = StoreConfig.from_env({"TIERKV_DEVICE_ELASTIC": "1", "TIERKV_GPU_BUDGET_NAME": "shared",
                              "TIERKV_GPU_BUDGET_BYTES": "8GiB", "TIERKV_DEVICE_MIN_BYTES": "1GiB"})
    assert (c.device_elastic, c.gpu_budget_name, c.gpu_budget_bytes, c.device_min_bytes) == (True, "shared", 8 << 30, 1 << 30)


# -- stores sharing a budget -------------------------------------------------------------------


def test_budget_moves_to_the_store_that_needs_it_by_demotion(name: str) -> None:
    a = store(name, "model-a", min_bytes=PAGE)
    b = store(name, "model-b", min_bytes=2 * PAGE)
    try:
        pa = fill(a, 0, 12)  # 60 blocks: wants 6 pages of the 8
        assert mapped(a) == 6 * PAGE
        check_budget(name, [a, b])
        pb = fill(b, 500_000, 12)  # b needs 6 too: a gives back all but its minimum
        assert mapped(a) == PAGE and mapped(b) == 6 * PAGE
        assert a.stats()["elastic"]["shrinks"] == 1 and a.stats()["elastic"]["demoted_bytes"] > 0
        check_budget(name, [a, b])
        # a's demoted blocks come back bit-exact from host, and a takes budget back from b,
        # never below b's minimum.
        host_hits = a.stats()["tiers"]["host"]["hits"]
        assert_all_served(a, pa)
        assert a.stats()["tiers"]["host"]["hits"] > host_hits
        assert mapped(b) >= 2 * PAGE
        check_budget(name, [a, b])
        assert_all_served(b, pb)
        check_budget(name, [a, b])
    finally:
        close(a)
        close(b)
    assert not budget_path(name).exists()


def test_a_store_never_maps_more_than_its_maximum_even_with_free_budget(name: str) -> None:
    with store(name, "small", max_blocks=16, total=8 * PAGE) as s:  # 16 x 384 bytes: 2 pages at most
        fill(s, 0, 10)
        assert mapped(s) == 2 * PAGE and read_budget(name).free_bytes == 6 * PAGE


def test_a_store_at_its_minimum_is_not_asked(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_mod, "SHRINK_WAIT_S", 0.05)
    with store(name, "floor", min_bytes=3 * PAGE, total=6 * PAGE) as a, store(name, "greedy", total=6 * PAGE) as b:
        pa = fill(a, 0, 6)  # 30 blocks: 3 pages, exactly its minimum
        fill(b, 900_000, 12)
        assert mapped(a) == 3 * PAGE and mapped(b) == 3 * PAGE
        assert a.stats()["elastic"]["shrinks"] == 0
        check_budget(name, [a, b])
        assert_all_served(a, pa)


def test_closing_a_store_gives_its_budget_back(name: str) -> None:
    a = store(name, "a")
    b = store(name, "b")
    fill(a, 0, 12)
    a.close()
    assert [m.label for m in read_budget(name).members] == ["b"] and read_budget(name).free_bytes == 8 * PAGE
    fill(b, 0, 12)
    assert mapped(b) == 6 * PAGE
    b.close()
    with pytest.raises(TierKVError, match="closed"):
        b.put(prompt(0, 1), kv_for(LAYOUT, prompt(0, 1)))


def test_a_store_dropped_without_close_leaves_the_budget(name: str) -> None:
    keep = store(name, "keep")
    s = store(name, "dropped")
    fill(s, 0, 6)
    assert read_budget(name).held_bytes == 3 * PAGE
    del s
    gc.collect()
    deadline = time.monotonic() + 5
    while len(read_budget(name).members) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [m.label for m in read_budget(name).members] == ["keep"] and read_budget(name).held_bytes == 0
    keep.close()


def test_top_shows_every_store_on_the_budget(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with store(name, "model-a", min_bytes=PAGE) as a, store(name, "model-b") as b:
        pa = fill(a, 0, 4)
        fill(b, 500_000, 2)
        a.get(pa[0])
        time.sleep(budget_mod.PUBLISH_S * 2.5)  # the watchers refresh the counters
        assert main(["top", "--once", name]) == 0
        out = capsys.readouterr().out
        assert f"GPU budget {name}: 32.0 KiB" in out and "2 stores" in out
        for text in ("model-a", "model-b", "MAPPED", "DEVICE HITS", "alive"):
            assert text in out
        assert main(["top", "--json", name]) == 0
        (report,) = json.loads(capsys.readouterr().out)
        rows = {m["label"]: m for m in report["members"]}
        assert rows["model-a"]["held_bytes"] == mapped(a) and rows["model-a"]["min_bytes"] == PAGE
        assert rows["model-a"]["used_bytes"] == 20 * BB and rows["model-a"]["hits"] == 5
        assert report["held_bytes"] == mapped(a) + mapped(b)
    assert main(["top", "--once", name]) == 2
    assert "no GPU budget named" in capsys.readouterr().err


def test_top_refreshes_until_interrupted_and_refuses_bad_intervals(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with store(name, "watched") as s:
        fill(s, 0, 2)
        proc = spawn("-m", "tierkv", "top", "--interval", "0.1")
        try:
            frames, found = 0, False
            while frames < 3 or not found:  # frames (into a pipe: a timestamp line each, no screen codes) showing our store
                line = proc.stdout.readline()
                assert line, proc.stderr.read()
                assert "\033[" not in line, "screen codes sent into a pipe"
                frames += line.startswith("-- ")
                found = found or (frames > 0 and "watched" in line)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 0, err  # Ctrl-C ends it quietly
    assert main(["top", "--interval", "0"]) == 2
    assert "--interval: expected a number > 0, got '0'" in capsys.readouterr().err


# -- random interleavings --------------------------------------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["put"] * 5 + ["get"] * 3 + ["lease", "release", "shrink", "reopen"]),
              st.integers(0, 2), st.integers(0, 7)),
    min_size=8, max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_interleavings_keep_the_budget_and_the_blocks(ops: list[tuple[str, int, int]]) -> None:
    """Three stores (minimums 1, 2 and 0 pages, 5 pages at most each) share 6 pages; every step checks
    the books, the minimums and the bytes."""
    name = f"hyp-{uuid.uuid4().hex[:12]}"
    mins = [PAGE, 2 * PAGE, 0]
    stores = [store(name, f"m{i}", max_blocks=48, host_blocks=60, min_bytes=mins[i], total=6 * PAGE) for i in range(3)]
    stored: list[set[int]] = [set(), set(), set()]
    leases: list[list] = [[], [], []]
    try:
        for op, i, k in ops:
            s = stores[i]
            before = [mapped(x) for x in stores]
            p = prompt(100_000 * i + 1000 * k, 6 + k % 5)
            if op == "put":
                s.put(p, kv_for(LAYOUT, p))
                stored[i].add(k)
            elif op == "get":
                got = s.get(p)
                assert same_bits(got, kv_for(LAYOUT, p)[: got.shape[0]])
            elif op == "lease":
                leases[i].append(s.lease(p))
            elif op == "release" and leases[i]:
                leases[i].pop().release()
            elif op == "shrink":
                s.shrink_device(k * PAGE)
            elif op == "reopen":
                for lease in leases[i]:
                    lease.release()
                leases[i] = []
                close(s)
                stores[i] = store(name, f"m{i}", max_blocks=48, host_blocks=60, min_bytes=mins[i], total=6 * PAGE)
                stored[i] = set()
            for j, other in enumerate(stores):  # before check_budget, which waits for requests to settle
                target = budget_of(other).pending_target()
                assert target is None or target >= mins[j]
            check_budget(name, stores)
            for j, other in enumerate(stores):
                if j != i:  # others' requests never push a store below its minimum
                    assert mapped(other) >= min(before[j], mins[j])
    finally:
        for s in stores:
            close(s)
    assert not budget_path(name).exists()


# -- two processes ---------------------------------------------------------------------------


def test_an_idle_store_in_another_process_shrinks_for_a_busy_one(name: str) -> None:
    """The child fills most of the budget and idles; our puts make its watcher thread demote."""
    proc = spawn(HERE, "child", name, stdin=True)

    try:
        assert ask(proc, "fill")["mapped"] == 6 * PAGE
        with store(name, "busy", min_bytes=PAGE) as s:
            prompts = fill(s, 900_000, 12)
            assert mapped(s) == 6 * PAGE  # the child kept only its minimum of 2 pages
            child_view = ask(proc, "stats")
            assert child_view["mapped"] == 2 * PAGE and child_view["shrinks"] >= 1 and child_view["demoted"] > 0
            check_budget(name, [s])
            assert ask(proc, "verify")["ok"]  # its demoted blocks come back bit-exact from its host tier
            assert_all_served(s, prompts)
            check_budget(name, [s])
        assert ask(proc, "exit")["bye"]
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()


def _child(name: str) -> None:
    s = store(name, "idle-child", min_bytes=2 * PAGE)
    prompts: list[list[int]] = []
    for line in sys.stdin:
        command = line.strip()
        if command == "fill":
            prompts = fill(s, 0, 12)
            reply = {"mapped": mapped(s)}
        elif command == "stats":
            e = s.stats()["elastic"]
            reply = {"mapped": mapped(s), "shrinks": e["shrinks"], "demoted": e["demoted_bytes"]}
        elif command == "verify":
            ok = all(same_bits(s.get(p), kv_for(LAYOUT, p)) for p in prompts)
            check_index_invariants(s)
            reply = {"ok": ok}
        else:
            s.close()
            print(json.dumps({"bye": True}), flush=True)
            return
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    _child(sys.argv[2])


@pytest.mark.slow
def test_two_model_bursts_run_in_both_modes_and_elastic_serves_more_from_the_device() -> None:
    """`tierkv.cli.bursts` (the asv and GPU benchmarks' scenario): a static split has no elastic
    section in its stats, which once made the static run raise."""
    from dataclasses import replace

    from tierkv.cli.bursts import BurstScenario, run_bursts

    scenario = replace(BurstScenario(), bursts=2)  # a burst needs more than half the budget, less than all of it
    static, elastic = run_bursts(scenario, "static"), run_bursts(scenario, "elastic")
    assert static.shrinks == 0 and elastic.shrinks > 0 and static.prompt_tokens == elastic.prompt_tokens > 0
    assert elastic.device_tokens > static.device_tokens and elastic.recomputed_tokens < static.recomputed_tokens
    assert static.to_dict()["mode"] == "static" and elastic.to_dict()["mode"] == "elastic"
    with pytest.raises(ValueError, match="mode must be one of"):
        run_bursts(scenario, "both")
