"""The transfer dispatch API on a CPU-only machine: torch path, argument checks, tier copies."""

from __future__ import annotations

import logging

import pytest
import torch

from gpu.cases import expected_blocks, make_case
from tierkv import LayoutMismatchError
from tierkv.ops import transfer
from tierkv.ops.engine_layout import DimOrder
from tierkv.tiers import MemoryTier

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def pools(rows_a: int = 9, rows_b: int = 11, width: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randint(0, 256, (rows_a, width), dtype=torch.uint8),
            torch.randint(0, 256, (rows_b, width), dtype=torch.uint8))


def test_copy_slots_matches_row_loop() -> None:
    src, dst = pools()
    want = dst.clone()
    sr, dr = [8, 0, 3, 3], [1, 10, 4, 5]
    for a, b in zip(sr, dr):
        want[b] = src[a]
    assert transfer.copy_slots(src, sr, dst, dr) is None  # no GPU work, no event
    assert torch.equal(dst, want)


def test_copy_slots_accepts_typed_pools_of_equal_row_bytes() -> None:
    src = torch.randn(4, 3, 5)  # 60 bytes a row
    dst = torch.zeros(6, 15, dtype=torch.float32).view(torch.uint8)[:, :60].contiguous()
    transfer.copy_slots(src, [2], dst, [5])
    assert torch.equal(dst[5].view(torch.float32).reshape(3, 5), src[2])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"dst": torch.zeros(11, 41, dtype=torch.uint8)}, ValueError, "src rows hold 40 bytes, dst rows 41"),
        ({"dst_rows": [1]}, ValueError, "src_rows has 2 entries, dst_rows 1"),
        ({"src_rows": [0, 9]}, IndexError, r"src_rows holds row 9, outside \[0, 9\)"),
        ({"dst_rows": [-1, 2]}, IndexError, "dst_rows holds row -1"),
        ({"dst_rows": [3, 3]}, ValueError, "names a row twice"),
        ({"src_rows": [0.0, 1.0]}, TypeError, "must be integers"),
        ({"src": torch.zeros(40, 9, dtype=torch.uint8).t()}, ValueError, "contiguous"),
        ({"path": "fast"}, ValueError, "path must be one of"),
        ({"path": "kernel"}, ValueError, r"pageable->pageable cannot take path 'kernel'; it can take \('torch',\)"),
    ],
)
def test_copy_slots_rejects(kwargs: dict, error: type, message: str) -> None:
    src, dst = pools()
    args = {"src": src, "src_rows": [0, 1], "dst": dst, "dst_rows": [2, 3], **kwargs}
    before = args["dst"].clone()
    with pytest.raises(error, match=message):
        transfer.copy_slots(**args)
    assert torch.equal(args["dst"], before)  # checks run before any byte moves


@pytest.mark.parametrize("order", [DimOrder.LBHNSC, DimOrder.BHSNC, DimOrder.HBNC], ids=lambda o: o.value)
def test_gather_into_pool_rows_then_scatter_back(order: DimOrder) -> None:
    case = make_case(order, 4, 16, n=3, seed=21)
    pool = torch.zeros((7, case.store.block_bytes), dtype=torch.uint8)
    rows = [6, 0, 2]
    transfer.gather_engine_blocks(case.engine, case.slots, pool, case.store, rows)
    got = pool[rows].view(case.store.dtype).reshape(3, *case.store.block_shape)
    assert torch.equal(got, expected_blocks(case))
    assert not pool[[1, 3, 4, 5]].any()
    # scatter shuffled rows back into a fresh engine of the same layout and read them again
    fresh = make_case(order, 4, 16, n=3, seed=22)
    transfer.scatter_engine_blocks(fresh.engine, fresh.slots, pool, case.store, rows)
    again = torch.empty((3, *case.store.block_shape), dtype=case.store.dtype)
    transfer.gather_engine_blocks(fresh.engine, fresh.slots, again, case.store)
    assert torch.equal(again, got)


def test_engine_ops_reject_mismatches() -> None:
    case = make_case(DimOrder.LBNHSC, 8, 8, n=3)
    dst = torch.empty((3, *case.store.block_shape))
    with pytest.raises(LayoutMismatchError, match="rows hold"):
        transfer.gather_engine_blocks(case.engine, case.slots, dst[:, :1].contiguous(), case.store)
    with pytest.raises(ValueError, match="rows has 2 entries for 3 blocks"):
        transfer.gather_engine_blocks(case.engine, case.slots, dst, case.store, rows=[0, 1])
    with pytest.raises(ValueError, match="names a row twice"):
        transfer.gather_engine_blocks(case.engine, case.slots, dst, case.store, rows=[0, 1, 1])
    with pytest.raises(ValueError, match="same engine token twice"):
        transfer.scatter_engine_blocks(case.engine, torch.cat([case.slots[:1]] * 2), dst[:2], case.store)
    other = make_case(DimOrder.LBNHSC, 8, 8, n=3, heads=4)
    with pytest.raises(LayoutMismatchError, match="num_kv_heads: engine 4 != store 2"):
        transfer.gather_engine_blocks(other.engine, other.slots, dst, case.store)
    with pytest.raises(TypeError, match="EngineKV"):
        transfer.gather_engine_blocks(case.layout, case.slots, dst, case.store)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot take path 'staged'"):
        transfer.gather_engine_blocks(case.engine, case.slots, dst, case.store, path="staged")


