"""How late an engine's thread wakes up while tierkv saves blocks beside it, on the CPU.

A "step" thread sleeps 2 ms at a time and records how much later than asked it runs again
(waiting for a core or for the interpreter lock); meanwhile saves of 48 blocks (SmolLM2-like KV:
30 layers, 3 KV heads of 64, 32-token blocks, a CPU engine in vLLM's layout) run without pause:

- none: no saves (the machine's own jitter);
- plain thread: the saves on an ordinary thread, whose CPU tensor ops take an OpenMP team as wide
  as the machine;
- SaveQueue: the vLLM connector's save thread (`tierkv_connectors.vllm.saves`), whose tensor ops
  run on one core.

    python scripts/save_thread_probe.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

import torch

from tierkv import BlockStore, DimOrder, EngineKV, EngineKVLayout, KVLayout, Namespace, StoreConfig
from tierkv_connectors.vllm.meta import SaveJob
from tierkv_connectors.vllm.saves import SaveQueue

BLOCKS = 48  # a request's blocks in the fourth multi-turn workload (docs/vllm.md)


def lateness(seconds: float, busy: Callable[[threading.Event], None] | None) -> list[float]:
    """Wake-up lateness (s) of a thread sleeping 2 ms at a time while `busy(stop)` runs on another."""
    stop = threading.Event()
    worker = threading.Thread(target=busy, args=(stop,)) if busy is not None else None
    if worker is not None:
        worker.start()
    late = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        time.sleep(0.002)
        late.append(time.perf_counter() - t - 0.002)
    stop.set()
    if worker is not None:
        worker.join()
    return sorted(late)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per configuration")
    args = ap.parse_args()
    lay = KVLayout(num_layers=30, kv_factor=2, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16, block_tokens=32)
    eng = EngineKVLayout(order=DimOrder.LBNHSC, num_layers=30, num_blocks=80 * BLOCKS, block_size=32, num_kv_heads=3,
                         head_dim=64, dtype=torch.bfloat16)
    engine = EngineKV(eng, torch.randn(eng.shape).to(torch.bfloat16))
    store = BlockStore(lay, Namespace(model="save-thread-probe"), StoreConfig(device="cpu", device_bytes=0, host_bytes=2 << 30))
    counter = iter(range(1, 10**9))

    def save_once() -> None:
        i = next(counter)
        table = list(range((i % 80) * BLOCKS, (i % 80 + 1) * BLOCKS))
        store.save_from(engine, table, torch.arange(BLOCKS * 32) + i * 10**5)

    def plain(stop: threading.Event) -> None:
        while not stop.is_set():
            save_once()

    def queued(stop: threading.Event) -> None:
        queue = SaveQueue(lambda job: save_once(), lambda: None, limit=2)
        while not stop.is_set():
            queue.submit([SaveJob("probe", "", [], [])])
            queue.drain()
        queue.close()

    print(f"{torch.get_num_threads()} torch threads; {BLOCKS} blocks of {lay.block_bytes >> 10} KiB a save; "
          f"{args.seconds:.0f} s each")
    print("| saves | wake-ups | p50 ms | p99 ms | max ms |\n| --- | ---: | ---: | ---: | ---: |")
    for name, busy in (("none", None), ("plain thread", plain), ("SaveQueue (one core)", queued)):
        late = lateness(args.seconds, busy)
        p = [late[int(q * (len(late) - 1))] * 1e3 for q in (0.5, 0.99, 1.0)]
        print(f"| {name} | {len(late)} | {p[0]:.3f} | {p[1]:.3f} | {p[2]:.3f} |")
    store.close()


if __name__ == "__main__":
    main()
