"""Every CUDA/Triton kernel against its torch reference on fresh random inputs, outputs poisoned first.

Run on the GPU machine: `python -m pytest -m gpu tests/gpu -q`.
"""

from __future__ import annotations

import pytest
import torch

from cases import BLOCK_RATIOS, make_case
from tierkv import KVLayout
from tierkv.ops import reference as ref
from tierkv.ops import staging, transfer
from tierkv.ops.cuda_build import KernelError, i32, i64, module, ptr
from tierkv.ops.engine_layout import DimOrder
from tierkv.ops.paged_attention import paged_attention
from tierkv.tiers import MemoryTier

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
POISON = 0xA5


def poisoned(shape: tuple[int, ...], *, pinned: bool = False, cuda: bool = True) -> torch.Tensor:
    t = torch.full(shape, POISON, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    return t.pin_memory() if pinned else t


def rand_rows(n: int, width: int, device: str = "cuda", pinned: bool = False) -> torch.Tensor:
    t = torch.randint(0, 256, (n, width), dtype=torch.uint8, device=device)
    return t.pin_memory() if pinned else t


# -- copy_slots -------------------------------------------------------------------------

DIRECTIONS = {"d2d": (True, True), "d2h": (True, False), "h2d": (False, True)}


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("path", ["kernel", "dma", "staged", "torch"])
@pytest.mark.parametrize("width", [6, 48, 16 << 10, (1 << 20) + 16])
@pytest.mark.parametrize("n", [1, 5, 33])
def test_copy_slots(direction: str, path: str, width: int, n: int) -> None:
    if path == "staged" and direction == "d2d":
        pytest.skip("staging exists only across PCIe")
    src_cuda, dst_cuda = DIRECTIONS[direction]
    src = rand_rows(2 * n + 3, width, "cuda" if src_cuda else "cpu", pinned=not src_cuda)
    dst = poisoned((2 * n + 1, width), pinned=not dst_cuda, cuda=dst_cuda)
    sr = torch.randperm(src.shape[0])[:n]
    dr = torch.randperm(dst.shape[0])[:n]
    want = dst.cpu().clone()
    want[dr] = src.cpu()[sr]
    stream = torch.cuda.Stream()
    event = transfer.copy_slots(src, sr, dst, dr, stream=stream, path=path)
    event.synchronize()
    assert torch.equal(dst.cpu(), want)


def test_staged_copies_pipeline_over_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "STAGING_BYTES", 3 * 4096)  # 3 rows per chunk, 11 chunks, 2 buffers
    src = rand_rows(40, 4096)
    host = poisoned((50, 4096), pinned=True, cuda=False)
    sr, hr = torch.randperm(40)[:31], torch.randperm(50)[:31]
    transfer.copy_slots(src, sr, host, hr, path="staged").synchronize()
    assert torch.equal(host[hr], src.cpu()[sr])
    back = poisoned((40, 4096))
    transfer.copy_slots(host, hr, back, sr, path="staged").synchronize()
    assert torch.equal(back[sr.cuda()], src[sr.cuda()])


# -- engine gather / scatter ------------------------------------------------------------

