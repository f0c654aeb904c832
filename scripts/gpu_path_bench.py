"""The store's public data path on a GPU, each figure a ratio to a large pinned copy of the same run.

Llama-3-8B KV shapes (32 layers, 8 KV heads, head_dim 128, bf16), 2048-token prompts whose KV is in
GPU memory, checksums verified on every read (the default):

- `put` GPU -> store and `get` store -> GPU, 16-token (2 MiB) and 256-token (32 MiB) blocks, in a
  store with a host tier only (how the vLLM connector runs it) and in one with a device tier too;
- `save_from` / `load_into` with vLLM's GPU layout (LBNHC, 16-token pages);
- `put` and `save_from` four calls back to back (one wait at the end: the steady rate of an engine
  saving request after request, each call's host work overlapping the previous call's copy);
- `put` / `get` of small blocks (64, 128, 256 KiB: 16-token blocks of a model of 1, 2 or 4 layers), 1024 a call;
- both directions at once (a put and a get of different prompts, in two stores, two threads);
- the slowdown of a bf16 matmul loop while the store moves blocks (median of alternating windows);
- the verified path itself: the checksums a GPU save stamped are the CPU's `TREE_CHECKSUM` of the
  host slots, and a host slot flipped behind the store's back fails its check on the GPU: the
  load stops there and the engine page it was bound for is left as it was.

    PYTHONUNBUFFERED=1 python scripts/gpu_path_bench.py OUT.md [OUT.png]
    python scripts/gpu_path_bench.py --check-cpu     (the verification check alone, on the CPU)

Targets (issue 11): >= 0.85 of the link for 2 MiB blocks and up; both directions >= 1.4x one; the
matmul <= 3% slower.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tierkv import BlockStore, DimOrder, EngineKV, EngineKVLayout, KVLayout, Namespace, StoreConfig
from tierkv.integrity import checksum_block_slots

GiB = 1 << 30
PROMPT = 2048
REPS = 5
lines: list[str] = []


def out(text: str = "") -> None:
    lines.append(text)
    print(text)


def layout(block_tokens: int) -> KVLayout:
    return KVLayout(num_layers=32, kv_factor=2, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_tokens=block_tokens)


def reference() -> dict[str, float]:
    dev = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    host = torch.empty(GiB, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    dev2 = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    host2 = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    up, down = torch.cuda.Stream(), torch.cuda.Stream()

    def both() -> None:  # the link's own both-directions figure: one large copy each way on two streams
        with torch.cuda.stream(down):
            host.copy_(dev, non_blocking=True)
        with torch.cuda.stream(up):
            dev2.copy_(host2, non_blocking=True)

    return {"d2h": GiB / gpu_time(lambda: host.copy_(dev, non_blocking=True)),
            "h2d": GiB / gpu_time(lambda: dev.copy_(host, non_blocking=True)),
            "both": 2 * GiB / gpu_time(both)}


def gpu_time(fn: Callable[[], object], reps: int = REPS) -> float:
    """Median wall seconds of `fn` including the GPU work it queued (one warm-up call first)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def store(lay: KVLayout, device_bytes: int) -> BlockStore:
    return BlockStore(lay, Namespace(model="bench-path"), StoreConfig(device_bytes=device_bytes, host_bytes=4 * GiB))


def prompt(i: int, tokens: int = PROMPT) -> torch.Tensor:
    """The `i`-th distinct prompt of `tokens` tokens (2048 by default; token ids stay well inside int32)."""
    return torch.arange(i * tokens, (i + 1) * tokens) % 2_000_000_000


def put_get(lay: KVLayout, device_bytes: int, tokens: int = PROMPT) -> tuple[float, float]:
    """GB/s of put and get of one prompt of `tokens` tokens; a fresh prompt per timed put."""
    n = tokens // lay.block_tokens
    kv = torch.randn((n, *lay.block_shape), device="cuda").to(lay.dtype)
    nbytes = n * lay.block_bytes
    with store(lay, device_bytes) as s:
        counter = iter(range(1, 10**6))
        put = gpu_time(lambda: s.put(prompt(next(counter), tokens), kv))
        s.put(prompt(0, tokens), kv)
        get = gpu_time(lambda: s.get(prompt(0, tokens), device="cuda"))
        assert torch.equal(s.get(prompt(0, tokens), device="cuda"), kv)
    return nbytes / put / 1e9, nbytes / get / 1e9