def test_paths_without_cuda_are_torch_and_the_notice_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    transfer._cuda_state.clear()
    with caplog.at_level(logging.WARNING, logger="tierkv.ops"):
        first = transfer.transfer_paths()
        transfer.transfer_paths()
        transfer.copy_slots(*pools()[:1], [0], pools()[1], [0])
    notices = [r for r in caplog.records if "torch reference path" in r.getMessage()]
    assert len(notices) == 1 and "CUDA is not available" in notices[0].getMessage()
    assert first["backend"] == "torch" and first["memcpy_batch"] is False
    assert first["copy_slots"]["device->host"] == {"16KiB": "torch", "64KiB": "torch", "256KiB": "torch", "2MiB": "torch"}
    assert set(first) >= {"gather_engine_blocks", "scatter_engine_blocks", "staging_bytes"}


def test_choose_path_table_when_kernels_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AUTO table as the GPU machine sees it (capability forced on; nothing is launched)."""
    monkeypatch.setitem(transfer._cuda_state, "ok", True)
    monkeypatch.setitem(transfer._cuda_state, "driver", 13000)
    assert transfer.choose_path("copy_slots", "device->device", 16 << 10) == "kernel"
    assert transfer.choose_path("copy_slots", "device->host", 16 << 10) == transfer.AUTO[("copy_slots", "device->host")][0]
    assert transfer.choose_path("copy_slots", "device->host", 2 << 20) == transfer.AUTO[("copy_slots", "device->host")][1]
    assert transfer.choose_path("copy_slots", "pageable->device", 2 << 20) == "torch"
    assert transfer.choose_path("gather_engine_blocks", "host->host", 2 << 20) == "torch"
    monkeypatch.setitem(transfer._cuda_state, "driver", 12040)  # no cuMemcpyBatchAsync: kernels only
    assert transfer.choose_path("copy_slots", "device->host", 2 << 20) == "kernel"


def test_memory_tier_copy_to_and_read_write() -> None:
    a = MemoryTier("device", 6, 16, torch.device("cpu"))
    b = MemoryTier("host", 5, 16, torch.device("cpu"))
    rows = torch.randint(0, 256, (3, 16), dtype=torch.uint8)
    a.write([4, 1, 2], rows, [])  # raw bytes: no index entries to stamp
    assert torch.equal(a.read([4, 1, 2]), rows)
    assert a.copy_to([2, 4], b, [0, 3], []) is True  # pool to pool: a direct copy
    assert torch.equal(b.read([0, 3]), rows[[2, 0]])
    with pytest.raises(ValueError, match="2 source slots for 1 destinations"):
        a.copy_to([2, 4], b, [0], [])
    c = MemoryTier("other", 2, 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="slot sizes differ"):
        a.copy_to([0], c, [0], [])
    with pytest.raises(ValueError, match="write needs uint8 rows"):
        a.write([0], rows[:2], [])


def test_dma_runs_merge_rows_that_advance_together() -> None:
    from tierkv.ops import dma

    a = torch.tensor([3, 4, 5, 9, 10, 2])
    b = torch.tensor([7, 8, 0, 1, 2, 3])
    starts_a, starts_b, lengths = dma.runs(a, b)
    assert list(zip(starts_a.tolist(), starts_b.tolist(), lengths.tolist())) == [(3, 7, 2), (5, 0, 1), (9, 1, 2), (2, 3, 1)]
    dsts, srcs, sizes = dma.entries(1000, a, 0, b, row_bytes=10)
    assert dsts == [1030, 1050, 1090, 1020] and srcs == [70, 0, 10, 30] and sizes == [20, 10, 20, 10]
    assert [t.size for t in dma.runs(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))] == [0, 0, 0]
    assert dma.runs(torch.tensor([5]), torch.tensor([0]))[2].tolist() == [1]
    wide = torch.tensor([2**40, 2**40 + 1])  # slot numbers past 32 bits stay exact
    assert dma.entries(0, wide, 0, torch.tensor([0, 1]), row_bytes=8)[0] == [2**43]
