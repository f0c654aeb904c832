"""The GPU block checksum (csrc/checksum.cu) against the CPU function on random data.

`checksum_rows_gpu` must give exactly `tierkv.integrity.checksum_blocks` for every block size
(1 byte .. 8 MiB, whole and partial sectors), row selection (none, subsets, repeats, in any
order, indices on the host or the device), pool alignment (every access width) and memory kind
(device, pinned host over UVA). Run on the GPU machine: `python -m pytest -m gpu tests/gpu -q`.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from tierkv.integrity import block_checksum, checksum_block_slots, checksum_blocks
from tierkv.ops.checksum import as_unsigned, block_checksums, block_roots_gpu, checksum_rows_gpu, queue_block_checksums

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Sector counts k around both root kernels' edges (one thread per block up to 32 sectors, a warp from
# 33; the warp's 512-leaf chunks) and every k % 4 (XXH64 takes 4 leaves a round, then the rest).
SIZES = [1, 7, 16, 100, 4095, 4096, 4097, 8192, 12288 + 5, 65536, 65536 + 48, 32 * 4096, 33 * 4096, 34 * 4096,
         35 * 4096 + 7, 256 << 10, (2 << 20), (2 << 20) + 1, 514 * 4096, (3 << 20) + 4000, 8 << 20]


def rand_pool(m: int, n: int, device: str = "cuda") -> torch.Tensor:
    return torch.randint(0, 256, (m, n), dtype=torch.uint8, device=device)


def gpu_sums(pool: torch.Tensor, rows: object = None, stream: torch.cuda.Stream | None = None) -> list[int]:
    s = stream or torch.cuda.current_stream()
    out = checksum_rows_gpu(pool, rows, s)  # type: ignore[arg-type]
    s.synchronize()
    return as_unsigned(out)


@pytest.mark.parametrize("n", SIZES)
def test_every_row_matches_cpu(n: int) -> None:
    m = max(1, min(9, (48 << 20) // n))
    pool = rand_pool(m, n)
    assert gpu_sums(pool) == checksum_blocks(pool.cpu())


@pytest.mark.parametrize("n", [100, 4096, 5000, 65536, (1 << 20) + 16])
def test_row_selections(n: int) -> None:
    pool = rand_pool(23, n)
    want = checksum_blocks(pool.cpu())
    picks = [[5, 1, 3, 3], [22], list(range(22, -1, -2)), torch.randperm(23)[:11].tolist()]
    for rows in picks:
        expect = [want[r] for r in rows]
        assert gpu_sums(pool, rows) == expect  # host indices
        assert gpu_sums(pool, torch.tensor(rows)) == expect  # a CPU tensor
        assert gpu_sums(pool, torch.tensor(rows, device="cuda")) == expect  # device indices, used as they are
    assert gpu_sums(pool, []) == []


@pytest.mark.parametrize("offset", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n", [4096, 4097, 4098, 4100, 4104, 3 * 4096 + 24, 65536 + 1])
def test_unaligned_pools_use_every_access_width(offset: int, n: int) -> None:
    m = 5
    flat = torch.randint(0, 256, (offset + m * n + 64,), dtype=torch.uint8, device="cuda")
    pool = flat[offset:offset + m * n].view(m, n)
    assert gpu_sums(pool) == checksum_blocks(pool.cpu())
    assert gpu_sums(pool, [4, 0]) == checksum_block_slots(pool.cpu(), [4, 0])


@pytest.mark.parametrize("n", [4096, 6000, 65536])
def test_pinned_host_pool_over_uva(n: int) -> None:
    pool = rand_pool(7, n, device="cpu").pin_memory()
    assert gpu_sums(pool) == checksum_blocks(pool)
    assert gpu_sums(pool, [6, 2]) == checksum_block_slots(pool, [6, 2])


def test_empty_blocks_and_no_rows() -> None:
    assert gpu_sums(torch.empty(4, 0, dtype=torch.uint8, device="cuda")) == [block_checksum(b"")] * 4
    assert gpu_sums(torch.empty(0, 4096, dtype=torch.uint8, device="cuda")) == []


def test_side_stream_and_bit_flips() -> None:
    n = 5 * 4096 + 300
    pool = rand_pool(4, n)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    clean = gpu_sums(pool, stream=stream)
    assert clean == checksum_blocks(pool.cpu())
    for pos in (0, 4095 * 8 + 7, 4096 * 8, n * 8 - 1, 3 * n * 8 + 12345):
        row, bit = divmod(pos, n * 8)
        pool[row, bit >> 3] ^= 1 << (bit & 7)
        got = gpu_sums(pool)
        assert got[row] != clean[row] and got == checksum_blocks(pool.cpu())
        pool[row, bit >> 3] ^= 1 << (bit & 7)
    assert gpu_sums(pool) == clean


@pytest.mark.parametrize("n", [100, 4096, 33 * 4096, 2 << 20])
def test_results_written_into_pinned_host_memory(n: int) -> None:
    """`to_host`: the root kernel stores into pinned host memory over UVA; the values are the same bits."""
    pool = rand_pool(17, n)
    want = checksum_blocks(pool.cpu())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    out = checksum_rows_gpu(pool, [16, 0, 3], side, to_host=True)
    assert not out.is_cuda and out.is_pinned()
    side.synchronize()
    assert as_unsigned(out) == [want[16], want[0], want[3]]
    assert checksum_rows_gpu(pool, [], side, to_host=True).numel() == 0
    queued = queue_block_checksums(pool)
    assert queued.result() == want == block_checksums(pool)
    assert queued.result() == want  # a second call returns the same, without waiting again


def test_a_verification_does_not_wait_for_a_large_copy_the_other_way() -> None:
    """The checksums come back without a copy engine: a hash of device rows finishes while a large
    device -> host copy queued earlier on another stream is still running (the copy engines of that
    direction are busy; a readback through them would queue behind it)."""
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    rows = rand_pool(8, 1 << 20)
    want = checksum_blocks(rows.cpu())
    assert block_checksums(rows) == want  # kernels loaded and pinned results allocated before the timing matters
    torch.cuda.synchronize()
    copy = torch.cuda.Stream()
    copied = torch.cuda.Event()
    with torch.cuda.stream(copy):
        host.copy_(big, non_blocking=True)  # ~20 ms at PCIe speed
        copied.record(copy)
    assert block_checksums(rows) == want
    assert not copied.query()  # the hash came back while the copy still ran
    copied.synchronize()


def test_refusals() -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        checksum_rows_gpu(torch.zeros(4, 4, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="pinned"):
        checksum_rows_gpu(torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        checksum_rows_gpu(torch.zeros(4, 64, dtype=torch.uint8, device="cuda")[:, :32])
    with pytest.raises(IndexError, match="row 4"):
        checksum_rows_gpu(torch.zeros(4, 64, dtype=torch.uint8, device="cuda"), [0, 4])
    with pytest.raises(ValueError, match="int64"):
        checksum_rows_gpu(torch.zeros(4, 64, dtype=torch.uint8, device="cuda"), torch.zeros(2, dtype=torch.int32, device="cuda"))
    leaves = torch.zeros(3, 1, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="pinned host memory"):  # pageable: the kernel cannot store there
        block_roots_gpu(leaves, 4096, torch.cuda.current_stream(), out=torch.empty(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"int64 \[3\]"):
        block_roots_gpu(leaves, 4096, torch.cuda.current_stream(), out=torch.empty(2, dtype=torch.int64, device="cuda"))


def test_throughput_printed(capsys: pytest.CaptureFixture[str]) -> None:
    """Not asserted: scripts/bench_checksum_gpu.py is the measurement; this is a smoke figure."""
    n = 2 << 20
    pool = rand_pool(512, n)  # 1 GiB
    stream = torch.cuda.current_stream()
    for _ in range(3):
        checksum_rows_gpu(pool, None, stream)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        checksum_rows_gpu(pool, None, stream)
        b.record(stream)
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    with capsys.disabled():
        print(f"\nchecksum_rows_gpu, 512 x 2 MiB: {pool.numel() / statistics.median(times) / 1e9:.0f} GB/s (median of 10)")
