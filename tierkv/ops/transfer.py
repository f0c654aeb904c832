"""The one entry point for moving KV blocks: engine pages <-> store rows, and slot pool -> slot pool.

Each call picks a path by direction and block size, unless the caller names one:

    torch   the references in `reference.py`: the only path without CUDA, and for pageable memory
            (engine pages <-> rows with both in CPU memory take `chunk_copy.py` where it applies,
            unless a caller names this path)
    kernel  one copy kernel; pinned host memory is reached over UVA. Full PCIe speed, but it
            holds SMs for the whole transfer, which starves a model running beside it
    dma     copy engines only (`cuMemcpyBatchAsync`), one entry per run of consecutive rows;
            no SMs, full speed once entries are large (>= ~1 MiB)
    staged  a short device-side gather into a staging buffer, then DMA per run of consecutive
            host rows (and the mirror image towards the device). Host rows are visited in sorted
            order so that consecutive slots become one DMA entry

`AUTO` below is the choice, taken from measurements on an H100 (docs/performance.md).
Everything is queued on the caller's stream (default: the current stream) and the call returns
a `torch.cuda.Event` recorded after the work, or None when no GPU is involved. Nothing here
synchronises with the device; index checks run on the host before anything is queued.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import LayoutMismatchError
from ..layout import KVLayout
from . import dma, kernels
from . import reference as ref
from .chunk_copy import copy_chunks
from .cuda_build import KernelError, cuda_driver, nvrtc_version
from .engine_layout import EngineKV
from .staging import STAGING_BYTES, staged_from_host, staged_to_host, upload

log = logging.getLogger("tierkv.ops")

PATHS = ("torch", "kernel", "dma", "staged")
DMA_DIRECT_MIN = 256 << 10  # from this block size on, DMA straight from slot to slot (no staging pass)

# (operation, direction) -> path for blocks below DMA_DIRECT_MIN, path from it on.
AUTO: dict[tuple[str, str], tuple[str, str]] = {
    ("copy_slots", "device->device"): ("kernel", "kernel"),
    ("copy_slots", "device->host"): ("staged", "dma"),
    ("copy_slots", "host->device"): ("staged", "dma"),
    ("gather_engine_blocks", "device->device"): ("kernel", "kernel"),
    ("gather_engine_blocks", "device->host"): ("staged", "staged"),
    ("scatter_engine_blocks", "device->device"): ("kernel", "kernel"),
    ("scatter_engine_blocks", "host->device"): ("staged", "staged"),
}

Rows = Sequence[int] | torch.Tensor
_cuda_state: dict[str, bool | int | str] = {}  # "ok": bool, "nvrtc": "major.minor", "driver": int


# -- capability ------------------------------------------------------------------------


def cuda_kernels_available() -> bool:
    """CUDA, cuda-python and NVRTC are all present; otherwise the torch path, with one logged notice."""
    if "ok" not in _cuda_state:
        reason = None
        if not torch.cuda.is_available():
            reason = "CUDA is not available"
        else:
            try:
                _cuda_state["nvrtc"] = "{}.{}".format(*nvrtc_version())
                _, version = cuda_driver().cuDriverGetVersion()
                _cuda_state["driver"] = version
            except Exception as e:  # noqa: BLE001 - any failure to load the toolchain means: no kernels
                reason = f"cuda-python / NVRTC could not be loaded ({type(e).__name__}: {e})"
        _cuda_state["ok"] = reason is None
        if reason:
            log.warning("tierkv: %s; block transfers use the torch reference path", reason)
    return bool(_cuda_state["ok"])


def dma_available() -> bool:
    """`cuMemcpyBatchAsync` needs a CUDA 12.8+ driver."""
    return cuda_kernels_available() and int(_cuda_state.get("driver", 0)) >= 12080


def _where(t: torch.Tensor) -> str:
    if t.is_cuda:
        return "device"
    return "host" if (torch.cuda.is_available() and t.is_pinned()) else "pageable"


def _direction(src: torch.Tensor, dst: torch.Tensor) -> str:
    return f"{_where(src)}->{_where(dst)}"


def choose_path(op: str, direction: str, block_bytes: int) -> str:
    """The path `op` takes for `direction` ("device->host", ...) and blocks of `block_bytes`."""
    if (op, direction) not in AUTO or not cuda_kernels_available():
        return "torch"
    small, large = AUTO[(op, direction)]
    path = large if block_bytes >= DMA_DIRECT_MIN else small
    if path in ("dma", "staged") and not dma_available():
        return "kernel"
    return path


def transfer_paths() -> dict[str, object]:
    """What each transfer does on this machine, for `tierkv info`."""
    sizes = {"16KiB": 16 << 10, "64KiB": 64 << 10, "256KiB": 256 << 10, "2MiB": 2 << 20}
    out: dict[str, object] = {
        "backend": "cuda" if cuda_kernels_available() else "torch",
        "nvrtc": _cuda_state.get("nvrtc"),
        "cuda_driver": _cuda_state.get("driver"),
        "memcpy_batch": dma_available(),
        "staging_bytes": STAGING_BYTES,
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        out["arch"] = f"sm_{major}{minor}"
    per_op: dict[str, dict[str, dict[str, str]]] = {}
    for op, direction in AUTO:
        per_op.setdefault(op, {})[direction] = {name: choose_path(op, direction, b) for name, b in sizes.items()}
    out.update(per_op)
    return out


# -- argument checks -------------------------------------------------------------------


def _rows_tensor(rows: Rows, name: str) -> torch.Tensor:
    """Row indices as a 1-D int64 CPU tensor; lists go through numpy, which converts them fastest."""
    if isinstance(rows, torch.Tensor):
        t = rows.reshape(-1)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be integers, got {t.dtype}")
        return t.to(device="cpu", dtype=torch.int64)
    arr = np.asarray(rows).reshape(-1)
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got {arr.dtype}")
    return torch.from_numpy(arr.astype(np.int64, copy=False))


def _check_rows(rows: torch.Tensor, limit: int, name: str, unique: bool) -> None:
    if rows.numel() == 0:
        return
    arr = rows.numpy()
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= limit:
        raise IndexError(f"{name} holds row {lo if lo < 0 else hi}, outside [0, {limit})")
    if unique and arr.size > 1 and bool((np.diff(np.sort(arr)) == 0).any()):  # sorting, not a count per slot of the pool
        raise ValueError(f"{name} names a row twice: the copy would write it twice")


def _as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """A row pool as `[num_rows, row_bytes]` uint8 without a copy."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of rows, got shape {tuple(t.shape)} strides {t.stride()}")
    return t.view(torch.uint8).reshape(t.shape[0], -1) if t.numel() else t.reshape(t.shape[0], 0).view(torch.uint8)