def vllm_engine(lay: KVLayout, num_blocks: int, device: str = "cuda") -> tuple[EngineKV, torch.Tensor]:
    """vLLM's GPU cache in its LBNHC layout: one allocation, [layers, blocks, 16 tokens, heads, K|V channels]."""
    eng = EngineKVLayout(order=DimOrder.LBNHSC, num_layers=lay.num_layers, num_blocks=num_blocks, block_size=16,
                         num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, dtype=lay.dtype)
    buf = torch.randn(eng.shape, device=device).to(lay.dtype)
    return EngineKV(eng, buf), buf


def verified_path(lay: KVLayout, device: str, prompt_tokens: int = PROMPT) -> str:
    """Check the verified data path end to end; returns a line for the report, raises AssertionError if it fails.

    A host-only store (the vLLM connector's) saves the engine's pages (on `device`): every block's
    checksum must be the CPU tree checksum of its host slot, computed by the GPU on a GPU (bit
    identity). One byte of one host slot is then flipped: `load_into` must stop at that block
    (verified on the GPU after its copy, on a GPU) and leave its engine pages untouched.
    """
    pages = prompt_tokens // 16
    n = prompt_tokens // lay.block_tokens
    engine, buf = vllm_engine(lay, 2 * pages, device)
    table = list(range(0, 2 * pages, 2))
    tokens = prompt(7)[:prompt_tokens]
    config = StoreConfig(device="cpu" if device == "cpu" else None, device_bytes=0, host_bytes=2 * n * lay.block_bytes)
    with BlockStore(lay, Namespace(model="bench-path-verify"), config) as s:
        assert s.save_from(engine, table, tokens) == n
        keys = s.keys(tokens)
        host = next(t for t in s.tiers if t.name == "host")
        slots = [s.locate([k])[k]["host"] for k in keys]
        if device != "cpu":
            torch.cuda.synchronize()
        stamped = [s.index.blocks[k].checksum for k in keys]
        assert stamped == checksum_block_slots(host.storage, slots), "GPU-stamped checksums differ from the CPU's"
        bad = n // 2
        host.storage[slots[bad], 100] ^= 0x55  # behind the store's back, as a bit flip in RAM would be
        before = buf.clone()
        buf.zero_()
        loaded = s.load_into(engine, table, tokens)
        if device != "cpu":
            torch.cuda.synchronize()
        assert loaded == bad, f"load_into loaded {loaded} blocks past a corrupt one at {bad}"
        per_block = lay.block_tokens // 16
        good_pages = torch.tensor(table[: bad * per_block], device=device)
        bad_pages = torch.tensor(table[bad * per_block : (bad + 1) * per_block], device=device)
        assert torch.equal(buf.index_select(1, good_pages), before.index_select(1, good_pages)), "good blocks differ"
        assert not buf.index_select(1, bad_pages).any(), "the corrupt block reached the engine's pages"
        corrupt = s.stats()["tiers"]["host"]["corrupt"]
        assert corrupt == 1, corrupt
    return (f"verified path on {device}: {n} blocks saved, checksums identical to the CPU's; a flipped host byte "
            f"stopped load_into at block {bad}, its pages untouched (corrupt counted: {corrupt})")


def save_load(lay: KVLayout) -> tuple[float, float, dict[str, float]]:
    """GB/s of save_from and load_into with vLLM pages, and of load_layers (+ finish) by each copy path."""
    pages = PROMPT // 16
    engine, buf = vllm_engine(lay, 2 * pages)
    table = torch.randperm(2 * pages)[:pages].tolist()
    nbytes = PROMPT // lay.block_tokens * lay.block_bytes
    with store(lay, 0) as s:
        counter = iter(range(1, 10**6))
        save = gpu_time(lambda: s.save_from(engine, table, prompt(next(counter))))
        s.save_from(engine, table, prompt(0))
        before = buf.clone()
        buf.zero_()
        load = gpu_time(lambda: s.load_into(engine, table, prompt(0)))
        assert s.load_into(engine, table, prompt(0)) == PROMPT // lay.block_tokens
        torch.cuda.synchronize()
        idx = torch.tensor(table, device="cuda")
        assert torch.equal(buf.index_select(1, idx), before.index_select(1, idx)), "load_into changed the KV"
        layered = {}
        for path in ("dma", "kernel"):
            buf.zero_()
            layered[path] = nbytes / gpu_time(lambda p=path: s.load_layers(engine, table, prompt(0), path=p).finish()) / 1e9
            torch.cuda.synchronize()
            assert torch.equal(buf.index_select(1, idx), before.index_select(1, idx)), f"load_layers {path} changed the KV"
    return nbytes / save / 1e9, nbytes / load / 1e9, layered


