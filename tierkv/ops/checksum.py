"""Block checksums on the GPU: `tierkv.integrity.block_checksum`, computed where the bytes are.

`checksum_rows_gpu(pool, rows, stream)` queues two kernels of `csrc/checksum.cu` on `stream`
(leaves: XXH3 of every 4 KiB sector; roots: XXH64 over each block's leaves) and returns the
checksums as an int64 CUDA tensor (the u64 bit pattern; `as_unsigned` turns it into ints).
Nothing here synchronises with the device. The pool may be device memory or pinned host memory
(read over UVA, at PCIe speed). The CPU function in `tierkv.integrity` is the reference: the
values are bit-identical.

`block_checksums(pool, rows)` is what the store calls: the same checksums wherever the pool
lives, on the GPU for CUDA memory, on the CPU for host memory (pinned host slots included:
hashing them on the GPU would pull every byte over PCIe once more). On the GPU the root kernel
writes the checksums straight into pinned host memory (`to_host=True`), and the caller waits on
an event: no copy engine is involved, so a verification is never queued behind a large DMA of
another request in the same direction (a get verifying while a put streams to host did, and
both ways at once ran no faster than one after the other).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..integrity import SECTOR_BYTES, TREE_CHECKSUM, checksum_block_slots, checksum_blocks
from .cuda_build import i32, i64, module, ptr
from .kernels import access_width

__all__ = ["TREE_CHECKSUM", "QueuedChecksums", "as_unsigned", "block_checksums", "block_roots_gpu",
           "checksum_rows_gpu", "hold_until", "queue_block_checksums", "sector_leaves_gpu"]

SOURCE = "checksum.cu"
THREADS = 256  # 64 sectors per thread block: four lanes per sector
ROOT_THREADS = 128  # the warp-per-block root kernel is written for 4 warps
ROOT_WARP_MIN_LEAVES = 33  # from this many sectors on, one warp per block computes the root
CTAS_PER_SM = 16  # grid cap; the leaf kernel's sectors loop over the grid beyond it
_U64 = (1 << 64) - 1
# Pinned result tensors a queued root kernel may still write, with an event recorded after it.
# torch's host allocator knows of copies into pinned memory, not of kernel stores: a result tensor
# dropped before its kernel ran (an abandoned load, a put that failed) must not be handed out
# again until it has.
_unfinished: list[tuple[torch.cuda.Event, torch.Tensor]] = []
_unfinished_lock = threading.Lock()


def hold_until(done: torch.cuda.Event, out: torch.Tensor) -> None:
    """Keep the pinned `out` that a kernel writes alive until `done` (recorded after that kernel) has passed."""
    with _unfinished_lock:
        _unfinished[:] = [(e, t) for e, t in _unfinished if not e.query()]
        _unfinished.append((done, out))


def as_unsigned(sums: torch.Tensor) -> list[int]:
    """The checksums of `checksum_rows_gpu` as Python ints in [0, 2**64) (a CUDA tensor is copied to the host: that syncs)."""
    return [v & _U64 for v in sums.tolist()]


def _device_rows(rows: torch.Tensor | Sequence[int], limit: int, stream: torch.cuda.Stream) -> torch.Tensor:
    """Row indices as an int64 tensor on the stream's device; host indices are bounds-checked first."""
    if isinstance(rows, torch.Tensor) and rows.is_cuda:
        if rows.dtype != torch.int64 or rows.dim() != 1:
            raise ValueError(f"rows on the GPU must be a 1-D int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
        if rows.device != stream.device:
            raise ValueError(f"rows are on {rows.device} but the stream is on {stream.device}")
        return rows.contiguous()  # not bounds-checked: that would need a host sync
    if isinstance(rows, torch.Tensor):
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise TypeError(f"rows must be integers, got {rows.dtype}")
        arr = rows.reshape(-1).to(torch.int64).numpy()
    else:
        arr = np.asarray(rows, dtype=np.int64).reshape(-1)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= limit):
        bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
        raise IndexError(f"rows holds row {bad}, outside [0, {limit})")
    host = torch.from_numpy(np.ascontiguousarray(arr))
    with torch.cuda.stream(stream):  # through pinned memory: a pageable copy would wait for the stream
        return host.pin_memory().to(stream.device, non_blocking=True)