def _store_rows(t: torch.Tensor, layout: KVLayout, name: str) -> torch.Tensor:
    pool = _as_rows(t, name)
    if pool.shape[1] != layout.block_bytes:
        raise LayoutMismatchError(
            f"{name} rows hold {pool.shape[1]} bytes but a block of the store layout holds {layout.block_bytes}"
        )
    return pool


def _stream_for(*tensors: torch.Tensor, stream: torch.cuda.Stream | None) -> torch.cuda.Stream | None:
    devices = {t.device for t in tensors if t.is_cuda}
    if len(devices) > 1:
        raise ValueError(f"tensors are on several GPUs {sorted(map(str, devices))}; copy between GPUs is not supported")
    if not devices:
        return None
    device = devices.pop()
    s = stream if stream is not None else torch.cuda.current_stream(device)
    if s.device != device:
        raise ValueError(f"stream is on {s.device} but the tensors are on {device}")
    return s


def _done(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    if stream is None:
        return None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


def _check_path(path: str | None, op: str, direction: str, row_bytes: int, allowed: tuple[str, ...]) -> str:
    if path is None:
        return choose_path(op, direction, row_bytes)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    if path not in allowed:
        raise ValueError(f"{op} {direction} cannot take path {path!r}; it can take {allowed}")
    if path != "torch" and not cuda_kernels_available():
        raise KernelError(f"path {path!r} needs CUDA kernels, which are not available here")
    return path


def _allowed(op: str, direction: str) -> tuple[str, ...]:
    if (op, direction) not in AUTO:  # pageable memory, host->host, or an engine that is not on the GPU
        return ("torch",)
    if direction == "device->device":
        return ("torch", "kernel", "dma") if op == "copy_slots" else ("torch", "kernel")
    return ("torch", "kernel", "dma", "staged") if op == "copy_slots" else ("torch", "kernel", "staged")


# -- public API ------------------------------------------------------------------------


def copy_slots(src: torch.Tensor, src_rows: Rows, dst: torch.Tensor, dst_rows: Rows, *,
               stream: torch.cuda.Stream | None = None, path: str | None = None) -> torch.cuda.Event | None:
    """`dst[dst_rows[i]] = src[src_rows[i]]` between two slot pools with rows of equal width.

    Pools are contiguous tensors whose first dimension is the slot (tier storage is
    `[num_slots, slot_bytes]` uint8); either may live on the GPU or in pinned host memory.
    """
    s_pool, d_pool = _as_rows(src, "src"), _as_rows(dst, "dst")
    if s_pool.shape[1] != d_pool.shape[1]:
        raise ValueError(f"src rows hold {s_pool.shape[1]} bytes, dst rows {d_pool.shape[1]}: pools must match")
    sr, dr = _rows_tensor(src_rows, "src_rows"), _rows_tensor(dst_rows, "dst_rows")
    if sr.numel() != dr.numel():
        raise ValueError(f"src_rows has {sr.numel()} entries, dst_rows {dr.numel()}")
    _check_rows(sr, s_pool.shape[0], "src_rows", unique=False)
    _check_rows(dr, d_pool.shape[0], "dst_rows", unique=True)
    direction = _direction(src, dst)
    row_bytes = s_pool.shape[1]
    chosen = _check_path(path, "copy_slots", direction, row_bytes, _allowed("copy_slots", direction))
    s = _stream_for(s_pool, d_pool, stream=stream)
    if sr.numel() == 0 or row_bytes == 0:
        return _done(s)
    if chosen == "torch":
        with _on(s):
            ref.copy_slots(s_pool, sr, d_pool, dr)
        return _done(s)
    assert s is not None
    if chosen == "kernel":
        idx = upload(torch.stack([sr, dr]), s)  # one small host->device copy for both index lists
        kernels.copy_rows(s_pool, idx[0], d_pool, idx[1], row_bytes, s)
        return _done(s)
    if chosen == "dma":
        entries = dma.entries(d_pool.data_ptr(), dr, s_pool.data_ptr(), sr, row_bytes)
        _dma(entries, s, to_device=direction == "host->device")
        return _done(s)
    if s_pool.is_cuda:  # staged device -> host
        def fill(buf: torch.Tensor, items: torch.Tensor, buf_rows: torch.Tensor, fs: torch.cuda.Stream) -> None:
            kernels.copy_rows(s_pool, items, buf, buf_rows, row_bytes, fs)

        staged_to_host(sr, dr, d_pool, row_bytes, fill, s)
    else:
        def drain(buf: torch.Tensor, items: torch.Tensor, buf_rows: torch.Tensor, fs: torch.cuda.Stream) -> None:
            kernels.copy_rows(buf, buf_rows, d_pool, items, row_bytes, fs)

        staged_from_host(dr, sr, s_pool, row_bytes, drain, s)
    return _done(s)


def copy_rows_where(src: torch.Tensor, src_rows: torch.Tensor, dst: torch.Tensor, dst_rows: torch.Tensor, *,
                    stream: torch.cuda.Stream | None = None) -> None:
    """`dst[dst_rows[j]] = src[src_rows[j]]` for every j with `src_rows[j] >= 0`; the others copy nothing.

    For callers whose index lists are computed on the device (`tierkv.decode`): a fixed-length
    list in which only some entries are real, so the host never needs to know how many. No
    checks and no synchronisation: the rows are trusted (the caller built them), the source
    rows of real entries must lie in `src`, their `dst_rows` in `dst` and be distinct. Where
    a pool is on the GPU and the copy kernels are there, one launch of `copy_rows` (pinned host
    memory over UVA); otherwise a masked torch index copy (which does synchronise on CUDA).
    """
    s_pool, d_pool = _as_rows(src, "src"), _as_rows(dst, "dst")
    if s_pool.shape[1] != d_pool.shape[1]:
        raise ValueError(f"src rows hold {s_pool.shape[1]} bytes, dst rows {d_pool.shape[1]}: pools must match")
    if src_rows.numel() == 0 or s_pool.shape[1] == 0:
        return
    s = _stream_for(s_pool, d_pool, src_rows, dst_rows, stream=stream)
    if s is not None and src_rows.is_cuda and dst_rows.is_cuda and cuda_kernels_available():
        kernels.copy_rows(s_pool, src_rows.reshape(-1).contiguous(), d_pool, dst_rows.reshape(-1).contiguous(),
                          s_pool.shape[1], s)
        return
    with _on(s):
        ok = src_rows.reshape(-1) >= 0
        rows = s_pool.index_select(0, src_rows.reshape(-1)[ok].to(s_pool.device))
        d_pool.index_copy_(0, dst_rows.reshape(-1)[ok].to(d_pool.device), rows.to(d_pool.device))


def gather_engine_blocks(engine: EngineKV, slots: torch.Tensor, dst: torch.Tensor, layout: KVLayout, rows: Rows | None = None, *,
                         stream: torch.cuda.Stream | None = None, path: str | None = None) -> torch.cuda.Event | None:
    """Copy engine pages into store blocks: row `rows[j]` of `dst` gets the tokens `slots[j]` names.

    `slots` is `[n, chunks]` from `chunk_slots`; `dst` is `[m, *layout.block_shape]` of the
    layout's dtype or a `[m, block_bytes]` row pool (a tier's storage), on the GPU or pinned
    host; `rows` defaults to `0..n-1`.
    """
    return _engine_op(True, engine, slots, dst, layout, rows, stream, path)


def scatter_engine_blocks(engine: EngineKV, slots: torch.Tensor, src: torch.Tensor, layout: KVLayout, rows: Rows | None = None, *,
                          stream: torch.cuda.Stream | None = None, path: str | None = None) -> torch.cuda.Event | None:
    """Copy store blocks (row `rows[j]` of `src`) into the engine tokens `slots[j]` names."""
    return _engine_op(False, engine, slots, src, layout, rows, stream, path)


def _engine_op(to_store: bool, engine: EngineKV, slots: torch.Tensor, store: torch.Tensor, layout: KVLayout,
               rows: Rows | None, stream: torch.cuda.Stream | None, path: str | None) -> torch.cuda.Event | None:
    op = "gather_engine_blocks" if to_store else "scatter_engine_blocks"
    if not isinstance(engine, EngineKV):
        raise TypeError(f"engine must be an EngineKV, got {type(engine).__name__}")
    engine.layout.check_store(layout)
    pool = _store_rows(store, layout, "dst" if to_store else "src")
    slots = torch.as_tensor(slots)
    ref.check_slots(engine, slots, layout.block_tokens, unique=not to_store)
    slots = slots.to(device="cpu", dtype=torch.int64)
    n = slots.shape[0]
    r = torch.arange(n, dtype=torch.int64) if rows is None else _rows_tensor(rows, "rows")
    if r.numel() != n:
        raise ValueError(f"rows has {r.numel()} entries for {n} blocks of slots")
    _check_rows(r, pool.shape[0], "rows", unique=to_store)
    ew, pw = _where(engine.tensors[0]), _where(pool)
    direction = f"{ew}->{pw}" if to_store else f"{pw}->{ew}"
    chosen = _check_path(path, op, direction, layout.block_bytes, _allowed(op, direction))
    s = _stream_for(pool, *engine.tensors, stream=stream)
    if n == 0:
        return _done(s)
    bt, bb = layout.block_tokens, layout.block_bytes
    if chosen == "torch" and path is None and copy_chunks(to_store, engine, slots, pool, r, layout):
        return _done(s)  # CPU memory on both sides: one copy per chunk, straight between pages and rows
    if chosen == "torch":
        with _on(s):
            if to_store:
                blocks = ref.gather_engine_blocks(engine, slots, bt)
                ref.copy_slots(_as_rows(blocks, "blocks"), torch.arange(n), pool, r)
            else:
                blocks = pool.index_select(0, r.to(pool.device)).view(layout.dtype).reshape(n, *layout.block_shape)
                ref.scatter_engine_blocks(engine, slots, blocks)
        return _done(s)
    assert s is not None
    g = engine.layout.chunk_tokens(bt)
    if chosen == "kernel":
        kernels.engine_copy(to_store, engine, upload(slots, s), g, bt, pool, upload(r, s), bb, s)
        return _done(s)

    def kernel(buf: torch.Tensor, items: torch.Tensor, buf_rows: torch.Tensor, fs: torch.cuda.Stream) -> None:
        kernels.engine_copy(to_store, engine, items, g, bt, buf, buf_rows, bb, fs)

    # Staged: the items are the engine slots themselves, permuted to host-row order.
    if to_store:
        staged_to_host(slots, r, pool, bb, kernel, s)
    else:
        staged_from_host(slots, r, pool, bb, kernel, s)
    return _done(s)


# -- machinery -------------------------------------------------------------------------


def _on(s: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """`torch.cuda.stream(s)` when there is a stream, else nothing (CPU-only work)."""
    return torch.cuda.stream(s) if s is not None else contextlib.nullcontext()


def _dma(entries: tuple[list[int], list[int], list[int]], s: torch.cuda.Stream, to_device: bool) -> None:
    """Queue DMA entries on the copy stream of their direction, ordered after everything on `s` and before what follows on it."""
    cs = dma.copy_stream(s.device, to_device)
    cs.wait_stream(s)
    dma.memcpy_batch(*entries, cs)
    s.wait_stream(cs)