ORDERS = list(DimOrder)


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.value)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio", BLOCK_RATIOS, ids=[f"e{e}-s{s}" for e, s in BLOCK_RATIOS])
def test_gather_kernel_to_device(order: DimOrder, dtype: torch.dtype, ratio: tuple[int, int]) -> None:
    case = make_case(order, *ratio, n=5, dtype=dtype, device="cuda", head_dim=64, seed=torch.seed() & 0xFFFF)
    want = ref.gather_engine_blocks(case.engine, case.slots, ratio[1])
    pool = poisoned((9, case.store.block_bytes))
    rows = [8, 0, 3, 5, 1]
    transfer.gather_engine_blocks(case.engine, case.slots, pool, case.store, rows, path="kernel").synchronize()
    got = pool[rows].view(dtype).reshape(5, *case.store.block_shape)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert (pool[[2, 4, 6, 7]] == POISON).all()


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.value)
@pytest.mark.parametrize("path", ["kernel", "staged"])
@pytest.mark.parametrize("ratio", [(16, 16), (4, 16), (2, 16), (64, 16), (128, 16)], ids=["r1", "s4", "s8", "e4", "e8"])
def test_gather_to_pinned_host(order: DimOrder, path: str, ratio: tuple[int, int]) -> None:
    case = make_case(order, *ratio, n=7, dtype=torch.bfloat16, device="cuda", heads=4, head_dim=128, seed=torch.seed() & 0xFFFF)
    want = ref.gather_engine_blocks(case.engine, case.slots, ratio[1]).cpu()
    host = poisoned((12, case.store.block_bytes), pinned=True, cuda=False)
    rows = [11, 0, 3, 4, 5, 9, 1]  # a run (3, 4, 5) and singles
    transfer.gather_engine_blocks(case.engine, case.slots, host, case.store, rows, path=path).synchronize()
    assert torch.equal(host[rows], want.view(torch.uint8).reshape(7, -1))
    assert (host[[2, 6, 7, 8, 10]] == POISON).all()


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.value)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("ratio", "where", "path"), [
    ((8, 8), "device", "kernel"), ((4, 16), "device", "kernel"), ((16, 2), "device", "kernel"),
    ((2, 16), "host", "kernel"), ((16, 4), "host", "staged"), ((8, 8), "host", "staged"),
], ids=["r1-dev", "s4-dev", "e8-dev", "s8-uva", "e4-staged", "r1-staged"])
def test_scatter(order: DimOrder, dtype: torch.dtype, ratio: tuple[int, int], where: str, path: str) -> None:
    case = make_case(order, *ratio, n=5, dtype=dtype, device="cuda", head_dim=64, seed=torch.seed() & 0xFFFF)
    rows = [4, 0, 6, 2, 3]
    src = torch.randn((7, *case.store.block_shape), device="cuda").to(dtype)
    if where == "host":
        src = src.cpu().pin_memory()
    expected = make_case(order, *ratio, n=5, dtype=dtype, device="cuda", head_dim=64)
    for a, b in zip(expected.raw, case.raw):
        a.copy_(b)
    ref.scatter_engine_blocks(expected.engine, case.slots, src[rows].cuda())
    transfer.scatter_engine_blocks(case.engine, case.slots, src, case.store, rows, path=path).synchronize()
    for got, want in zip(case.raw, expected.raw):  # addressed tokens written, every other byte untouched
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_auto_paths_round_trip_through_pinned_host() -> None:
    case = make_case(DimOrder.LBHNSC, 16, 16, n=9, dtype=torch.bfloat16, device="cuda", num_layers=4, heads=8, head_dim=128)
    host = poisoned((20, case.store.block_bytes), pinned=True, cuda=False)
    rows = torch.randperm(20)[:9]
    transfer.gather_engine_blocks(case.engine, case.slots, host, case.store, rows)
    want = [t.clone() for t in case.raw]
    for t in case.raw:
        t.normal_()
    transfer.scatter_engine_blocks(case.engine, case.slots, host, case.store, rows).synchronize()
    blocks = ref.gather_engine_blocks(case.engine, case.slots, 16)
    assert torch.equal(blocks.cpu().view(torch.uint8).reshape(9, -1), host[rows])
    assert not torch.equal(case.raw[0], want[0])  # only the addressed tokens came back


# -- tiers --------------------------------------------------------------------------------


def test_memory_tiers_move_blocks_and_cpu_reads_wait_for_the_copy() -> None:
    width = 64 << 10
    dev = MemoryTier("device", 64, width, torch.device("cuda"))
    host = MemoryTier("host", 64, width, torch.device("cpu"), pin=True)
    rows = rand_rows(40, width)
    slots = torch.randperm(64)[:40].tolist()
    dev.write(slots, rows, [])  # raw bytes: no index entries to stamp
    host_slots = torch.randperm(64)[:40].tolist()
    assert dev.copy_to(slots, host, host_slots, [])
    assert torch.equal(host.read(host_slots), rows.cpu())  # read right away: must wait for the DMA
    back = torch.randperm(64)[:40].tolist()
    dev.storage.fill_(POISON)
    assert host.copy_to(host_slots, dev, back, [])
    assert torch.equal(dev.read(back), rows)
    host.write(host_slots[:3], rows[:3].flip(0), [])  # device rows into host slots
    assert torch.equal(host.read(host_slots[:3]), rows[:3].flip(0).cpu())