def checksum_rows_gpu(pool: torch.Tensor, rows: torch.Tensor | Sequence[int] | None = None,
                      stream: torch.cuda.Stream | None = None, *, max_ctas: int | None = None,
                      to_host: bool = False) -> torch.Tensor:
    """`block_checksum` of each row of a `[num_rows, row_bytes]` uint8 pool, queued on `stream`.

    `pool` is a contiguous CUDA tensor or a pinned host tensor. `rows` (default: every row, in
    order) picks which rows to hash: a CPU sequence/tensor is bounds-checked here; an int64 CUDA
    tensor is used as is (checking it would sync). Returns an int64 tensor on the stream's
    device, one checksum per row picked (the u64 bits; see `as_unsigned`), valid once `stream`
    reaches that point. `stream` defaults to the current stream of the pool's device (of the
    current device for a host pool). The caching allocator ties the result to `stream`.
    With `to_host` the result is a pinned host tensor that the kernel writes over PCIe: read it
    once the stream has passed this point (an event), without a copy; it is kept alive until then.
    """
    return _checksum_rows(pool, rows, stream, max_ctas, to_host)[0]


def _checksum_rows(pool: torch.Tensor, rows: torch.Tensor | Sequence[int] | None, stream: torch.cuda.Stream | None,
                   max_ctas: int | None, to_host: bool) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """`checksum_rows_gpu`, and with `to_host` the event after the kernels (the one the pinned result is held by)."""
    if not isinstance(pool, torch.Tensor) or pool.dtype != torch.uint8 or pool.dim() != 2:
        raise ValueError(f"checksum_rows_gpu needs a 2-D uint8 pool, got {getattr(pool, 'dtype', type(pool))} "
                         f"{tuple(getattr(pool, 'shape', ()))}")
    if not pool.is_contiguous():
        raise ValueError(f"the pool must be contiguous rows, got strides {pool.stride()}")
    if pool.is_cuda:
        device = pool.device
    elif pool.is_pinned():
        device = stream.device if stream is not None else torch.device("cuda", torch.cuda.current_device())
    else:
        raise ValueError("checksum_rows_gpu hashes CUDA or pinned host memory; "
                         "use tierkv.integrity.checksum_blocks for pageable memory")
    s = stream if stream is not None else torch.cuda.current_stream(device)
    if s.device != device:
        raise ValueError(f"stream is on {s.device} but the pool is on {device}")
    num_rows, n = pool.shape
    dev_rows = None if rows is None else _device_rows(rows, num_rows, s)
    m = num_rows if dev_rows is None else dev_rows.numel()
    k = -(-n // SECTOR_BYTES)
    if m >= 1 << 31 or m * k >= 1 << 40:
        raise ValueError(f"{m} rows of {k} sectors is too many for one call")
    with torch.cuda.stream(s):
        out = torch.empty(m, dtype=torch.int64, pin_memory=True) if to_host else torch.empty(m, dtype=torch.int64, device=device)
        if m:
            leaves = torch.empty((m, k), dtype=torch.int64, device=device)
            _queue_leaves(pool, dev_rows, leaves, s, max_ctas)
            block_roots_gpu(leaves, n, s, out=out)
        if not to_host:
            return out, None
        done = torch.cuda.Event()
        done.record(s)
        hold_until(done, out)
        return out, done


def sector_leaves_gpu(pool: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """Queue the leaves of `TREE_CHECKSUM` (XXH3 of each 4 KiB sector) of every row of a CUDA pool into `out`.

    `pool` is a contiguous `[m, n]` uint8 CUDA tensor whose rows are whole sectors (n a multiple of
    4096), and `out` a contiguous `[m, n // 4096]` int64 tensor on the same device. A leaf depends
    on its sector's bytes alone, so the rows may be slices of longer blocks cut at sector
    boundaries (one layer of each block, as a layer-wise load has them): their leaves are those
    block's leaves at that position, and `block_roots_gpu` finishes the blocks once all are in.
    """
    if pool.dtype != torch.uint8 or pool.dim() != 2 or not pool.is_cuda or not pool.is_contiguous():
        raise ValueError(f"sector_leaves_gpu needs a contiguous 2-D uint8 CUDA pool, got {pool.dtype} "
                         f"{tuple(pool.shape)} on {pool.device}")
    m, n = pool.shape
    if n % SECTOR_BYTES:
        raise ValueError(f"rows of {n} bytes are not whole {SECTOR_BYTES}-byte sectors")
    if out.shape != (m, n // SECTOR_BYTES) or out.dtype != torch.int64 or not out.is_contiguous() or out.device != pool.device:
        raise ValueError(f"out must be a contiguous int64 [{m}, {n // SECTOR_BYTES}] tensor on {pool.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if m:
        _queue_leaves(pool, None, out, stream, None)


def block_roots_gpu(leaves: torch.Tensor, block_bytes: int, stream: torch.cuda.Stream,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """`TREE_CHECKSUM` of blocks of `block_bytes` from their `[m, k]` int64 leaves (contiguous, CUDA), queued on `stream`.

    Written into `out` when given: `m` int64 on the leaves' device, or in pinned host memory,
    which the kernel reaches over UVA (the root of a block is one 8-byte store); the caller then
    keeps a pinned `out` alive until the kernel has run (`hold_until`).
    """
    m, k = leaves.shape
    if k != -(-block_bytes // SECTOR_BYTES) or not leaves.is_contiguous():
        raise ValueError(f"leaves must be contiguous [m, {-(-block_bytes // SECTOR_BYTES)}] for blocks of "
                         f"{block_bytes} bytes, got {tuple(leaves.shape)}")
    if out is not None and (out.shape != (m,) or out.dtype != torch.int64 or not out.is_contiguous()
                            or not (out.device == leaves.device or out.is_pinned())):
        raise ValueError(f"out must be a contiguous int64 [{m}] tensor on {leaves.device} or in pinned host memory, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    with torch.cuda.stream(stream):
        if out is None:
            out = torch.empty(m, dtype=torch.int64, device=leaves.device)
        if m == 0:
            return out
        mod = module(SOURCE, leaves.device)
        per_cta = ROOT_THREADS // 32 if k >= ROOT_WARP_MIN_LEAVES else ROOT_THREADS
        name = "tierkv_checksum_roots_warp" if k >= ROOT_WARP_MIN_LEAVES else "tierkv_checksum_roots"
        src = leaves if k else out  # no sectors: the kernels read no leaves
        mod.launch(name, max(1, min(-(-m // per_cta), mod.num_sms * CTAS_PER_SM)), ROOT_THREADS,
                   [ptr(src), i64(block_bytes), i32(k), i32(m), ptr(out)], stream)
    return out


def _queue_leaves(pool: torch.Tensor, dev_rows: torch.Tensor | None, leaves: torch.Tensor,
                  stream: torch.cuda.Stream, max_ctas: int | None) -> None:
    """Launch the leaf kernel: `leaves[j]` = the sector hashes of row `dev_rows[j]` (or row j) of `pool`."""
    m, k = leaves.shape
    if k == 0:
        return
    n = pool.shape[1]
    mod = module(SOURCE, stream.device)
    w = access_width(pool.data_ptr(), n)
    limit = mod.num_sms * CTAS_PER_SM if max_ctas is None else max_ctas
    grid = max(1, min(-(-m * k // (THREADS // 4)), limit))
    rows_arg = ptr(0) if dev_rows is None else ptr(dev_rows)
    mod.launch(f"tierkv_checksum_leaves_w{w}", grid, THREADS,
               [ptr(pool), rows_arg, i64(n), i32(k), i32(m), ptr(leaves)], stream)


@dataclass
class QueuedChecksums:
    """Block checksums on their way: queued on the GPU (`done` marks them written into `sums`) or already known."""

    sums: torch.Tensor | list[int]
    done: torch.cuda.Event | None = None

    def result(self) -> list[int]:
        """The checksums as u64 ints, waiting for the kernels if they are still running."""
        if self.done is not None:
            self.done.synchronize()
            self.done = None
        if isinstance(self.sums, torch.Tensor):
            self.sums = as_unsigned(self.sums)
        return self.sums


def queue_block_checksums(pool: torch.Tensor, rows: Sequence[int] | None = None,
                          stream: torch.cuda.Stream | None = None) -> QueuedChecksums:
    """`block_checksums` without the wait: on the GPU the host may go on with other work while the kernels run.

    CUDA memory is hashed by the kernels on `stream` (default: the pool device's current stream,
    so the hash is ordered after the copies queued there), which write the checksums straight
    into pinned host memory; without the CUDA toolchain the rows are copied to the host and
    hashed there. CPU memory is hashed in place by `tierkv.integrity`, at once. Either way the
    values are the same bits.
    """
    if not pool.is_cuda:
        return QueuedChecksums(checksum_blocks(pool) if rows is None else checksum_block_slots(pool, rows))
    from .transfer import cuda_kernels_available  # transfer imports the copy kernels; only GPU callers need it

    if cuda_kernels_available():
        s = stream if stream is not None else torch.cuda.current_stream(pool.device)
        sums, done = _checksum_rows(pool.contiguous(), None if rows is None else list(rows), s, None, True)
        return QueuedChecksums(sums, done)
    picked = pool if rows is None else pool[torch.as_tensor(list(rows), dtype=torch.int64, device=pool.device)]
    return QueuedChecksums(checksum_blocks(picked.cpu()))


def block_checksums(pool: torch.Tensor, rows: Sequence[int] | None = None,
                    stream: torch.cuda.Stream | None = None) -> list[int]:
    """`TREE_CHECKSUM` of each row of a `[num_rows, row_bytes]` uint8 pool (or of rows `rows`), where the pool is.

    What `queue_block_checksums` queues, waited for.
    """
    return queue_block_checksums(pool, rows, stream).result()
