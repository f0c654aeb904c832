"""The store's public GPU data path as ratios to the link (issue 11; skipped without CUDA).

`put` / `get` between GPU tensors and a host-only store (how the vLLM connector runs it), and
`save_from` / `load_into` with vLLM's GPU layout (LBNHC, 16-token pages), verification on,
Llama-3-8B KV shapes (32 layers, 8 KV heads of 128, bf16), 16-token (2 MiB) blocks, a 2048-token
prompt a call. Each ratio divides by a large pinned copy of the same direction measured in the
same setup, so it reads the same on any PCIe link. Target >= 0.85. `scripts/gpu_path_bench.py`
prints the fuller table (256-token and small blocks, both directions at once, matmul slowdown).
"""

import statistics
import time

import torch

from tierkv import BlockStore, DimOrder, EngineKV, EngineKVLayout, KVLayout, Namespace, StoreConfig

GiB = 1 << 30
TOKENS = 2048


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        raise NotImplementedError("needs CUDA")  # asv reports the benchmark as skipped


def _seconds(fn, reps: int = 7) -> float:
    """Median wall seconds of `fn` until its GPU work is done (one warm-up call first)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class PublicPathRatio:
    timeout = 300
    unit = "ratio to a large pinned copy"

    def setup(self):
        _need_cuda()
        self.layout = KVLayout(num_layers=32, kv_factor=2, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                               block_tokens=16)
        n = TOKENS // 16
        self.nbytes = n * self.layout.block_bytes
        self.kv = torch.randn((n, *self.layout.block_shape), device="cuda").to(torch.bfloat16)
        eng = EngineKVLayout(order=DimOrder.LBNHSC, num_layers=32, num_blocks=2 * n, block_size=16, num_kv_heads=8,
                             head_dim=128, dtype=torch.bfloat16)
        self.engine = EngineKV(eng, torch.randn(eng.shape, device="cuda").to(torch.bfloat16))
        self.table = torch.randperm(2 * n)[:n].tolist()
        self.store = BlockStore(self.layout, Namespace(model="asv-gpu-path"), StoreConfig(device_bytes=0, host_bytes=4 * GiB))
        self.counter = iter(range(1, 10**6))
        self.store.put(self.prompt(0), self.kv)
        self.store.save_from(self.engine, self.table, self.prompt(10**5))
        dev = torch.empty(GiB, dtype=torch.uint8, device="cuda")
        host = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
        self.link = {"d2h": GiB / _seconds(lambda: host.copy_(dev, non_blocking=True)),
                     "h2d": GiB / _seconds(lambda: dev.copy_(host, non_blocking=True))}

    def teardown(self):
        self.store.close()

    def prompt(self, i: int) -> torch.Tensor:
        return torch.arange(i * TOKENS, (i + 1) * TOKENS)

    def _ratio(self, fn, direction: str) -> float:
        return self.nbytes / _seconds(fn) / self.link[direction]

    def track_put(self):
        return self._ratio(lambda: self.store.put(self.prompt(next(self.counter)), self.kv), "d2h")

    def track_get(self):
        return self._ratio(lambda: self.store.get(self.prompt(0), device="cuda"), "h2d")

    def track_save_from(self):
        return self._ratio(lambda: self.store.save_from(self.engine, self.table, self.prompt(next(self.counter))), "d2h")

    def track_load_into(self):
        return self._ratio(lambda: self.store.load_into(self.engine, self.table, self.prompt(10**5)), "h2d")