def back_to_back(lay: KVLayout, calls: int = 4) -> tuple[float, float]:
    """GB/s of `calls` puts, and of `calls` save_froms, queued one after another with one wait at the end.

    Both return before their copies are done, so in a running engine the host work of one (eviction,
    index, the DMA batch) overlaps the copy of the one before; a single call alone pays it all
    before its first byte moves. This is the steady rate of an engine saving request after request.
    """
    n = PROMPT // lay.block_tokens
    kv = torch.randn((n, *lay.block_shape), device="cuda").to(lay.dtype)
    pages = PROMPT // 16
    engine, _ = vllm_engine(lay, 2 * pages)
    table = torch.randperm(2 * pages)[:pages].tolist()
    nbytes = calls * n * lay.block_bytes
    with store(lay, 0) as s:
        counter = iter(range(1, 10**6))
        put = gpu_time(lambda: [s.put(prompt(next(counter)), kv) for _ in range(calls)])
        save = gpu_time(lambda: [s.save_from(engine, table, prompt(next(counter))) for _ in range(calls)])
    return nbytes / put / 1e9, nbytes / save / 1e9


def both_ways(lay: KVLayout) -> float:
    """GB/s of a put and a get running at once, in two stores, two threads, each on its own stream.

    Each thread has its own CUDA stream, as two engines' workers (or a connector's save stream
    and its load path) would: work queued on one stream runs in order, so two threads on the
    default stream could never overlap, whatever the store did.
    """
    n = PROMPT // lay.block_tokens
    kv = torch.randn((n, *lay.block_shape), device="cuda").to(lay.dtype)
    put_stream, get_stream = torch.cuda.Stream(), torch.cuda.Stream()
    with store(lay, 0) as a, store(lay, 0) as b:
        b.put(prompt(0), kv)
        torch.cuda.synchronize()  # kv and b's blocks are ready for both streams
        counter = iter(range(1, 10**6))

        def put() -> None:
            with torch.cuda.stream(put_stream):
                a.put(prompt(next(counter)), kv)
            put_stream.synchronize()

        def once() -> None:
            t = threading.Thread(target=put)
            t.start()
            with torch.cuda.stream(get_stream):
                b.get(prompt(0), device="cuda")
            get_stream.synchronize()
            t.join()

        return 2 * n * lay.block_bytes / gpu_time(once) / 1e9


def matmul_slowdown(lay: KVLayout, windows: int = 6, layer_path: str | None = None) -> float:
    """Median over alternating windows of (matmul time beside store traffic) / (matmul time alone) - 1.

    The traffic is put + get, or with `layer_path`, `load_layers` by that copy path into vLLM pages.
    """
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    c = torch.empty_like(a)
    m_stream = torch.cuda.Stream()
    n = PROMPT // lay.block_tokens
    kv = torch.randn((n, *lay.block_shape), device="cuda").to(lay.dtype)

    def matmuls() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(m_stream):
            start.record(m_stream)
            for _ in range(40):
                torch.matmul(a, b, out=c)
            end.record(m_stream)
        end.synchronize()
        return start.elapsed_time(end)

    ratios = []
    pages = PROMPT // 16
    engine, _ = vllm_engine(lay, pages)
    with store(lay, 0) as s:
        s.put(prompt(0), kv)
        for w in range(windows):
            alone = matmuls()
            stop = threading.Event()

            def traffic(stop: threading.Event, base: int) -> None:
                i = 1
                while not stop.is_set():
                    if layer_path is not None:
                        s.load_layers(engine, list(range(pages)), prompt(0), path=layer_path).finish()
                        continue
                    s.put(prompt(base + i), kv)
                    s.get(prompt(0), device="cuda")
                    i += 1

            t = threading.Thread(target=traffic, args=(stop, (w + 1) * 1000))
            t.start()
            loaded = matmuls()
            stop.set()
            t.join()
            ratios.append(loaded / alone)
    return statistics.median(ratios) - 1


