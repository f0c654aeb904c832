"""Blocks in pinned host slots -> an engine's GPU pages, one layer at a time, verified on the GPU.

A store block is layer-major (`[layers, kv, tokens, heads, head_dim]`), so layer `l` of every
block is one strided run of host bytes. `LayerCopy` queues, for each layer in order:

    copy stream    H2D of layer l of every block into a GPU staging ring buffer
                   (one pitched DMA per run of consecutive host slots, or a copy kernel over UVA)
    side stream    the leaves of the blocks' checksums over those bytes (`sector_leaves_gpu`),
                   then the scatter of the staged layer into the engine's pages; event `ready[l]`

and after the last layer, the blocks' checksum roots and their comparison with the recorded
checksums. An engine that waits for `ready[l]` before layer l's attention computes the first
layers while later ones are still on the PCIe link. The checksum of a block covers all its
layers, so a corrupt block is known only once every layer has arrived: `bad_blocks()` says which,
and a caller must not let anything computed from a load count before it has asked.

The first layers are queued at construction, each later one when the engine waits for a layer
shortly before it (or at `bad_blocks()`), and nothing synchronises until `bad_blocks()`. Two
staging buffers (one layer of every block each) let layer l+1's DMA overlap layer l's hash and
scatter.
Only for layers whose bytes are whole 4 KiB sectors (`layer_bytes % 4096 == 0`), the unit of a
checksum leaf; `LayerCopy.supports` says whether a layout qualifies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..integrity import SECTOR_BYTES
from ..layout import KVLayout
from . import dma, kernels
from .checksum import as_unsigned, block_roots_gpu, hold_until, sector_leaves_gpu
from .engine_layout import EngineKV
from .staging import upload
from .streams import side_stream

RING = 2  # staging buffers: one being filled by DMA while the other is hashed and scattered
PATHS = ("dma", "kernel")
KERNEL_CTAS = 32  # the copy kernel over UVA takes this many thread blocks, leaving the rest of the GPU to the model


def layer_bytes(layout: KVLayout) -> int:
    """Bytes of one layer of one block (K and V of every token and head)."""
    return layout.block_bytes // layout.num_layers


class LayerCopy:
    """The queued copies of one layer-wise load; see the module docstring.

    `pool` is the host tier's `[num_slots, block_bytes]` pinned uint8 storage, `slots` the blocks'
    slots in it, `engine_slots` their `[n, chunks]` engine token slots (`chunk_slots`), and
    `expected` their recorded checksums (u64 ints, None where a block has none; all None: nothing
    is hashed). `wait_before` is an event the copies must follow (the last GPU write into the pool).
    """

    def __init__(self, pool: torch.Tensor, slots: Sequence[int], engine: EngineKV, engine_slots: torch.Tensor,
                 layout: KVLayout, expected: Sequence[int | None], *, path: str = "dma",
                 wait_before: torch.cuda.Event | None = None) -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if not self.supports(layout):
            raise ValueError(f"one layer of a block is {layer_bytes(layout)} bytes, not whole {SECTOR_BYTES}-byte "
                             "sectors: this layout cannot be verified layer by layer")
        device = engine.device
        n, lb, nl = len(slots), layer_bytes(layout), layout.num_layers
        self.num_layers = nl
        self._device = device
        self._copy = dma.copy_stream(device, to_device=True) if path == "dma" else side_stream(device, "layer-copy")
        self._side = side_stream(device, "layer-load")
        caller = torch.cuda.current_stream(device)
        self._ready = [torch.cuda.Event() for _ in range(nl)]
        self._done = torch.cuda.Event()
        self._verify_queued = False  # the verification is queued
        self._roots_host: torch.Tensor | None = None
        for s in (self._copy, self._side):
            s.wait_stream(caller)  # the engine's pages and our inputs are ready as of now on the caller's stream
            if wait_before is not None:
                s.wait_event(wait_before)
        with torch.cuda.stream(self._side):
            self._slots_dev = upload(engine_slots.to(torch.int64), self._side)
            self._rows_dev = torch.arange(n, dtype=torch.int64, device=device)
            ring = [torch.empty((n, lb), dtype=torch.uint8, device=device) for _ in range(min(RING, nl))]
            leaves: torch.Tensor | None = None
            if any(e is not None for e in expected):
                leaves = torch.empty((nl, n, lb // SECTOR_BYTES), dtype=torch.int64, device=device)
        self._host_rows = None
        if path == "kernel":
            with torch.cuda.stream(self._copy):
                self._host_rows = upload(torch.as_tensor(list(slots), dtype=torch.int64) * nl, self._copy)
        self._pool, self._engine, self._layout, self._path = pool, engine, layout, path
        firsts, starts, counts = dma.runs(torch.arange(n, dtype=torch.int64), torch.as_tensor(list(slots), dtype=torch.int64))
        self._runs = list(zip(firsts.tolist(), starts.tolist(), counts.tolist()))  # (position, slot, blocks) per run
        self._ring, self._leaves, self._expected = ring, leaves, list(expected)
        self._freed = [torch.cuda.Event() for _ in ring]
        self._queued = 0  # layers queued so far; the rest are queued as the engine reaches them
        self._queue_through(min(nl, len(ring)) - 1)

    def _queue_through(self, last: int) -> None:
        """Queue layers up to `last` (and, past the last layer, the verification).

        Queueing a layer costs the host ~0.1 ms of driver calls; queued lazily, a layer or two
        ahead of the engine's `wait`, that cost hides behind the engine's own queueing instead of
        delaying its first layer.
        """
        lay, lb, n = self._layout, layer_bytes(self._layout), len(self._expected)
        g = self._engine.layout.chunk_tokens(lay.block_tokens)
        while self._queued <= min(last, self.num_layers - 1):
            layer = self._queued
            buf = self._ring[layer % len(self._ring)]
            if layer >= len(self._ring):
                self._copy.wait_event(self._freed[layer % len(self._ring)])
            if self._path == "dma":
                for first, start, count in self._runs:
                    dma.memcpy_2d(buf.data_ptr() + first * lb, lb,
                                  self._pool.data_ptr() + start * lay.block_bytes + layer * lb, lay.block_bytes, lb,
                                  count, self._copy)
            else:
                assert self._host_rows is not None
                with torch.cuda.stream(self._copy):
                    src_rows = self._host_rows + layer
                kernels.copy_rows(self._pool.view(-1, lb), src_rows, buf, self._rows_dev, lb, self._copy,
                                  max_ctas=KERNEL_CTAS)
            arrived = torch.cuda.Event()
            arrived.record(self._copy)
            self._side.wait_event(arrived)
            if self._leaves is not None:
                sector_leaves_gpu(buf, self._leaves[layer], self._side)
            kernels.engine_copy(False, self._engine, self._slots_dev, g, lay.block_tokens, buf, self._rows_dev, lb,
                                self._side, layer=layer)
            self._ready[layer].record(self._side)
            self._freed[layer % len(self._ring)].record(self._side)
            self._queued += 1
        if last < self.num_layers or self._verify_queued:
            return
        with torch.cuda.stream(self._side):
            if self._leaves is not None:
                # The roots land in pinned host memory, written by the kernel: no copy engine
                # (a small readback would queue behind the other direction's large DMAs).
                self._roots_host = torch.empty(n, dtype=torch.int64, pin_memory=True)
                block_roots_gpu(self._leaves.permute(1, 0, 2).reshape(n, -1).contiguous(), lay.block_bytes,
                                self._side, out=self._roots_host)
            self._done.record(self._side)
            if self._roots_host is not None:  # an abandoned load must not free what the kernel still writes
                hold_until(self._done, self._roots_host)
        self._verify_queued = True

    @staticmethod
    def supports(layout: KVLayout) -> bool:
        return layer_bytes(layout) % SECTOR_BYTES == 0

    def wait(self, layer: int, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` (default: the current stream) wait until layer `layer` is in the engine's pages."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is outside [0, {self.num_layers})")
        self._queue_through(layer + len(self._ring))
        (stream if stream is not None else torch.cuda.current_stream(self._device)).wait_event(self._ready[layer])

    def bad_blocks(self) -> list[int]:
        """Positions of the blocks whose bytes did not match their checksums (waits for the whole load)."""
        self._queue_through(self.num_layers)
        self._done.synchronize()
        self._ring, self._leaves = [], None  # the side stream is done with them
        if self._roots_host is None:
            return []
        roots = as_unsigned(self._roots_host)
        return [i for i, (want, got) in enumerate(zip(self._expected, roots)) if want is not None and want != got]

