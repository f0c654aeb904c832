"""Block transfers and paged attention (issue 4).

GPU benchmarks (skipped without CUDA) give bandwidth of each transfer path as a ratio to one
large pinned copy measured in the same setup, target >= 0.90; and paged-attention decode time
over SDPA on contiguous KV, target <= 1.2. The CPU benchmarks time the torch reference path that
a machine without a GPU uses. `scripts/gpu_bench.py` runs the full set, matmul load included.
"""

import torch

from tierkv import KVLayout
from tierkv.ops import transfer
from tierkv.ops.engine_layout import DimOrder, EngineKV, EngineKVLayout, chunk_slots
from tierkv.ops.paged_attention import paged_attention

MiB = 1 << 20
TOTAL = 256 * MiB


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        raise NotImplementedError("needs CUDA")  # asv reports the benchmark as skipped


def _seconds(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


class TransferRatio:
    """Scattered device slots <-> scattered pinned host slots, 256 MiB a transfer."""

    params = ([16 << 10, 64 << 10, 256 << 10, 2 << 20], ["d2h", "h2d"], ["auto", "kernel", "dma", "staged"])
    param_names = ["block_bytes", "direction", "path"]
    timeout = 300

    def setup(self, block: int, direction: str, path: str) -> None:
        _need_cuda()
        self.dev = torch.randint(0, 256, (2 * TOTAL // block, block), dtype=torch.uint8, device="cuda")
        self.host = torch.empty((2 * TOTAL // block, block), dtype=torch.uint8).pin_memory()
        n = TOTAL // block
        self.dev_rows = torch.randperm(self.dev.shape[0])[:n]
        self.host_rows = torch.randperm(self.host.shape[0])[:n]
        flat_d, flat_h = self.dev.view(-1)[:TOTAL], self.host.view(-1)[:TOTAL]
        big = (lambda: flat_h.copy_(flat_d, non_blocking=True)) if direction == "d2h" else (lambda: flat_d.copy_(flat_h, non_blocking=True))
        self.big = _seconds(big)
        p = None if path == "auto" else path
        if direction == "d2h":
            self.call = lambda: transfer.copy_slots(self.dev, self.dev_rows, self.host, self.host_rows, path=p)
        else:
            self.call = lambda: transfer.copy_slots(self.host, self.host_rows, self.dev, self.dev_rows, path=p)

    def track_ratio_to_large_pinned_copy(self, block: int, direction: str, path: str) -> float:
        return self.big / _seconds(self.call)

    track_ratio_to_large_pinned_copy.unit = "ratio"

    def time_transfer(self, block: int, direction: str, path: str) -> None:
        self.call()
        torch.cuda.synchronize()


class PagedAttentionDecode:
    """Decode over store pages (Llama-8B-like heads, bf16, 16-token blocks) against SDPA on contiguous KV."""

    params = ([1024, 8192, 32768], [1, 32])
    param_names = ["context", "batch"]
    timeout = 300

    def setup(self, ctx: int, batch: int) -> None:
        _need_cuda()
        hq, hkv, d, bt = 32, 8, 128, 16
        self.layout = KVLayout(num_layers=1, kv_factor=2, num_kv_heads=hkv, head_dim=d, dtype=torch.bfloat16, block_tokens=bt)
        nb = ctx // bt
        pool = torch.randn((batch * nb, *self.layout.block_shape), device="cuda", dtype=torch.bfloat16)
        self.pool = pool.view(batch * nb, -1)
        self.table = torch.randperm(batch * nb, device="cuda").reshape(batch, nb).int()
        self.lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        self.q = torch.randn((batch, 1, hq, d), device="cuda", dtype=torch.bfloat16)
        g = pool[self.table.long()]
        self.k = g[:, :, 0, 0].reshape(batch, ctx, hkv, d).transpose(1, 2).contiguous()
        self.v = g[:, :, 0, 1].reshape(batch, ctx, hkv, d).transpose(1, 2).contiguous()

    def _paged(self) -> torch.Tensor:
        return paged_attention(self.q, self.pool, self.layout, 0, self.table, self.lens)

    def _sdpa(self) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(self.q.transpose(1, 2), self.k, self.v, enable_gqa=True)

    def track_paged_over_sdpa(self, ctx: int, batch: int) -> float:
        return _seconds(self._paged, 20) / _seconds(self._sdpa, 20)

    track_paged_over_sdpa.unit = "ratio"

    def time_paged(self, ctx: int, batch: int) -> None:
        self._paged()
        torch.cuda.synchronize()


class ReferenceCopiesCPU:
    """The torch path a CPU-only machine takes: slot pool copy and engine gather (vLLM LBNHC, 64 KiB blocks)."""

    def setup(self) -> None:
        self.src = torch.randint(0, 256, (2048, 64 << 10), dtype=torch.uint8)
        self.dst = torch.empty_like(self.src)
        self.rows = torch.randperm(2048)[:1024]
        lay = EngineKVLayout(DimOrder.LBNHSC, num_layers=8, num_blocks=1024, block_size=16, num_kv_heads=2,
                             head_dim=64, dtype=torch.bfloat16)
        self.store = KVLayout(num_layers=8, kv_factor=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_tokens=16)
        self.engine = EngineKV(lay, torch.randn(lay.shape).to(torch.bfloat16))
        self.slots = chunk_slots(lay, 16, torch.randperm(1024), torch.arange(512))
        self.out = torch.empty((512, *self.store.block_shape), dtype=torch.bfloat16)

    def time_copy_slots_64MiB(self) -> None:
        transfer.copy_slots(self.src, self.rows, self.dst, self.rows)

    def time_gather_engine_blocks_32MiB(self) -> None:
        transfer.gather_engine_blocks(self.engine, self.slots, self.out, self.store)