def main() -> None:
    if len(sys.argv) == 2 and sys.argv[1] == "--check-cpu":
        print(verified_path(KVLayout(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16,
                                     block_tokens=16), "cpu", prompt_tokens=256))
        return
    if len(sys.argv) < 2:
        sys.exit("usage: gpu_path_bench.py OUT.md [OUT.png] | --check-cpu")
    if not torch.cuda.is_available():
        sys.exit("gpu_path_bench.py needs a CUDA GPU (run --check-cpu for the CPU part)")
    out(verified_path(layout(16), "cuda"))
    out(verified_path(layout(256), "cuda"))
    ref = reference()
    link = min(ref["d2h"], ref["h2d"])
    out(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; large pinned copy device->host "
        f"{ref['d2h'] / 1e9:.1f} GB/s, host->device {ref['h2d'] / 1e9:.1f} GB/s, both at once {ref['both'] / 1e9:.1f} GB/s "
        f"(x{ref['both'] / link:.2f}; this run)")
    out()
    out("| operation | block | store | GB/s | ratio to link |")
    out("| --- | --- | --- | ---: | ---: |")
    figures: dict[str, float] = {}
    for bt in (16, 256):
        lay = layout(bt)
        size = f"{bt} tokens ({lay.block_bytes >> 20} MiB)"
        for name, device_bytes in (("host only", 0), ("device + host", 2 * GiB)):
            put, get = put_get(lay, device_bytes)
            for op, gbps, d in (("put", put, "d2h"), ("get", get, "h2d")):
                out(f"| {op} | {size} | {name} | {gbps:.1f} | {gbps * 1e9 / ref[d]:.2f} |")
                figures[f"{op} {bt} {name}"] = gbps * 1e9 / ref[d]
        save, load, layered = save_load(lay)
        out(f"| save_from (vLLM LBNHC pages) | {size} | host only | {save:.1f} | {save * 1e9 / ref['d2h']:.2f} |")
        out(f"| load_into (vLLM LBNHC pages) | {size} | host only | {load:.1f} | {load * 1e9 / ref['h2d']:.2f} |")
        for path, gbps in layered.items():
            out(f"| load_layers + finish, {path} (vLLM LBNHC pages) | {size} | host only | {gbps:.1f} | "
                f"{gbps * 1e9 / ref['h2d']:.2f} |")
        figures[f"save_from {bt}"] = save * 1e9 / ref["d2h"]
        figures[f"load_into {bt}"] = load * 1e9 / ref["h2d"]
    put4, save4 = back_to_back(layout(16))
    out(f"| put, 4 calls back to back | 16 tokens (2 MiB) | host only | {put4:.1f} | {put4 * 1e9 / ref['d2h']:.2f} |")
    out(f"| save_from, 4 calls back to back | 16 tokens (2 MiB) | host only | {save4:.1f} | "
        f"{save4 * 1e9 / ref['d2h']:.2f} |")
    for layers in (1, 2, 4):  # small blocks: a model of few layers, 16-token blocks, 16k-token prompts
        small = KVLayout(num_layers=layers, kv_factor=2, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                         block_tokens=16)
        put, get = put_get(small, 0, tokens=16384)
        for op, gbps, d in (("put", put, "d2h"), ("get", get, "h2d")):
            out(f"| {op} | 16 tokens ({small.block_bytes >> 10} KiB), 1024 a call | host only | {gbps:.1f} | "
                f"{gbps * 1e9 / ref[d]:.2f} |")
    lay = layout(16)
    one = figures["put 16 host only"] * ref["d2h"] / 1e9
    both = both_ways(lay)
    out(f"| put + get at once | 16 tokens | host only x2 | {both:.1f} | {both * 1e9 / link:.2f} "
        f"(x{both / one:.2f} of put alone; the link's own both-ways copy: x{ref['both'] / link:.2f}) |")
    slow = matmul_slowdown(lay)
    out()
    out(f"bf16 8192^3 matmul beside the store's put/get traffic: {slow * 100:+.1f}% (median of alternating windows)")
    for path in ("dma", "kernel"):
        slow = matmul_slowdown(lay, layer_path=path)
        out(f"bf16 8192^3 matmul beside load_layers ({path}) traffic: {slow * 100:+.1f}% (median of alternating windows)")
    Path(sys.argv[1]).write_text("\n".join(lines) + "\n")
    if len(sys.argv) > 2:
        plot(figures, Path(sys.argv[2]))


def plot(figures: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures)
    values = [figures[n] for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.6))
    bars = ax.barh(names, values, color=["#4472c4" if v >= 0.85 else "#a5a5a5" for v in values])
    # Every ratio written at its bar: a device-tier copy can run far past the link, so no value is cut off.
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8,
                 bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.axvline(0.85, color="#c00000", linestyle="--", label="target 0.85 (grey bars: below it)")
    ax.set_xlabel("ratio to a large pinned copy (same run)")
    ax.set_ylabel("operation, tokens per block, tiers")
    ax.set_xlim(0, max(1.1, 1.15 * max(values, default=0)))
    ax.invert_yaxis()
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=8)
    ax.set_title("tierkv public data path, Llama-3-8B KV, verification on", pad=22)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
