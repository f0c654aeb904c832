"""Where the time of the store's GPU data path goes: host time vs GPU time of put/get/save_from/load_into.

For each operation of `gpu_path_bench.py` (2048-token prompts, Llama-3-8B KV, host-only store):
the median time until the call returns and until its GPU work is done, then cProfile's top
functions (host work) and torch.profiler's top CUDA activities of a few calls.

    PYTHONUNBUFFERED=1 python scripts/gpu_path_profile.py [--block-tokens 16] [--top 18]
    python scripts/gpu_path_profile.py --layers 1 --tokens 16384     (1024 blocks of 64 KiB: the host cost per block)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tierkv import KVLayout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_path_bench import PROMPT, prompt, store, vllm_engine  # noqa: E402


def split_times(fn: Callable[[], object], reps: int = 7) -> tuple[float, float]:
    """Median ms until `fn` returns, and until the GPU work it queued is done."""
    fn()
    torch.cuda.synchronize()
    ret, done = [], []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ret.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        done.append(time.perf_counter() - t)
    return statistics.median(ret) * 1e3, statistics.median(done) * 1e3


def host_profile(fn: Callable[[], object], top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        fn()
        torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return "\n".join(line for line in text.getvalue().splitlines() if line.strip())[-6000:]


def gpu_profile(fn: Callable[[], object], top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
            torch.cuda.synchronize()
    return str(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top))


def timeline(fn: Callable[[], object], label: str) -> str:
    """When the GPU work of one call starts and ends, relative to the call's start (profiler clock, us).

    One line per GPU activity (kernel or copy, with its stream), so a gap before the first copy
    (host work the copy waits for) or between a copy and its verification is visible.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("timeline-call"):
            fn()
        torch.cuda.synchronize()
    events = prof.events()
    call = next(e for e in events if e.name == "timeline-call")
    t0 = call.time_range.start
    gpu = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    lines = [f"---- {label}: call returns at {call.time_range.end - t0:.0f} us"]
    for e in gpu:
        lines.append(f"  {e.time_range.start - t0:8.0f} .. {e.time_range.end - t0:8.0f} us  "
                     f"{e.time_range.end - e.time_range.start:7.0f} us  {e.name[:60]}")
    return "\n".join(lines)


def both_timeline(lay_blocks: int, s_put: object, s_get: object, kv: torch.Tensor) -> Callable[[], None]:
    """A put into one store and a get from another in two threads on two streams (gpu_path_bench's both_ways)."""
    import threading

    put_stream, get_stream = torch.cuda.Stream(), torch.cuda.Stream()
    counter = iter(range(2 * 10**5, 10**6))

    def put() -> None:
        with torch.cuda.stream(put_stream):
            s_put.put(prompt(next(counter)), kv)  # type: ignore[attr-defined]
        put_stream.synchronize()

    def once() -> None:
        t = threading.Thread(target=put)
        t.start()
        with torch.cuda.stream(get_stream):
            s_get.get(prompt(0), device="cuda")  # type: ignore[attr-defined]
        get_stream.synchronize()
        t.join()

    return once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--layers", type=int, default=32, help="model layers (32: Llama-3-8B; 1: 64 KiB blocks of 16 tokens)")
    ap.add_argument("--tokens", type=int, default=PROMPT, help="tokens per prompt")
    ap.add_argument("--timeline", action="store_true", help="only the GPU timeline of one call of each operation")
    args = ap.parse_args()
    lay = KVLayout(num_layers=args.layers, kv_factor=2, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                   block_tokens=args.block_tokens)
    tokens = args.tokens

    def prompt_of(i: int) -> torch.Tensor:
        return prompt(i, tokens)

    n = tokens // lay.block_tokens
    kv = torch.randn((n, *lay.block_shape), device="cuda").to(lay.dtype)
    pages = tokens // 16
    engine, _ = vllm_engine(lay, 2 * pages)
    table = torch.randperm(2 * pages)[:pages].tolist()
    nbytes = n * lay.block_bytes
    with store(lay, 0) as s:
        counter = iter(range(1, 10**6))
        ops: dict[str, Callable[[], object]] = {
            "put": lambda: s.put(prompt_of(next(counter)), kv),
            "get": lambda: s.get(prompt_of(0), device="cuda"),
            "save_from": lambda: s.save_from(engine, table, prompt_of(next(counter))),
            "load_into": lambda: s.load_into(engine, table, prompt_of(10**5)),
        }

        def stored() -> None:  # what get and load_into read, stored again (the timed puts evict it)
            s.put(prompt_of(0), kv)
            s.save_from(engine, table, prompt_of(10**5))

        print(f"{nbytes >> 20} MiB per call, {n} blocks of {lay.block_bytes >> 10} KiB; at 55 GB/s: {nbytes / 55e6:.2f} ms")
        for name, fn in ops.items():
            stored()
            ret, done = split_times(fn)
            print(f"== {name}: returns after {ret:.2f} ms, GPU done after {done:.2f} ms ({nbytes / done / 1e6:.1f} GB/s)")
        if args.timeline:
            for name, fn in ops.items():
                stored()
                print(timeline(fn, name))
            with store(lay, 0) as b:
                b.put(prompt_of(0), kv)
                torch.cuda.synchronize()
                print(timeline(both_timeline(n, s, b, kv), "put + get at once (two stores, two threads)"))
            return
        for name, fn in ops.items():
            stored()
            print(f"\n==== {name}: host (cProfile, 3 calls)\n{host_profile(fn, args.top)}")
            stored()
            print(f"\n==== {name}: torch.profiler (3 calls)\n{gpu_profile(fn, args.top)}")

if __name__ == "__main__":
    main()
