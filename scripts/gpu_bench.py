"""Every GPU measurement of docs/performance.md in one run; prints markdown tables and writes them to a file.

    PYTHONUNBUFFERED=1 python scripts/gpu_bench.py perf.md

1. Reference copies: one large pinned host<->device cudaMemcpy each way, and device->device.
2. Scattered blocks device<->pinned host through each transfer path, 16 KiB .. 2 MiB blocks,
   512 MiB a transfer, as a ratio to the large pinned copy of the same direction (same run).
   "scattered->contiguous": random device slots to consecutive host slots (a get to host, a
   fresh host region); "scattered->scattered": random slots on both sides (tier moves under churn).
3. The same while a bf16 8192^3 matmul loop runs on another stream: the matmul's slowdown and
   the transfer bandwidth measured over the transfers that ran entirely inside the matmul window.
4. Engine gather/scatter (vLLM LBNHC layout, Llama-8B-like shapes) device<->pinned host.
5. Paged attention vs SDPA on contiguous KV, and vs gather + SDPA: decode, 1k/8k/32k, batch 1/32.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tierkv import KVLayout  # noqa: E402
from tierkv.ops import transfer  # noqa: E402
from tierkv.ops.engine_layout import DimOrder, EngineKV, EngineKVLayout, chunk_slots  # noqa: E402
from tierkv.ops.paged_attention import paged_attention  # noqa: E402

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
TOTAL = 512 * MiB
SIZES = [16 * KiB, 64 * KiB, 256 * KiB, 2 * MiB]
PATHS = ["kernel", "dma", "staged"]
lines: list[str] = []


def out(text: str = "") -> None:
    print(text, flush=True)
    lines.append(text)


def size_name(b: int) -> str:
    return f"{b // MiB} MiB" if b >= MiB else f"{b // KiB} KiB"


def timed(fn: Callable[[], object], reps: int = 3, stream: torch.cuda.Stream | None = None) -> float:
    """Median seconds of `fn` between events on `stream` (one warm-up first)."""
    s = stream or torch.cuda.current_stream()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(s)
        fn()
        b.record(s)
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def streamed(fn: Callable[[], object], stream: torch.cuda.Stream, reps: int = 4) -> tuple[float, float]:
    """(seconds per call with calls queued back to back, at most two in flight; median CPU seconds per call).

    Back to back is how a store moves a stream of batches: the host-side preparation of one call
    (index checks, DMA entry lists) overlaps the transfer of the one before.
    """
    fn()
    torch.cuda.synchronize()
    first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cpu, ends = [], []
    first.record(stream)
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        cpu.append(time.perf_counter() - t0)
        e = torch.cuda.Event()
        e.record(stream)
        ends.append(e)
        if len(ends) >= 2:
            ends[-2].synchronize()
    last.record(stream)
    last.synchronize()
    return first.elapsed_time(last) / 1e3 / reps, statistics.median(cpu)


def reference_copies() -> dict[str, float]:
    dev = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    host = torch.empty(GiB, dtype=torch.uint8).pin_memory()
    dev2 = torch.empty_like(dev)
    bw = {
        "d2h": GiB / timed(lambda: host.copy_(dev, non_blocking=True)),
        "h2d": GiB / timed(lambda: dev.copy_(host, non_blocking=True)),
        "d2d": 2 * GiB / timed(lambda: dev2.copy_(dev)),
    }
    del dev, dev2, host
    return bw


class Pools:
    """A 1 GiB device pool and a 1 GiB pinned host pool, viewed as rows of the block size."""

    def __init__(self) -> None:
        self.dev = torch.randint(0, 256, (GiB,), dtype=torch.uint8, device="cuda")
        self.host = torch.empty(GiB, dtype=torch.uint8).pin_memory()

    def rows(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dev.view(-1, block), self.host.view(-1, block)


def slot_sets(block: int, scattered_host: bool, gen: torch.Generator) -> tuple[list[int], list[int]]:
    n, slots = TOTAL // block, GiB // block
    dev = torch.randperm(slots, generator=gen)[:n].tolist()
    if scattered_host:
        host = torch.randperm(slots, generator=gen)[:n].tolist()
    else:
        start = int(torch.randint(0, slots - n + 1, (1,), generator=gen))
        host = list(range(start, start + n))
    return dev, host


def transfer_call(pools: Pools, block: int, dev_slots: list[int], host_slots: list[int], to_host: bool, path: str,
                  stream: torch.cuda.Stream) -> Callable[[], object]:
    d, h = pools.rows(block)
    if to_host:
        return lambda: transfer.copy_slots(d, dev_slots, h, host_slots, stream=stream, path=path)
    return lambda: transfer.copy_slots(h, host_slots, d, dev_slots, stream=stream, path=path)


def matmul_loop(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, iters: int, stream: torch.cuda.Stream):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        for _ in range(iters):
            torch.matmul(a, b, out=c)
        end.record(stream)
    return start, end


def matmul_alone(mm: tuple, m_stream: torch.cuda.Stream) -> float:
    a, b, c, iters = mm
    s, e = matmul_loop(a, b, c, iters, m_stream)
    e.synchronize()
    return s.elapsed_time(e) / 1e3


def under_load(call: Callable[[], object], mm: tuple, t_stream: torch.cuda.Stream,
               m_stream: torch.cuda.Stream, rounds: int = 3) -> tuple[float, float | None, int]:
    """(matmul slowdown, median seconds of the transfers run entirely inside a matmul window, their count).

    Each round runs the matmul loop alone, then beside transfers; the slowdown is the median over
    rounds of loaded / alone - 1 (a GPU at full power drifts in clock speed, so each loaded run is
    compared with the alone run next to it). Transfers are queued back to back, at most two in
    flight, until the matmul loop has finished, so the whole matmul window runs beside transfers.
    """
    a, b, c, iters = mm
    ratios: list[float] = []
    inside: list[float] = []
    for _ in range(rounds):
        alone = matmul_alone(mm, m_stream)
        torch.cuda.synchronize()
        origin = torch.cuda.Event(enable_timing=True)
        origin.record()
        mm_start, mm_end = matmul_loop(a, b, c, iters, m_stream)
        marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        while True:
            s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s0.record(t_stream)
            call()
            s1.record(t_stream)
            marks.append((s0, s1))
            if len(marks) >= 2:
                marks[-2][1].synchronize()
            if mm_end.query():
                break
        torch.cuda.synchronize()
        w0, w1 = origin.elapsed_time(mm_start), origin.elapsed_time(mm_end)
        ratios.append((w1 - w0) / 1e3 / alone)
        inside += [origin.elapsed_time(e) - origin.elapsed_time(s) for s, e in marks
                   if origin.elapsed_time(s) >= w0 and origin.elapsed_time(e) <= w1]
    return statistics.median(ratios) - 1, (statistics.median(inside) / 1e3 if inside else None), len(inside)


def bench_transfers(ref: dict[str, float]) -> None:
    pools = Pools()
    gen = torch.Generator().manual_seed(0)
    stream = torch.cuda.Stream()
    out("## Scattered blocks device <-> pinned host (512 MiB a transfer)")
    out()
    out(f"Large pinned copy in this run: device->host {ref['d2h'] / 1e9:.1f} GB/s, host->device {ref['h2d'] / 1e9:.1f} GB/s, "
        f"device->device {ref['d2d'] / 1e12:.2f} TB/s (read + write).")
    out()
    out("| host side | direction | block | " + " | ".join(PATHS + ["torch"]) + " | host CPU per call (kernel / dma / staged) |")
    out("| --- | --- | --- | " + " | ".join("---" for _ in PATHS + ["torch"]) + " | --- |")
    results: dict[tuple, float] = {}
    for scattered in (False, True):
        for to_host in (True, False):
            key = "d2h" if to_host else "h2d"
            for block in SIZES:
                dev, host = slot_sets(block, scattered, gen)
                cells, cpus = [], []
                for path in PATHS + ["torch"]:
                    if path == "torch" and block not in (SIZES[0], SIZES[-1]):
                        cells.append("-")  # the slow CPU-side path: two sizes are enough to show it
                        continue
                    call = transfer_call(pools, block, dev, host, to_host, path, stream)
                    if path == "torch":
                        t = timed(call, reps=1, stream=stream)
                    else:
                        t, cpu = streamed(call, stream)
                        cpus.append(f"{cpu * 1e3:.1f}")
                    bw = TOTAL / t
                    results[(scattered, key, block, path)] = bw
                    cells.append(f"{bw / 1e9:.1f} GB/s ({bw / ref[key]:.2f})")
                out(f"| {'scattered' if scattered else 'contiguous'} | {'D->H' if to_host else 'H->D'} | {size_name(block)} | "
                    + " | ".join(cells) + f" | {' / '.join(cpus)} ms |")
    out()
    out("Cells: bandwidth with calls queued back to back (ratio to the large pinned copy of the same direction); "
        "torch: one call, synchronous.")
    out()

    # -- under load
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    m_stream = torch.cuda.Stream()
    iters = 40
    matmul_loop(a, b, c, 5, m_stream)
    torch.cuda.synchronize()
    alone = []
    for _ in range(3):
        s, e = matmul_loop(a, b, c, iters, m_stream)
        e.synchronize()
        alone.append(s.elapsed_time(e) / 1e3)
    mm_alone = statistics.median(alone)
    tflops = 2 * n**3 * iters / mm_alone / 1e12
    out(f"## The same while a bf16 {n}^3 matmul loop runs on another stream (matmul alone: {tflops:.0f} TFLOP/s)")
    out()
    out("| host side | direction | block | path | transfer under load | matmul slowdown |")
    out("| --- | --- | --- | --- | --- | --- |")
    for scattered in (False, True):
        for to_host in (True, False):
            key = "d2h" if to_host else "h2d"
            for block in SIZES:
                dev, host = slot_sets(block, scattered, gen)
                for path in PATHS:
                    call = transfer_call(pools, block, dev, host, to_host, path, stream)
                    slow, t, count = under_load(call, (a, b, c, iters), stream, m_stream)
                    cell = (f"{TOTAL / t / 1e9:.1f} GB/s ({TOTAL / t / ref[key]:.2f}, {count} inside)" if t
                            else "no transfer inside the window")
                    out(f"| {'scattered' if scattered else 'contiguous'} | {'D->H' if to_host else 'H->D'} | "
                        f"{size_name(block)} | {path} | {cell} | {slow * 100:+.1f}% |")
    out()
    del pools


def bench_engine(ref: dict[str, float]) -> None:
    # Llama-3-8B-like: 32 layers, 8 KV heads, head_dim 128, bf16; vLLM engine blocks of 16 tokens.
    layers, heads, hd, eb = 32, 8, 128, 16
    out("## Engine pages <-> pinned host blocks (vLLM LBNHC layout, 32 layers, 8 KV heads, head_dim 128, bf16)")
    out()
    out("| store block_tokens | block | direction | path | alone | under matmul load | matmul slowdown |")
    out("| --- | --- | --- | --- | --- | --- | --- |")
    n_mm = 8192
    a = torch.randn(n_mm, n_mm, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n_mm, n_mm, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    m_stream, stream = torch.cuda.Stream(), torch.cuda.Stream()
    iters = 40
    matmul_alone((a, b, c, 5), m_stream)
    for bt in (16, 64):
        num_blocks = 2 * TOTAL // (layers * 2 * eb * heads * hd * 2)
        lay = EngineKVLayout(DimOrder.LBNHSC, num_layers=layers, num_blocks=num_blocks, block_size=eb, num_kv_heads=heads,
                             head_dim=hd, dtype=torch.bfloat16)
        store = KVLayout(num_layers=layers, kv_factor=2, num_kv_heads=heads, head_dim=hd, dtype=torch.bfloat16, block_tokens=bt)
        engine = EngineKV(lay, torch.randn(lay.shape, device="cuda", dtype=torch.bfloat16))
        n = TOTAL // store.block_bytes
        table = torch.randperm(num_blocks)[: n * bt // eb]
        slots = chunk_slots(lay, bt, table, torch.arange(n))
        host = torch.empty((2 * n, store.block_bytes), dtype=torch.uint8).pin_memory()
        rows = torch.randperm(2 * n)[:n]
        for to_host in (True, False):
            key = "d2h" if to_host else "h2d"
            for path in ("kernel", "staged"):
                if to_host:
                    call = lambda p=path: transfer.gather_engine_blocks(engine, slots, host, store, rows, stream=stream, path=p)  # noqa: E731
                else:
                    call = lambda p=path: transfer.scatter_engine_blocks(engine, slots, host, store, rows, stream=stream, path=p)  # noqa: E731
                t, _ = streamed(call, stream)
                slow, tl_, _ = under_load(call, (a, b, c, iters), stream, m_stream)
                loaded = f"{TOTAL / tl_ / 1e9:.1f} GB/s ({TOTAL / tl_ / ref[key]:.2f})" if tl_ else "n/a"
                out(f"| {bt} | {size_name(store.block_bytes)} | {'D->H gather' if to_host else 'H->D scatter'} | {path} | "
                    f"{TOTAL / t / 1e9:.1f} GB/s ({TOTAL / t / ref[key]:.2f}) | {loaded} | {slow * 100:+.1f}% |")
        del engine, host
    out()


def bench_attention() -> None:
    import triton.testing

    hq, hkv, d, bt = 32, 8, 128, 16
    dtype = torch.bfloat16
    out(f"## Paged attention vs SDPA, decode (bf16, {hq} query / {hkv} KV heads, head_dim {d}, store blocks of {bt} tokens)")
    out()
    out("GPU time: each call replayed from a CUDA graph (as engines run decode), so launch overhead is left out. "
        "Eager: plain Python calls, launch overhead included. SDPA runs on contiguous KV it does not have to gather.")
    out()
    out("| context | batch | SDPA | paged (tierkv) | gather + SDPA | paged / SDPA | paged / (gather + SDPA) | eager: SDPA / paged / gather+SDPA |")
    out("| --- | --- | --- | --- | --- | --- | --- | --- |")
    lay = KVLayout(num_layers=1, kv_factor=2, num_kv_heads=hkv, head_dim=d, dtype=dtype, block_tokens=bt)
    sweep: dict[int, dict[int, float]] = {}
    for ctx in (1024, 8192, 32768):
        for batch in (1, 32):
            nb = ctx // bt
            slots = batch * nb
            pool = torch.randn((slots, *lay.block_shape), device="cuda", dtype=dtype)
            table = torch.randperm(slots, device="cuda").reshape(batch, nb).int()
            lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn((batch, 1, hq, d), device="cuda", dtype=dtype)
            flat = pool.view(slots, -1)
            gathered = pool[table.long()]  # [batch, nb, 1, 2, bt, hkv, d]
            k = gathered[:, :, 0, 0].reshape(batch, ctx, hkv, d).transpose(1, 2).contiguous()
            v = gathered[:, :, 0, 1].reshape(batch, ctx, hkv, d).transpose(1, 2).contiguous()
            del gathered
            qs = q.transpose(1, 2)

            def sdpa() -> torch.Tensor:
                return F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)

            def paged() -> torch.Tensor:
                return paged_attention(q, flat, lay, 0, table, lens)

            def gather_sdpa() -> torch.Tensor:
                g = pool[table.long()]
                kk = g[:, :, 0, 0].reshape(batch, ctx, hkv, d).transpose(1, 2)
                vv = g[:, :, 0, 1].reshape(batch, ctx, hkv, d).transpose(1, 2)
                return F.scaled_dot_product_attention(qs, kk, vv, enable_gqa=True)

            want = sdpa().transpose(1, 2).float()
            got = paged().float()
            rel = ((got - want).norm() / want.norm()).item()
            fns = (sdpa, paged, gather_sdpa)
            graph = [triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median") for f in fns]
            eager = [triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median") for f in fns]
            ts, tp, tg = graph
            out(f"| {ctx // 1024}k | {batch} | {ts * 1e3:.1f} us | {tp * 1e3:.1f} us (rel err {rel:.1e}) | {tg * 1e3:.1f} us | "
                f"{tp / ts:.2f} | {tp / tg:.2f} | {' / '.join(f'{x * 1e3:.0f}' for x in eager)} us |")
            if batch == 1 and ctx <= 8192:
                sweep[ctx] = {n: triton.testing.do_bench_cudagraph(
                    lambda n=n: paged_attention(q, flat, lay, 0, table, lens, num_splits=n), rep=50, return_mode="median")
                    for n in (1, 2, 4, 8, 16, 32)}
            del pool, k, v, flat
            torch.cuda.empty_cache()
    out()
    out("KV splits at batch 1 (GPU time; the table above uses the default heuristic): " + "; ".join(
        f"{ctx // 1024}k: " + ", ".join(f"{n}: {t * 1e3:.1f} us" for n, t in times.items()) for ctx, times in sweep.items()))
    out()


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: gpu_bench.py OUTPUT.md")
    started = time.time()
    props = torch.cuda.get_device_properties(0)
    out(f"Measured on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}.")
    out()
    out("Transfer paths chosen by default: " + repr({k: v for k, v in transfer.transfer_paths().items() if k in ("copy_slots", "gather_engine_blocks", "scatter_engine_blocks")}))
    out()
    ref = reference_copies()
    bench_transfers(ref)
    bench_engine(ref)
    bench_attention()
    out(f"Total bench time {time.time() - started:.0f} s.")
    Path(sys.argv[1]).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
