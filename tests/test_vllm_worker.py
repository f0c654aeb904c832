"""The vLLM connector's worker and scheduler halves, without an engine.

vLLM's CPU KV cache is rebuilt here exactly as vLLM allocates it (one buffer, per-layer
`[blocks, heads, tokens, K|V channels]` views, layer-major), so saves and loads run through the
same layout checks and gather/scatter as in a real engine, against a real store with a real disk
tier. What the engine adds (scheduling, the forward pass) is covered by test_vllm_engine.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from tierkv import LayoutMismatchError, Namespace, StoreConfig  # noqa: E402
from tierkv.tiers.disk.manifest import Manifest  # noqa: E402
from tierkv.tiers.disk import slot_stride  # noqa: E402
from tierkv_connectors.vllm.layout import AttentionKV, engine_kv  # noqa: E402
from tierkv_connectors.vllm.meta import LoadJob, RankResidency, ResidencyReport, SaveJob, TierKVMetadata  # noqa: E402
from tierkv_connectors.vllm.scheduler import SchedulerSide  # noqa: E402
from tierkv_connectors.vllm.worker import WorkerSide, rank_store_config  # noqa: E402

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 2, 2, 32, 128, 12
NAMES = tuple(f"model.layers.{i}.self_attn.attn" for i in range(LAYERS))
NAMESPACE = Namespace(model="tiny-vllm", weights_fingerprint="w0")
ORDER = ("device", "host", "disk")  # tier names of a connector's store, fastest first


def attention(block_size: int = BLOCK_SIZE) -> AttentionKV:
    return AttentionKV(layer_names=NAMES, block_size=block_size, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                       dtype=torch.float32)


def cpu_kv_cache(fill: bool, seed: int = 0, kernel_block: int = BLOCK_SIZE) -> dict[str, torch.Tensor]:
    """vLLM's CPU allocation: one buffer, layer l's `[B, H, N, 2C]` view at offset l * layer_size."""
    blocks = NUM_BLOCKS * (BLOCK_SIZE // kernel_block)
    per_layer = blocks * HEADS * kernel_block * 2 * HEAD_DIM
    buf = torch.zeros(LAYERS * per_layer, dtype=torch.float32)
    if fill:
        buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed)))
    return {n: buf[i * per_layer:(i + 1) * per_layer].view(blocks, HEADS, kernel_block, 2 * HEAD_DIM)
            for i, n in enumerate(NAMES)}


def token_kv(kv: dict[str, torch.Tensor], table: list[int], t: int) -> torch.Tensor:
    """K and V of sequence token t for every layer and head, read the way CPU attention reads them."""
    out = []
    for view in kv.values():
        b, n = table[t // BLOCK_SIZE], t % BLOCK_SIZE
        page = view[b].reshape(HEADS, 2 * BLOCK_SIZE, HEAD_DIM)  # K rows, then V rows
        out.append(torch.stack([page[:, n], page[:, BLOCK_SIZE + n]]))
    return torch.stack(out)


def worker(tmp_path: Path, block_tokens: int, **store: object) -> tuple[WorkerSide, dict[str, torch.Tensor]]:
    att = attention()
    config = rank_store_config(StoreConfig(device_bytes=0, device="cpu", disk_path=str(tmp_path),
                                           disk_bytes=store.pop("disk_bytes", "16MiB"), **store), 0, 1)
    side = WorkerSide(att.store_layout(block_tokens), NAMESPACE, config, att)
    kv = cpu_kv_cache(fill=False)
    side.open(engine_kv(kv, att, "CPU_ATTN", "LBHNC"))
    return side, kv


TOKENS = list(range(3, 3 + 3 * BLOCK_SIZE + 40))  # 3 full vLLM blocks and a partial one
SRC_TABLE = [7, 2, 9, 4]
DST_TABLE = [1, 11, 5, 0]


def save(side: WorkerSide, src: dict[str, torch.Tensor], end: int, tenant: str = "") -> None:
    side.engine = engine_kv(src, side.attention, "CPU_ATTN", "LBHNC")
    side._save(SaveJob(req_id="r0", tenant=tenant, token_ids=TOKENS[:end], block_ids=SRC_TABLE))


@pytest.mark.parametrize("block_tokens", [32, 128, 256])
def test_saved_blocks_load_bit_exact_and_only_past_what_vllm_holds(tmp_path: Path, block_tokens: int) -> None:
    side, dst = worker(tmp_path, block_tokens)
    src = cpu_kv_cache(fill=True)
    end = (3 * BLOCK_SIZE) // block_tokens * block_tokens
    save(side, src, block_tokens)  # the first step completes one block,
    save(side, src, end)  # a later one the rest: only the new blocks are gathered
    side.bind(engine_kv(dst, side.attention, "CPU_ATTN", "LBHNC"))
    start = BLOCK_SIZE if BLOCK_SIZE % block_tokens == 0 else 0  # vLLM already holds its first block
    failed = side._load(LoadJob("r1", "", TOKENS[:end], start, end, DST_TABLE, False), background=True)
    assert failed == set()
    for t in range(end):
        got = token_kv(dst, DST_TABLE, t)
        if t < start:
            assert not got.any(), f"token {t}: vLLM's own block was overwritten"
        else:
            assert torch.equal(got, token_kv(src, SRC_TABLE, t)), f"token {t} differs"
    assert side.counters["loaded_blocks"] == (end - start) // block_tokens
    side.close()


def test_blocks_the_store_lacks_are_reported_as_vllm_blocks_to_recompute(tmp_path: Path) -> None:
    side, dst = worker(tmp_path, 32)
    save(side, cpu_kv_cache(fill=True), 160)  # 5 blocks of 32: vLLM block 0 and a quarter of block 1
    failed = side._load(LoadJob("r1", "", TOKENS[:320], 0, 320, DST_TABLE, False), background=True)
    assert failed == {DST_TABLE[1], DST_TABLE[2]}, "tokens 160.. live in vLLM blocks 1 and 2"
    assert side.counters["load_errors"] == 2
    side.close()


def test_other_tenants_blocks_are_never_loaded(tmp_path: Path) -> None:
    side, dst = worker(tmp_path, 32)
    save(side, cpu_kv_cache(fill=True), 256, tenant="alice")
    failed = side._load(LoadJob("r1", "bob", TOKENS[:256], 0, 256, DST_TABLE, False), background=True)
    assert failed == {DST_TABLE[0], DST_TABLE[1]}
    assert not any(v.any() for v in dst.values()), "bob got alice's KV"
    side.close()


def _corrupt_block(directory: Path, block_bytes: int, block_tokens_bytes: bytes) -> None:
    """Flip one byte in the stored block whose own token ids are `block_tokens_bytes`."""
    manifest = Manifest(directory, durable=False)
    try:
        records = manifest.load().records
    finally:
        manifest.close()
    (slot,) = [r.slot for r in records.values() if r.ident[16:] == block_tokens_bytes]
    with (directory / "data000.bin").open("r+b") as f:
        f.seek(slot * slot_stride(block_bytes) + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))


def test_corrupt_disk_block_is_detected_and_reported_not_served(tmp_path: Path) -> None:
    side, _ = worker(tmp_path, 32)
    src = cpu_kv_cache(fill=True)
    save(side, src, 320)
    side.close()  # flushes every block to disk
    layout = side.layout
    _corrupt_block(tmp_path / "rank0-of-1", layout.block_bytes,
                   torch.tensor(TOKENS[160:192], dtype=torch.int32).numpy().tobytes())
    side, dst = worker(tmp_path, 32)
    failed = side._load(LoadJob("r1", "", TOKENS[:320], 0, 320, DST_TABLE, False), background=True)
    assert failed == {DST_TABLE[1], DST_TABLE[2]}, "block 5 (tokens 160..191) is in vLLM block 1"
    for t in range(160):
        assert torch.equal(token_kv(dst, DST_TABLE, t), token_kv(src, SRC_TABLE, t))
    assert side.store.stats()["tiers"]["disk"]["corrupt"] == 1
    report = side.report()
    assert report is not None and report.ranks[0].full
    assert len(report.ranks[0].tiers) == 5, "the corrupt block and its descendants left the store"
    side.close()


def test_residency_reports_full_then_changes_then_evictions(tmp_path: Path) -> None:
    att = attention()
    layout = att.store_layout(32)
    side = WorkerSide(layout, NAMESPACE, StoreConfig(device_bytes=0, host_bytes=4 * layout.block_bytes, device="cpu"), att)
    src = cpu_kv_cache(fill=True)
    side.open(engine_kv(src, att, "CPU_ATTN", "LBHNC"))
    first = side.report()
    assert first is not None and first.ranks[0].full and first.ranks[0].tiers == {}
    assert side.report() is None, "nothing changed"
    save(side, src, 96)
    added = side.report().ranks[0]
    assert not added.full and sorted(added.tiers.values()) == ["host", "host", "host"], "three blocks, all in host"
    side._save(SaveJob("r2", "other", TOKENS[:96], SRC_TABLE))  # host holds 4: two of r0's blocks go
    change = side.report().ranks[0].tiers
    assert list(change.values()).count(None) == 2 and list(change.values()).count("host") == 3
    side.close()


def _request(req_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=4), None, cache_salt=salt)


def test_scheduler_waits_for_reports_then_hits_only_what_every_rank_holds() -> None:
    att = attention()
    layout = att.store_layout(32)
    namespaces = [Namespace(model="tiny-vllm", tp_rank=r, tp_size=2) for r in range(2)]
    sched = SchedulerSide(layout, namespaces, async_disk_loads=True)
    req = _request("a", TOKENS[:300])
    sched.on_new_request(req)
    assert sched.match(req, 0) == (None, False), "no report yet: ask again later"
    keys = sched._keys_for(req, 9)
    sched.apply(ResidencyReport({0: RankResidency(True, {k: "host" for k in keys[0][:8]}, ORDER),
                                 1: RankResidency(True, {k: "host" for k in keys[1][:6]} | {keys[1][6]: "disk"}, ORDER)}))
    assert sched.match(req, 0) == (224, True), "rank 1 holds 7 blocks, the 7th on disk: an async load"
    assert sched.match(req, 128) == (96, True)
    assert sched.match(req, 64) == (160, True)
    sched.apply(ResidencyReport({1: RankResidency(False, {keys[1][6]: None})}))
    assert sched.match(req, 0) == (192, False), "host only now: a synchronous load"
    assert sched.match(_request("b", TOKENS[:300], salt="t2"), 0) == (0, False), "another tenant's keys"


def test_hit_never_covers_the_last_prompt_token() -> None:
    att = attention()
    layout = att.store_layout(32)
    sched = SchedulerSide(layout, [NAMESPACE], async_disk_loads=False)
    req = _request("a", TOKENS[:256])
    keys = sched._keys_for(req, 8)
    sched.apply(ResidencyReport({0: RankResidency(True, {k: "host" for k in keys[0]}, ORDER)}))
    assert sched.match(req, 0) == (224, False), "256 tokens stored, but vLLM must compute the last one"


def test_engine_view_with_wrong_strides_is_refused() -> None:
    att = attention()
    kv = cpu_kv_cache(fill=False)
    transposed = {n: v.transpose(1, 2).contiguous().transpose(1, 2) for n, v in kv.items()}  # heads inside tokens
    with pytest.raises(LayoutMismatchError, match="strides"):
        engine_kv(transposed, att, "CPU_ATTN", "LBHNC")
    with pytest.raises(LayoutMismatchError, match="LHBNC"):
        engine_kv(kv, att, "FLASH_ATTN", "LHBNC")
    with pytest.raises(LayoutMismatchError, match="heads"):
        engine_kv(kv, AttentionKV(NAMES, BLOCK_SIZE, 4, HEAD_DIM, torch.float32), "CPU_ATTN", "LBHNC")


def test_a_load_never_writes_past_the_pages_vllm_allocated(tmp_path: Path) -> None:
    side, dst = worker(tmp_path, 256)
    save(side, cpu_kv_cache(fill=True), 512)
    # vLLM promised 300 tokens but allocated only 3 blocks of 128: the second stored block
    # (tokens 256..511) does not fit, so tokens 256..299 are reported instead of written.
    failed = side._load(LoadJob("r1", "", TOKENS[:512], 0, 300, DST_TABLE[:3], False), background=True)
    assert failed == {DST_TABLE[2]}
    side.close()


def test_a_worker_without_a_store_yet_does_not_keep_the_scheduler_waiting(tmp_path: Path) -> None:
    att = attention()
    side = WorkerSide(att.store_layout(32), NAMESPACE, StoreConfig(device_bytes=0, device="cpu"), att)
    first = side.report()
    assert first is not None and first.ranks[0].full and first.ranks[0].tiers == {}
    assert side.report() is None
    side.open(engine_kv(cpu_kv_cache(fill=False), att, "CPU_ATTN", "LBHNC"))
    assert side.report().ranks[0].full, "once open, the store is reported whole"
    side.close()


def test_disk_hits_are_promoted_to_host_when_the_store_has_no_device_tier(tmp_path: Path) -> None:
    side, _ = worker(tmp_path, 32)
    save(side, cpu_kv_cache(fill=True), 128)
    side.close()
    side, _ = worker(tmp_path, 32)  # after a restart the blocks live on disk only
    assert side._load(LoadJob("r1", "", TOKENS[:128], 0, 128, DST_TABLE, False), background=True) == set()
    tiers = side.store.stats()["tiers"]
    side.close()
    assert tiers["host"]["used_slots"] == 4, "the blocks just read from disk should now be in host memory"



def _meta(saves: list[SaveJob], preempted: list[str] | None = None) -> TierKVMetadata:
    return TierKVMetadata(saves=saves, preempted=preempted or [])


def test_async_saves_are_queued_and_reported_finished_only_once_done(tmp_path: Path) -> None:
    side, _ = worker(tmp_path, 128)
    src = cpu_kv_cache(fill=True)
    side.engine = engine_kv(src, side.attention, "CPU_ATTN", "LBHNC")
    gate = threading.Event()
    real = side._save

    def held(job: SaveJob) -> None:  # the real save, once the test lets it run
        gate.wait(10)
        real(job)

    side._saves._save = held
    side.save(_meta([SaveJob("r0", "", TOKENS[:384], SRC_TABLE)]))  # returns at once: the save waits for the gate
    assert side.store.match(TOKENS) == 0, "nothing stored before the save ran"
    assert side.finished_saves({"r0", "other"}) == set(), "r0's save is still queued: vLLM keeps its blocks"
    gate.set()
    side._saves.drain()
    assert side.finished_saves(set()) == {"r0"}, "reported once its save is done (finished earlier)"
    assert side.finished_saves({"r0"}) == set(), "reported exactly once"
    assert side.store.match(TOKENS) == 384
    side.close()


def test_preempted_requests_saves_finish_before_vllm_reuses_their_pages(tmp_path: Path) -> None:
    side, _ = worker(tmp_path, 128)
    side.engine = engine_kv(cpu_kv_cache(fill=True), side.attention, "CPU_ATTN", "LBHNC")
    real = side._save
    side._saves._save = lambda job: (time.sleep(0.3), real(job))[1]
    side.save(_meta([SaveJob("r0", "", TOKENS[:384], SRC_TABLE)]))
    side.handle_preemptions(_meta([], preempted=["r0"]))
    assert side.store.match(TOKENS) == 384, "handle_preemptions returned before r0's save was done"
    side.close()


def test_a_save_queue_that_falls_behind_drops_saves_and_counts_them(tmp_path: Path) -> None:
    att = attention()
    config = rank_store_config(StoreConfig(device_bytes=0, device="cpu", disk_path=str(tmp_path), disk_bytes="16MiB"), 0, 1)
    side = WorkerSide(att.store_layout(128), NAMESPACE, config, att, max_pending_saves=1)
    side.open(engine_kv(cpu_kv_cache(fill=True), att, "CPU_ATTN", "LBHNC"))
    gate = threading.Event()
    real = side._save
    side._saves._save = lambda job: (gate.wait(10), real(job))[1]
    side.save(_meta([SaveJob("r0", "", TOKENS[:128], SRC_TABLE), SaveJob("r1", "", TOKENS[:256], SRC_TABLE)]))
    assert side.stats()["save_dropped"] == 1, "the second save found the queue full"
    gate.set()
    side._saves.drain()
    assert side.finished_saves({"r0", "r1"}) == {"r0", "r1"}, "a dropped save still frees its request's blocks"
    side.close()


def test_scheduler_keeps_blocks_of_requests_with_queued_saves() -> None:
    att = attention()
    sched = SchedulerSide(att.store_layout(32), [NAMESPACE], async_disk_loads=True)
    req = _request("a", TOKENS[:300])
    sched.on_new_request(req)
    assert sched.finished(req) is False, "no save was ever queued: vLLM frees at once"
    sched._saved["b"] = 128
    assert sched.finished(_request("b", TOKENS[:300])) is True
    sync = SchedulerSide(att.store_layout(32), [NAMESPACE], async_disk_loads=True, async_saves=False)
    sync._saved["c"] = 128
    assert sync.finished(_request("c", TOKENS[:300])) is False, "synchronous saves are done when the step ends"


def test_a_step_whose_load_fell_short_stores_nothing_computed_from_it(tmp_path: Path) -> None:
    """A corrupt host block: vLLM is told to recompute, and this step's save of that request is dropped.

    The forward pass of that step ran over the pages the load did not fill, so the blocks it
    completed for the request hold KV computed from garbage; storing them would serve it later.
    """
    side, dst = worker(tmp_path, 32, host_bytes="1MiB")
    src = cpu_kv_cache(fill=True)
    save(side, src, 160)  # blocks 0..4 (tokens 0..159)
    key = side.store.keys(TOKENS[:160])[3]
    host = next(t for t in side.store.tiers if t.name == "host")
    slot = side.store.locate([key])[key]["host"]
    host.storage[slot, 11] ^= 0x08  # block 3 (tokens 96..127) no longer matches its checksum
    side.bind(engine_kv(dst, side.attention, "CPU_ATTN", "LBHNC"))
    stored = len(side.store.residency())
    load = LoadJob("r1", "", TOKENS[:160], 0, 160, DST_TABLE, False)
    later = SaveJob(req_id="r1", tenant="", token_ids=TOKENS[:256], block_ids=DST_TABLE)
    other = SaveJob(req_id="r2", tenant="", token_ids=TOKENS[:256], block_ids=SRC_TABLE)
    side.start_loads(TierKVMetadata(loads=[load]))
    for name in side.attention.layer_names:
        side.wait_for_layer(name)
    side.engine = engine_kv(src, side.attention, "CPU_ATTN", "LBHNC")  # r2's pages, for its save
    side.save(TierKVMetadata(saves=[later, other]))
    side._saves.drain()
    assert side.counters["saves_skipped_after_load_error"] == 1
    assert side.load_errors() == {DST_TABLE[0], DST_TABLE[1]}, "tokens 96..159 are in vLLM blocks 0 and 1 (of 128)"
    assert side.store.stats()["tiers"]["host"]["corrupt"] == 1
    assert len(side.store.residency()) == stored - 2 + 5, "5 blocks past the 3 left are stored again"
    check = cpu_kv_cache(fill=False)
    side.bind(engine_kv(check, side.attention, "CPU_ATTN", "LBHNC"))
    assert side._load(LoadJob("r3", "", TOKENS[:256], 0, 256, DST_TABLE, False), background=True) == set()
    for t in range(256):  # r2's KV (from src's pages), not r1's pages that the load never filled
        assert torch.equal(token_kv(check, DST_TABLE, t), token_kv(src, SRC_TABLE, t)), f"token {t}"
    side.save(TierKVMetadata(saves=[later]))  # the next step (vLLM recomputed): saved again
    side._saves.drain()
    assert side.counters["saves_skipped_after_load_error"] == 1
    side.close()


def test_step_time_keeps_wall_and_cpu_time_step_by_step() -> None:
    """A hook that sleeps costs the step wall time, not CPU time; the slowest step's CPU time is paired with it."""
    from tierkv_connectors.vllm.step_time import StepTime

    steps = StepTime()
    with steps.hook("save"):
        end = time.thread_time() + 0.004
        while time.thread_time() < end:  # 4 ms of this thread's own work
            pass
    steps.end_step()
    with steps.hook("save"):
        time.sleep(0.02)  # 20 ms off the CPU, as a descheduled thread would be
    steps.end_step()
    summary = steps.summary()
    assert summary["steps"] == 2
    save, cpu = summary["save_ms"], summary["save_cpu_ms"]
    assert save["max"] >= 20 and save["cpu_of_max"] < 4, save
    assert cpu["max"] >= 4 and cpu["max"] <= save["max"], cpu
    assert summary["load_ms"]["max"] == 0 and summary["load_cpu_ms"]["max"] == 0
    with pytest.raises(ValueError, match="kind must be one of"):
        with steps.hook("saves"):
            pass


def test_the_save_thread_copies_on_one_core_and_leaves_the_engines_threads_alone() -> None:
    """The save thread's CPU tensor ops are single-threaded (an OpenMP team of its own would take
    the engine's cores); the thread count of the thread that made the queue is unchanged. The
    process's count is set first, as vLLM's CPU worker sets it: torch hands that count to a new
    thread the first time the thread asks, which undid the save thread's own setting once."""
    from tierkv_connectors.vllm.saves import SaveQueue, _openmp_thread_setters

    before = torch.get_num_threads()
    torch.set_num_threads(before)
    seen: list[int] = []
    queue = SaveQueue(lambda job: seen.append(torch.get_num_threads()), lambda: None, limit=4)
    try:
        queue.submit([SaveJob("r", "", [1, 2], [0])])
        queue.drain()
    finally:
        queue.close()
    assert seen == [1], f"OpenMP runtimes told: {_openmp_thread_setters()}"
    assert torch.get_num_threads() == before
