"""Where a warm restart of the disk tier spends its time: open after a clean close, and after a crash.

Builds (once, in `--dir`) a store whose manifest holds `--blocks` small blocks (the asv
`WarmRestart` layout: one 2 KiB block per 16 tokens), then times `BlockStore(...)` opening it:

- clean: after a clean close (the manifest vouched for by `manifest.clean`);
- crash: the clean mark removed, which is what a crash leaves (the manifest is read by a child
  process and rebuilt before the store opens it).

Each phase of the open is timed by wrapping the disk tier's own functions (vetting, the child's
read, the rebuild, `Manifest.load`, recovery, `Index.restore`), so the figures say where the time
goes without a profiler's overhead. `--profile` adds a cProfile of one clean open.

    python scripts/restart_profile.py --blocks 100000 --repeat 5
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tierkv import BlockStore, KVLayout, Namespace, StoreConfig  # noqa: E402
from tierkv.index import Index  # noqa: E402
from tierkv.tiers.disk import manifest, recovery, tier, vetting  # noqa: E402

LAYOUT = KVLayout(num_layers=1, kv_factor=1, num_kv_heads=1, head_dim=64, dtype=torch.float16, block_tokens=16)
NAMESPACE = Namespace(model="restart")
CHAIN = 1000

PHASES: dict[str, list[float]] = defaultdict(list)  # phase -> wall seconds, one per open
CPU: dict[str, list[float]] = defaultdict(list)  # phase -> CPU seconds of this process (and its children)


def cpu_now() -> float:
    """CPU seconds of this process and its waited-for children: on a shared, loaded machine the wall
    clock also counts the time other processes ran, CPU time does not."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def config(directory: Path, blocks: int) -> StoreConfig:
    bb = LAYOUT.block_bytes
    return StoreConfig(device_bytes=64 * bb, host_bytes=64 * bb, device="cpu", disk_path=str(directory),
                       disk_bytes=(blocks + 1000) * 4096, durability="none")


def build(directory: Path, blocks: int) -> np.ndarray:
    """A store of `blocks` blocks in chains of 1000, closed cleanly; the last prompt (served by a hit)."""
    rng = np.random.default_rng(0)
    kv = torch.zeros((CHAIN, *LAYOUT.block_shape), dtype=LAYOUT.dtype)
    tokens = np.zeros(0, dtype=np.int32)
    with BlockStore(LAYOUT, NAMESPACE, config(directory, blocks)) as store:
        for _ in range(blocks // CHAIN):
            tokens = rng.integers(0, 50_000, CHAIN * 16, dtype=np.int32)
            store.put(tokens, kv)
    return tokens


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t, c = time.perf_counter(), cpu_now()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[name].append(time.perf_counter() - t)
            CPU[name].append(cpu_now() - c)

    return wrapper


def instrument() -> None:
    """Time the phases of an open by wrapping the functions that do them (where they are looked up)."""
    tier.vet = timed("vet (whole)", tier.vet)
    for name in ("_is_clean", "_read_in_child", "_write_fresh"):
        if hasattr(vetting, name):
            setattr(vetting, name, timed(f"  vetting.{name}", getattr(vetting, name)))
    manifest.Manifest.load = timed("Manifest.load", manifest.Manifest.load)
    tier.trusted_records = timed("trusted_records", recovery.trusted_records)
    Index.restore = timed("Index.restore", Index.restore)
    tier.DiskTier.recover = timed("DiskTier.recover (whole)", tier.DiskTier.recover)


def open_once(directory: Path, blocks: int, tokens: np.ndarray) -> tuple[float, float]:
    """(seconds to open, seconds to open and serve the first hit); the store is closed after."""
    t, c = time.perf_counter(), cpu_now()
    store = BlockStore(LAYOUT, NAMESPACE, config(directory, blocks))
    opened = time.perf_counter() - t
    CPU["open (whole)"].append(cpu_now() - c)
    assert store.get(tokens[:64]).shape[0] == 4, "the last prompt is not served after the restart"
    hit = time.perf_counter() - t
    assert store.stats()["tiers"]["disk"]["used_slots"] >= blocks - 64
    t, c = time.perf_counter(), cpu_now()
    store.close()
    PHASES["close (not in open)"].append(time.perf_counter() - t)
    CPU["close (not in open)"].append(cpu_now() - c)
    return opened, hit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="reuse a store built here before (default: a fresh temp dir)")
    parser.add_argument("--profile", action="store_true", help="cProfile one clean open (top 25 by cumulative time)")
    args = parser.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="tierkv-restart-"))
    prompt = directory.parent / (directory.name + ".last_prompt.npy")
    if not (directory / "manifest").exists() or not prompt.exists():
        t = time.perf_counter()
        np.save(prompt, build(directory, args.blocks))
        print(f"built {args.blocks} blocks in {time.perf_counter() - t:.1f} s", flush=True)
    tokens = np.load(prompt)
    size = (directory / "manifest" / "data.mdb").stat().st_size
    print(f"manifest: {size / 2**20:.1f} MiB")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        open_once(directory, args.blocks, tokens)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    instrument()
    results: dict[str, list[tuple[float, float]]] = {}
    phases: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    for kind in ("clean", "crash"):
        PHASES.clear()
        CPU.clear()
        runs = []
        for _ in range(args.repeat):
            if kind == "crash":
                (directory / vetting.MARK).unlink()
            runs.append(open_once(directory, args.blocks, tokens))
        results[kind] = runs
        phases[kind] = dict(PHASES)
        cpu[kind] = dict(CPU)
    for kind, runs in results.items():
        opens = [o * 1e3 for o, _ in runs]
        hits = [h * 1e3 for _, h in runs]
        print(f"\n{kind}: open median {statistics.median(opens):.0f} ms (runs {', '.join(f'{x:.0f}' for x in opens)}); "
              f"open + first hit median {statistics.median(hits):.0f} ms")
        print(f"  {'phase':<32} {'wall median':>12} {'CPU median':>11} {'CPU min':>8}")
        for name in ("open (whole)", *phases[kind]):
            wall = phases[kind].get(name)
            used = cpu[kind][name]
            shown = f"{statistics.median(wall) * 1e3:9.1f} ms" if wall else f"{'':12}"
            print(f"  {name:<32} {shown} {statistics.median(used) * 1e3:8.1f} ms {min(used) * 1e3:5.0f} ms")
    if not args.dir:
        shutil.rmtree(directory, ignore_errors=True)
        prompt.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