# -- errors -------------------------------------------------------------------------------


def test_cuda_errors_name_the_kernel() -> None:
    mod = module("transfer.cu", torch.device("cuda"))
    a = torch.zeros(4, 16, dtype=torch.uint8, device="cuda")
    idx = torch.zeros(1, dtype=torch.int64, device="cuda")
    args = [ptr(a), ptr(idx), ptr(a), ptr(idx), i64(16), i32(1), i32(1)]
    with pytest.raises(KernelError, match="kernel tierkv_copy_rows_w16 .*failed: CUDA_ERROR_INVALID_VALUE"):
        mod.launch("tierkv_copy_rows_w16", 1, 4096, args, torch.cuda.current_stream())  # too many threads
    with pytest.raises(KernelError, match="no_such_kernel: cuModuleGetFunction failed"):
        mod.launch("no_such_kernel", 1, 32, args, torch.cuda.current_stream())


def test_transfer_paths_report_cuda() -> None:
    info = transfer.transfer_paths()
    assert info["backend"] == "cuda" and info["arch"].startswith("sm_")
    assert info["copy_slots"]["device->device"]["16KiB"] == "kernel"


# -- paged attention ----------------------------------------------------------------------


def sdpa_expected(q, pool, lay, layer, table, lens):
    """float64 SDPA over each sequence's KV gathered into contiguous tensors."""
    b, tq, hq, d = q.shape
    typed = pool.view(torch.uint8).reshape(pool.shape[0], -1).view(lay.dtype).reshape(pool.shape[0], *lay.block_shape)
    outs = []
    for i in range(b):
        n = int(lens[i])
        nb = -(-n // lay.block_tokens)
        kv = typed[table[i, :nb].long(), layer]  # [nb, 2, bt, hkv, d]
        k = kv[:, 0].reshape(-1, lay.num_kv_heads, d)[:n].transpose(0, 1).double()
        v = kv[:, 1].reshape(-1, lay.num_kv_heads, d)[:n].transpose(0, 1).double()
        qi = q[i].transpose(0, 1).double()  # [hq, tq, d]
        mask = torch.arange(n, device=q.device)[None, :] <= (n - tq + torch.arange(tq, device=q.device))[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(qi[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("tq", "lens", "splits"), [
    (1, (1, 37, 300), None), (1, (700, 64), 5), (1, (2000,), None), (17, (17, 90), None), (64, (250,), 3),
], ids=["decode", "decode-split", "decode-long", "prefill-chunk", "prefill-split"])
def test_paged_attention_matches_sdpa(dtype: torch.dtype, head_dim: int, tq: int, lens: tuple[int, ...],
                                      splits: int | None) -> None:
    hq, hkv, bt = 8, 2, 16
    lay = KVLayout(num_layers=3, kv_factor=2, num_kv_heads=hkv, head_dim=head_dim, dtype=dtype, block_tokens=bt)
    max_blocks = -(-max(lens) // bt)
    slots = len(lens) * max_blocks + 5
    pool = torch.randn((slots, *lay.block_shape), device="cuda").to(dtype).view(torch.uint8).reshape(slots, -1)
    table = torch.randperm(slots, device="cuda")[: len(lens) * max_blocks].reshape(len(lens), max_blocks).int()
    q = torch.randn((len(lens), tq, hq, head_dim), device="cuda").to(dtype)
    lens_t = torch.tensor(lens)
    torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")  # freed at once: the output likely reuses it
    out = paged_attention(q, pool, lay, 2, table, lens_t, num_splits=splits)
    want = sdpa_expected(q, pool, lay, 2, table, lens_t)
    assert torch.isfinite(out).all()
    rel = ((out.double() - want).norm() / want.norm()).item()
    assert rel < (1e-3 if dtype == torch.float32 else 1e-2), rel
