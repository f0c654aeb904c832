"""How long a thread running Python waits while another thread hashes saves: the interpreter lock's share of a step.

    .venv/bin/python scripts/hash_stall.py [--mib 30] [--seconds 3]

One thread checksums `--mib` MiB of blocks back to back (what the vLLM connector's save thread
does after each gather); the main thread runs short Python work in a loop and records the gaps
between iterations. Then the same loop alone, for the machine's own noise. The checksum's C
loop holds the interpreter lock; `tierkv.integrity` hashes in 1 MiB slices and releases the
lock between them (docs/vllm.md has the figures).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from tierkv.integrity import checksum_blocks


def gaps(seconds: float, busy: threading.Event | None) -> list[float]:
    out: list[float] = []
    end = time.perf_counter() + seconds
    last = time.perf_counter()
    while time.perf_counter() < end:
        sum(range(200))  # Python work that needs the lock
        now = time.perf_counter()
        out.append(now - last)
        last = now
    if busy is not None:
        busy.set()
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=30, help="MiB hashed per save")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    rows = torch.randint(0, 256, (args.mib, 1 << 20), dtype=torch.uint8)
    done = threading.Event()

    def saver() -> None:
        while not done.is_set():
            checksum_blocks(rows)

    thread = threading.Thread(target=saver)
    thread.start()
    beside = gaps(args.seconds, done)
    thread.join()
    alone = gaps(args.seconds, None)
    for name, g in (("beside the hashing", beside), ("alone", alone)):
        print(f"{name}: longest wait {g[-1] * 1e3:.2f} ms, p99.9 {g[int(len(g) * 0.999)] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
